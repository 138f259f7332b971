"""Flax Linen modules for the RoI Align family.

Each module holds its function's settings as dataclass fields and its
``__call__`` calls the pure function, so a module gives exactly the function's
numbers (see the functions in :mod:`jax_roialign` for the semantics). Only
:class:`DeformableRoIAlign` has parameters (its offset predictor); the others
can be called without ``init``/``apply`` inside a parent module.

Example::

    import flax.linen as nn
    from jax_roialign.linen import RoIAlign

    class MaskHead(nn.Module):
        @nn.compact
        def __call__(self, features, boxes):
            x = RoIAlign(output_size=14, spatial_scale=1 / 16)(features, boxes)
            return nn.Conv(1, (1, 1))(nn.relu(nn.Conv(64, (3, 3))(x)))
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
    """:func:`jax_roialign.roi_align` as a Linen module (no parameters)."""

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    aligned: bool = True
    mode: str = "avg"
    data_format: str = "NHWC"
    method: str = "auto"

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
            method=self.method,
        )


class MultiScaleRoIAlign(nn.Module):
    """:func:`jax_roialign.multiscale_roi_align` as a Linen module (no parameters);
    ``features`` is the sequence of maps, finest first."""

    output_size: int | tuple[int, int]
    spatial_scales: Sequence[float]
    sampling_ratio: int = 0
    aligned: bool = True
    canonical_scale: float = 224
    canonical_level: int = 4
    level_mapper: str = "torchvision"
    data_format: str = "NHWC"
    method: str = "auto"

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
            method=self.method,
        )


class RoIPool(nn.Module):
    """:func:`jax_roialign.roi_pool` as a Linen module (no parameters)."""

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return roi_pool(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            box_indices=box_indices,
            data_format=self.data_format,
        )


class PreciseRoIPool(nn.Module):
    """:func:`jax_roialign.precise_roi_pool` as a Linen module (no parameters)."""

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    data_format: str = "NHWC"
    method: str = "auto"

    def __call__(self, features: Array, boxes: Array, box_indices: Array | None = None) -> Array:
        return precise_roi_pool(
            features,
            boxes,
            output_size=self.output_size,
            spatial_scale=self.spatial_scale,
            box_indices=box_indices,
            data_format=self.data_format,
            method=self.method,
        )


class RoIAlignRotated(nn.Module):
    """:func:`jax_roialign.roi_align_rotated` as a Linen module (no parameters)."""

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    aligned: bool = True
    clockwise: bool = False
    angle_unit: str = "degrees"
    data_format: str = "NHWC"

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
        )


class DeformableRoIAlign(nn.Module):
    """Deformable RoI Align with its offset predictor (Deformable ConvNets, mmcv's
    ``DeformRoIPoolPack``).

    The boxes are first pooled with ``roi_align(..., aligned=True)``; the pooled
    features of each box, flattened, go through a zero-initialised ``nn.Dense``
    (``offset_fc``) to per-bin offsets ``[PH, PW, 2]``, and
    :func:`jax_roialign.deform_roi_align` pools again with them. An untrained
    module is plain RoI Align.
    """

    output_size: int | tuple[int, int]
    spatial_scale: float = 1.0
    sampling_ratio: int = 0
    gamma: float = 0.1
    data_format: str = "NHWC"
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

    def __call__(self, image: Array, boxes: Array, box_indices: Array) -> Array:
        return crop_and_resize(
            image,
            boxes,
            box_indices,
            self.crop_size,
            method=self.method,
            extrapolation_value=self.extrapolation_value,
        )


class MultilevelCropAndResize(nn.Module):
    """:func:`jax_roialign.multilevel_crop_and_resize` as a Linen module (no parameters).

    ``MultilevelCropAndResize(output_size=7).apply({}, features, boxes)``.
    """

    output_size: int = 7
    sample_offset: float = 0.5

    def __call__(self, features: Any, boxes: Array) -> Array:
        return multilevel_crop_and_resize(
            features, boxes, output_size=self.output_size, sample_offset=self.sample_offset
        )
