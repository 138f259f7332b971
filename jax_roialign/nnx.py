"""Flax NNX modules for the RoI Align family.

Each module holds its function's settings as plain attributes and its
``__call__`` calls the pure function, so a module gives exactly the function's
numbers (see the functions in :mod:`jax_roialign` for the semantics). Only
:class:`DeformableRoIAlign` has parameters (its offset predictor).

Example:
    A box head on two FPN levels (P2, P3 of a 128 x 128 image, 8 channels), with
    three boxes per image:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jax_roialign.nnx import MultiScaleRoIAlign
    >>> class BoxHead(nnx.Module):
    ...     def __init__(self, channels, rngs):
    ...         self.pool = MultiScaleRoIAlign(output_size=7, spatial_scales=(1 / 4, 1 / 8))
    ...         self.fc = nnx.Linear(7 * 7 * channels, 32, rngs=rngs)
    ...
    ...     def __call__(self, maps, boxes):
    ...         x = self.pool(maps, boxes)  # [N, R, 7, 7, C]
    ...         return self.fc(x.reshape(x.shape[:2] + (-1,)))
    >>> head = BoxHead(8, nnx.Rngs(0))
    >>> maps = [jnp.ones((2, 32, 32, 8)), jnp.ones((2, 16, 16, 8))]
    >>> boxes = jnp.tile(jnp.array([4.0, 4.0, 60.0, 60.0]), (2, 3, 1))  # [N, R, 4]
    >>> head(maps, boxes).shape
    (2, 3, 32)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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


def _static(value: Any) -> Any:
    """Sequences as tuples, so that settings stay static (hashable) attributes."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        return tuple(value)
    return value


class RoIAlign(nnx.Module):
    """:func:`jax_roialign.roi_align` as an NNX module (no parameters).

    ``RoIAlign(output_size=7, spatial_scale=1/16)(features, boxes, box_indices=None)``.

    Counterpart of torchvision's ``RoIAlign(output_size, spatial_scale, sampling_ratio,
    aligned)`` and detectron2's ``ROIAlign``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.nnx import RoIAlign
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIAlign(output_size=2, sampling_ratio=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool(features, boxes)[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        aligned: bool = True,
        mode: str = "avg",
        data_format: str = "NHWC",
        implementation: str | None = None,
        method: str | None = None,
    ):
        self.output_size = _static(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.mode = mode
        self.data_format = data_format
        self.implementation = implementation
        self.method = method  # deprecated alias

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


class MultiScaleRoIAlign(nnx.Module):
    """:func:`jax_roialign.multiscale_roi_align` as an NNX module (no parameters).

    ``MultiScaleRoIAlign(output_size=7, spatial_scales=(1/4, 1/8, 1/16, 1/32))(
    [p2, p3, p4, p5], boxes, box_indices=None)``.

    Counterpart of torchvision's ``MultiScaleRoIAlign(featmap_names, output_size,
    sampling_ratio)`` (``aligned=False``) and detectron2's ``ROIPooler``
    (``level_mapper="detectron2"``).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.nnx import MultiScaleRoIAlign
      >>> pool = MultiScaleRoIAlign(output_size=7, spatial_scales=(1 / 4, 1 / 8))
      >>> maps = [jnp.ones((2, 32, 32, 16)), jnp.ones((2, 16, 16, 16))]  # P2, P3
      >>> boxes = jnp.tile(jnp.array([4.0, 4.0, 60.0, 60.0]), (2, 3, 1))  # [N, R, 4]
      >>> pool(maps, boxes).shape
      (2, 3, 7, 7, 16)
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        spatial_scales: Sequence[float],
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_scale: float = 224,
        canonical_level: int = 4,
        level_mapper: str = "torchvision",
        data_format: str = "NHWC",
        implementation: str | None = None,
        method: str | None = None,
    ):
        self.output_size = _static(output_size)
        self.spatial_scales = _static(spatial_scales)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.level_mapper = level_mapper
        self.data_format = data_format
        self.implementation = implementation
        self.method = method  # deprecated alias

    def __call__(
        self, features: Sequence[Array], boxes: Array, box_indices: Array | None = None
    ) -> Array:
        return multiscale_roi_align(
            list(features),
            boxes,
            output_size=self.output_size,
            spatial_scales=self.spatial_scales,
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


class RoIPool(nnx.Module):
    """:func:`jax_roialign.roi_pool` as an NNX module (no parameters).

    Counterpart of torchvision's ``RoIPool(output_size, spatial_scale)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.nnx import RoIPool
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIPool(output_size=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool(features, boxes)[0, :, :, 0].tolist()
      [[27.0, 29.0], [43.0, 45.0]]
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        data_format: str = "NHWC",
        implementation: str | None = None,
    ):
        self.output_size = _static(output_size)
        self.spatial_scale = spatial_scale
        self.data_format = data_format
        self.implementation = implementation

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


class PreciseRoIPool(nnx.Module):
    """:func:`jax_roialign.precise_roi_pool` as an NNX module (no parameters).

    Counterpart of ``PrRoIPool2D(PH, PW, spatial_scale)`` from the PreciseRoIPooling
    reference implementation.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.nnx import PreciseRoIPool
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = PreciseRoIPool(output_size=2)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> pool(features, boxes)[0, :, :, 0].tolist()
      [[18.0, 20.0], [34.0, 36.0]]
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        data_format: str = "NHWC",
        implementation: str | None = None,
        method: str | None = None,
    ):
        self.output_size = _static(output_size)
        self.spatial_scale = spatial_scale
        self.data_format = data_format
        self.implementation = implementation
        self.method = method  # deprecated alias

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


class RoIAlignRotated(nnx.Module):
    """:func:`jax_roialign.roi_align_rotated` as an NNX module (no parameters).

    Counterpart of detectron2's ``ROIAlignRotated(output_size, spatial_scale,
    sampling_ratio)`` and mmcv's ``RoIAlignRotated``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign.nnx import RoIAlignRotated
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = RoIAlignRotated(output_size=2, sampling_ratio=2)
      >>> boxes = jnp.array([[0, 3.0, 3.0, 4.0, 4.0, 90.0]])  # (b, cx, cy, w, h, degrees)
      >>> pool(features, boxes)[0, :, :, 0].round(4).tolist()
      [[29.5, 13.5], [31.5, 15.5]]
    """

    def __init__(
        self,
        *,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        aligned: bool = True,
        clockwise: bool = False,
        angle_unit: str = "degrees",
        data_format: str = "NHWC",
        implementation: str | None = None,
    ):
        self.output_size = _static(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.clockwise = clockwise
        self.angle_unit = angle_unit
        self.data_format = data_format
        self.implementation = implementation

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


class DeformableRoIAlign(nnx.Module):
    """Deformable RoI Align with its offset predictor (Deformable ConvNets, mmcv's
    ``DeformRoIPoolPack``).

    The boxes are first pooled with ``roi_align(..., aligned=True)``; the pooled
    ``[PH, PW, C]`` features, flattened, go through a linear layer to per-bin
    offsets ``[PH, PW, 2]``, and :func:`jax_roialign.deform_roi_align` pools again
    with them. The layer starts at zero, so an untrained module is plain RoI
    Align. ``channels`` is ``C``, the features' channel count.

    Attributes:
      offset_fc: the ``nnx.Linear(PH * PW * C, PH * PW * 2)`` offset predictor.

    Examples:
      A new module is plain RoI Align (its offset predictor starts at zero):

      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jax_roialign.nnx import DeformableRoIAlign
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # 8 * h + w
      >>> pool = DeformableRoIAlign(1, output_size=2, sampling_ratio=2, rngs=nnx.Rngs(0))
      >>> pool.offset_fc.kernel[...].shape  # PH * PW * C -> PH * PW * 2
      (4, 8)
      >>> pool(features, jnp.array([[0, 1.0, 1.0, 5.0, 5.0]]))[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]
    """

    def __init__(
        self,
        channels: int,
        *,
        output_size: int | tuple[int, int],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        data_format: str = "NHWC",
        implementation: str | None = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.output_size = _static(output_size)
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.gamma = gamma
        self.data_format = data_format
        self.implementation = implementation
        ph, pw = _pair(self.output_size)
        self.offset_fc = nnx.Linear(
            ph * pw * channels,
            ph * pw * 2,
            kernel_init=nnx.initializers.zeros,
            bias_init=nnx.initializers.zeros,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        pooled = roi_align(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )
        offsets = _offsets(self.offset_fc, pooled, self.output_size, jnp.ndim(boxes))
        return deform_roi_align(
            features,
            boxes,
            offsets,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            gamma=self.gamma,
            box_indices=box_indices,
            data_format=self.data_format,
            implementation=self.implementation,
        )


def _pair(output_size: Any) -> tuple[int, int]:
    if isinstance(output_size, tuple):
        return output_size[0], output_size[1]
    return output_size, output_size


def _offsets(layer, pooled: Array, output_size: Any, box_ndim: int) -> Array:
    """Flattens each box's pooled features, applies ``layer``, shapes ``[..., PH, PW, 2]``."""
    lead = pooled.shape[: 2 if box_ndim == 3 else 1]
    ph, pw = _pair(output_size)
    flat = pooled.reshape(lead + (-1,))
    return layer(flat).reshape(lead + (ph, pw, 2))


# TensorFlow's crops (tf.image.crop_and_resize, TF Model Garden's multilevel_crop_and_resize).
from ._crop import crop_and_resize, multilevel_crop_and_resize  # noqa: E402

__all__ += ["CropAndResize", "MultilevelCropAndResize"]


class CropAndResize(nnx.Module):
    """:func:`jax_roialign.crop_and_resize` as an NNX module (no parameters).

    ``CropAndResize(crop_size=(14, 14))(image, boxes, box_indices)``, boxes
    normalised ``(y1, x1, y2, x2)``.
    """

    def __init__(
        self,
        crop_size: int | tuple[int, int],
        *,
        method: str = "bilinear",
        extrapolation_value: float = 0.0,
        implementation: str | None = None,
    ):
        self.crop_size = _static(crop_size)
        self.method = method
        self.extrapolation_value = extrapolation_value
        self.implementation = implementation

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


class MultilevelCropAndResize(nnx.Module):
    """:func:`jax_roialign.multilevel_crop_and_resize` as an NNX module (no parameters).

    ``MultilevelCropAndResize(output_size=7)(features, boxes)``: ``features`` a dict
    level -> ``[B, H_l, W_l, C]``, boxes ``[B, N, 4]`` ``(y1, x1, y2, x2)`` in pixels.
    """

    def __init__(
        self,
        output_size: int = 7,
        *,
        sample_offset: float = 0.5,
        implementation: str | None = None,
    ):
        self.output_size = output_size
        self.sample_offset = sample_offset
        self.implementation = implementation

    def __call__(self, features: Any, boxes: Array) -> Array:
        return multilevel_crop_and_resize(
            features,
            boxes,
            output_size=self.output_size,
            sample_offset=self.sample_offset,
            implementation=self.implementation,
        )
