"""Flax Linen modules for the RoI Align family.

Each module holds its function's settings as dataclass fields and its
``__call__`` calls the pure function, so a module gives exactly the function's
numbers (see the functions in :mod:`jax_roialign` for the semantics). Only
:class:`DeformableRoIAlign` has parameters (its offset predictor); the others
can be called without ``init``/``apply`` inside a parent module.

Example:
    A mask head on a stride-16 map (a 64 x 64 image, 8 channels):

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from jax_roialign.linen import RoIAlign
    >>> class MaskHead(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, features, boxes):
    ...         x = RoIAlign(output_size=14, spatial_scale=1 / 16)(features, boxes)
    ...         return nn.Conv(1, (1, 1))(nn.relu(nn.Conv(16, (3, 3))(x)))
    >>> features = jnp.ones((1, 4, 4, 8))
    >>> boxes = jnp.array([[0, 8.0, 8.0, 56.0, 40.0]])
    >>> variables = MaskHead().init(jax.random.key(0), features, boxes)
    >>> MaskHead().apply(variables, features, boxes).shape
    (1, 14, 14, 1)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._deform import deform_roi_align
from ._multiscale import multiscale_roi_align
from ._pool import roi_pool
from ._precise import precise_roi_pool
from ._roi_align import roi_align
from ._rotated import roi_align_rotated

Array = jax.Array

__all__ = [
    "RoIAlign",
    "MultiScaleRoIAlign",
    "RoIPool",
    "PreciseRoIPool",
    "RoIAlignRotated",
    "DeformableRoIAlign",
]


class RoIAlign(nn.Module):
    """:func:`jax_roialign.roi_align` as a Linen module (no parameters).

    Counterpart of torchvision's ``RoIAlign(output_size, spatial_scale, sampling_ratio,
    aligned)`` and detectron2's ``ROIAlign``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import RoIAlign
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIAlign(output_size=2, sampling_ratio=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool.apply({}, features, boxes)[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    aligned: bool = True
    mode: str = "avg"
    data_format: str = "NHWC"
    implementation: str | None = None
    method: str | None = None  # deprecated alias of implementation

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return roi_align(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            mode=self.mode,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
            method=self.method,
        )


class MultiScaleRoIAlign(nn.Module):
    """:func:`jax_roialign.multiscale_roi_align` as a Linen module (no parameters);
    ``features`` is the sequence of maps, finest first.

    Counterpart of torchvision's ``MultiScaleRoIAlign(featmap_names, output_size,
    sampling_ratio)`` (``aligned=False``) and detectron2's ``ROIPooler``
    (``level_mapper="detectron2"``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import MultiScaleRoIAlign
      >>> pool = MultiScaleRoIAlign(output_size=7, spatial_scales=(1 / 4, 1 / 8))
      >>> maps = [jnp.ones((2, 32, 32, 16)), jnp.ones((2, 16, 16, 16))]  # P2, P3
      >>> boxes = jnp.tile(jnp.array([4.0, 4.0, 60.0, 60.0]), (2, 3, 1))  # [N, R, 4]
      >>> pool.apply({}, maps, boxes).shape
      (2, 3, 7, 7, 16)
    """

    output_size: int | tuple[int, int]
    spatial_scales: Sequence[float]
    sampling_ratio: int = 0
    aligned: bool = True
    canonical_scale: float = 224
    canonical_level: int = 4
    level_mapper: str = "torchvision"
    data_format: str = "NHWC"
    implementation: str | None = None
    method: str | None = None  # deprecated alias of implementation

    def __call__(
        self, features: Sequence[Array], boxes: Array, box_indices: Array | None = None
    ) -> Array:
        return multiscale_roi_align(
            list(features),
            boxes,
            output_size=self.output_size,
            spatial_scales=tuple(self.spatial_scales),
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
            level_mapper=self.level_mapper,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
            method=self.method,
        )


class RoIPool(nn.Module):
    """:func:`jax_roialign.roi_pool` as a Linen module (no parameters).

    Counterpart of torchvision's ``RoIPool(output_size, spatial_scale)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import RoIPool
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIPool(output_size=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool.apply({}, features, boxes)[0, :, :, 0].tolist()
      [[27.0, 29.0], [43.0, 45.0]]
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    implementation: str | None = None

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return roi_pool(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )


class PreciseRoIPool(nn.Module):
    """:func:`jax_roialign.precise_roi_pool` as a Linen module (no parameters).

    Counterpart of ``PrRoIPool2D(PH, PW, spatial_scale)`` from the PreciseRoIPooling
    reference implementation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import PreciseRoIPool
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = PreciseRoIPool(output_size=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool.apply({}, features, boxes)[0, :, :, 0].tolist()
      [[18.0, 20.0], [34.0, 36.0]]
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    implementation: str | None = None
    method: str | None = None  # deprecated alias of implementation

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return precise_roi_pool(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
            method=self.method,
        )


class RoIAlignRotated(nn.Module):
    """:func:`jax_roialign.roi_align_rotated` as a Linen module (no parameters).

    Counterpart of detectron2's ``ROIAlignRotated(output_size, spatial_scale,
    sampling_ratio)`` and mmcv's ``RoIAlignRotated``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import RoIAlignRotated
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIAlignRotated(output_size=2, sampling_ratio=2)
      >>> boxes = jnp.array([[0, 3.0, 3.0, 4.0, 4.0, 90.0]])  # (b, cx, cy, w, h, degrees)
      >>> pool.apply({}, features, boxes)[0, :, :, 0].round(4).tolist()
      [[29.5, 13.5], [31.5, 15.5]]
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    aligned: bool = True
    clockwise: bool = False
    angle_unit: str = "degrees"
    data_format: str = "NHWC"
    implementation: str | None = None

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return roi_align_rotated(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            clockwise=self.clockwise,
            angle_unit=self.angle_unit,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )


class DeformableRoIAlign(nn.Module):
    """Deformable RoI Align with its offset predictor (Deformable ConvNets, mmcv's
    ``DeformRoIPoolPack``).

    The boxes are first pooled with ``roi_align(..., aligned=True)``; the pooled
    features of each box, flattened, go through a zero-initialised ``nn.Dense``
    (``offset_fc``) to per-bin offsets ``[PH, PW, 2]``, and
    :func:`jax_roialign.deform_roi_align` pools again with them. An untrained
    module is plain RoI Align.

    Examples:
      A new module is plain RoI Align (its offset predictor starts at zero):

      >>> import jax
      >>> import jax.numpy as jnp
      >>> from jax_roialign.linen import DeformableRoIAlign
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool = DeformableRoIAlign(output_size=2, sampling_ratio=2)
      >>> variables = pool.init(jax.random.key(0), features, boxes)
      >>> variables['params']['offset_fc']['kernel'].shape  # PH * PW * C -> PH * PW * 2
      (4, 8)
      >>> pool.apply(variables, features, boxes)[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1
    data_format: str = "NHWC"
    implementation: str | None = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        ph, pw = (
            (self.output_size, self.output_size)
            if isinstance(self.output_size, int)
            else tuple(self.output_size)
        )
        pooled = roi_align(
            features,
            boxes,
            output_size=(ph, pw),
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )
        lead = pooled.shape[: 2 if jnp.ndim(boxes) == 3 else 1]
        offsets = nn.Dense(
            ph * pw * 2,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            param_dtype=self.param_dtype,
            name="offset_fc",
        )(pooled.reshape(lead + (-1,)))
        return deform_roi_align(
            features,
            boxes,
            offsets.reshape(lead + (ph, pw, 2)),
            output_size=(ph, pw),
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )


# TensorFlow's crops (tf.image.crop_and_resize, TF Model Garden's multilevel_crop_and_resize).
from ._crop import crop_and_resize, multilevel_crop_and_resize  # noqa: E402

__all__ += ["CropAndResize", "MultilevelCropAndResize"]


class CropAndResize(nn.Module):
    """:func:`jax_roialign.crop_and_resize` as a Linen module (no parameters).

    ``CropAndResize(crop_size=(14, 14)).apply({}, image, boxes, box_indices)``.
    """

    crop_size: int | tuple[int, int]
    method: str = "bilinear"
    extrapolation_value: float = 0.0
    implementation: str | None = None

    def __call__(self, image: Array, boxes: Array, box_indices: Array) -> Array:
        return crop_and_resize(
            image,
            boxes,
            box_indices,
            self.crop_size,
            method=self.method,
            extrapolation_value=self.extrapolation_value,
            implementation=self.implementation,
        )


class MultilevelCropAndResize(nn.Module):
    """:func:`jax_roialign.multilevel_crop_and_resize` as a Linen module (no parameters).

    ``MultilevelCropAndResize(output_size=7).apply({}, features, boxes)``.
    """

    output_size: int = 7
    sample_offset: float = 0.5
    implementation: str | None = None

    def __call__(self, features: Any, boxes: Array) -> Array:
        return multilevel_crop_and_resize(
            features,
            boxes,
            output_size=self.output_size,
            sample_offset=self.sample_offset,
            implementation=self.implementation,
        )
