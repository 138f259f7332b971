"""Argument parsing shared by every op: layouts, box forms, sizes, enums.

Every check here runs at trace time on shapes, dtypes and Python values, so a
bad call fails with a message that names the argument and what was seen, before
anything is compiled.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Array = jax.Array


class DataFormat(enum.Enum):
    NHWC = "NHWC"
    NCHW = "NCHW"

    @classmethod
    def parse(cls, value: Any) -> DataFormat:
        if isinstance(value, DataFormat):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.upper() == member.value:
                    return member
        raise ValueError(f"data_format must be 'NHWC' or 'NCHW', got {value!r}")


class Mode(enum.Enum):
    AVG = "avg"
    MAX = "max"

    @classmethod
    def parse(cls, value: Any) -> Mode:
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() == member.value:
                    return member
        raise ValueError(f"mode must be 'avg' or 'max', got {value!r}")


def output_size_pair(output_size: Any, name: str = "output_size") -> tuple[int, int]:
    """An int or a pair of ints, each >= 1."""
    if isinstance(output_size, numbers.Integral) and not isinstance(output_size, bool):
        pair: tuple[Any, ...] = (output_size, output_size)
    elif isinstance(output_size, Sequence) and not isinstance(output_size, str):
        pair = tuple(output_size)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if len(pair) != 2 or not all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in pair
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {output_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"{name} must be positive, got {output_size!r}")
    return int(pair[0]), int(pair[1])


def sampling_ratio_int(sampling_ratio: Any) -> int:
    if not isinstance(sampling_ratio, numbers.Integral) or isinstance(sampling_ratio, bool):
        raise TypeError(
            "sampling_ratio must be an int (> 0: fixed grid per bin, <= 0: adaptive), "
            f"got {sampling_ratio!r}"
        )
    return int(sampling_ratio)


def positive_scale(value: Any, name: str = "spatial_scale") -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {value!r}")
    value = float(value)
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and positive, got {value!r}")
    return value


def check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def features_nhwc_shape(features: Any, data_format: DataFormat, name: str = "features"):
    """Checks a 4-D floating feature map; returns ``(N, H, W, C)``."""
    shape = jnp.shape(features)
    if len(shape) != 4:
        layout = "[N, H, W, C]" if data_format is DataFormat.NHWC else "[N, C, H, W]"
        raise ValueError(
            f"{name} must be 4-D {layout} (data_format={data_format.value!r}), got shape {shape}"
        )
    dtype = jnp.result_type(features)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {dtype}")
    if data_format is DataFormat.NHWC:
        n, h, w, c = shape
    else:
        n, c, h, w = shape
    if h < 1 or w < 1:
        raise ValueError(f"{name} must have a non-empty spatial extent, got shape {shape}")
    return n, h, w, c


@dataclasses.dataclass(frozen=True)
class Rois:
    """Boxes in one canonical form.

    Attributes:
      coords: ``[K, D]`` box parameters (D = 4 for (x1, y1, x2, y2), 5 for rotated).
      batch: ``[K]`` int32 image index, clipped into range (use ``ok`` to mask).
      ok: ``[K]`` bool, false where the batch index is out of range or a coordinate
        is not finite. Such boxes give zeros.
      lead_shape: the leading output shape, ``(K,)`` or ``(N, R)`` for per-image boxes.
    """

    coords: Array
    batch: Array
    ok: Array
    lead_shape: tuple[int, ...]
    raw_batch: Array


def parse_boxes(
    boxes: Any,
    box_indices: Any,
    num_images: int,
    *,
    width: int = 4,
    what: str = "(x1, y1, x2, y2)",
) -> Rois:
    """Accepts the three box forms: ``[K, 1 + width]`` with the batch index first,
    ``[K, width]`` with ``box_indices`` ``[K]``, or per image ``[N, R, width]``."""
    shape = jnp.shape(boxes)
    dtype = jnp.result_type(boxes)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"boxes must be floating point, got dtype {dtype}")
    forms = (
        f"[K, {width + 1}] rows (batch_index, {what[1:-1]}), [K, {width}] with box_indices, "
        f"or per image [N, R, {width}]"
    )
    boxes = jnp.asarray(boxes)
    if len(shape) == 3:
        if shape[-1] != width:
            raise ValueError(f"boxes must be {forms}; got shape {shape}")
        if box_indices is not None:
            raise ValueError(
                f"box_indices is only for boxes of shape [K, {width}]; boxes have shape {shape}"
            )
        if shape[0] != num_images:
            raise ValueError(
                f"per-image boxes {shape} must have the features' batch size {num_images} first"
            )
        n, r = shape[0], shape[1]
        coords = boxes.reshape(n * r, width)
        raw = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
        lead: tuple[int, ...] = (n, r)
    elif len(shape) == 2:
        if shape[-1] == width + 1:
            if box_indices is not None:
                raise ValueError(
                    f"boxes of shape {shape} carry their batch index in column 0; "
                    "do not pass box_indices too"
                )
            coords = boxes[:, 1:]
            first = boxes[:, 0]
            # torchvision casts the float index to int (truncation); NaN/inf are invalid.
            finite = jnp.isfinite(first)
            safe = jnp.where(finite, first, -1.0)
            safe = jnp.clip(safe, -1.0, float(num_images))
            raw = jnp.where(finite, jnp.trunc(safe), -1.0).astype(jnp.int32)
        elif shape[-1] == width:
            if box_indices is None:
                if num_images != 1:
                    raise ValueError(
                        f"boxes of shape {shape} need box_indices [K] when the features "
                        f"hold {num_images} images"
                    )
                raw = jnp.zeros((shape[0],), jnp.int32)
            else:
                idx_shape = jnp.shape(box_indices)
                idx_dtype = jnp.result_type(box_indices)
                if not jnp.issubdtype(idx_dtype, jnp.integer):
                    raise TypeError(f"box_indices must be integers, got dtype {idx_dtype}")
                if idx_shape != (shape[0],):
                    raise ValueError(
                        f"box_indices must have shape [K] = ({shape[0]},) to match boxes "
                        f"{shape}, got {idx_shape}"
                    )
                raw = jnp.asarray(box_indices).astype(jnp.int32)
                _check_static_indices(box_indices, num_images)
            coords = boxes
        else:
            raise ValueError(f"boxes must be {forms}; got shape {shape}")
        lead = (shape[0],)
    else:
        raise ValueError(f"boxes must be {forms}; got shape {shape}")
    in_range = (raw >= 0) & (raw < num_images)
    ok = in_range & jnp.all(jnp.isfinite(coords), axis=-1)
    batch = jnp.clip(raw, 0, max(num_images - 1, 0))
    return Rois(coords, batch, ok, lead, raw)


def _check_static_indices(box_indices: Any, num_images: int) -> None:
    """A batch index out of range is an error when it is known at trace time."""
    if isinstance(box_indices, jax.core.Tracer):
        return
    try:
        values = np.asarray(box_indices)
    except Exception:  # pragma: no cover - non-array-like inputs fail elsewhere
        return
    if values.size and (values.min() < 0 or values.max() >= num_images):
        raise ValueError(
            f"box_indices must lie in [0, {num_images}) for features of batch size "
            f"{num_images}; got values in [{values.min()}, {values.max()}]"
        )


def compute_dtype(features: Any, boxes: Any) -> Any:
    """float32 at least; float64 when the inputs are (x64 mode)."""
    return jnp.result_type(jnp.result_type(features), jnp.result_type(boxes), jnp.float32)


def runtime_checks(rois: Rois, num_images: int) -> None:
    """checkify checks for what cannot be checked at trace time."""
    finite = jnp.all(jnp.isfinite(rois.coords), axis=-1)
    checkify.check(
        jnp.all(finite),
        "boxes have non-finite coordinates (first at row {i})",
        i=jnp.argmin(finite),
    )
    in_range = (rois.raw_batch >= 0) & (rois.raw_batch < num_images)
    checkify.check(
        jnp.all(in_range),
        f"box batch index out of range [0, {num_images}): " + "{v} at row {i}",
        v=rois.raw_batch[jnp.argmin(in_range)] if in_range.size else 0,
        i=jnp.argmin(in_range),
    )


@jax.custom_jvp
def fence(x: Array) -> Array:
    """The identity, as an op that XLA:CPU's YNNPACK fusion does not absorb.

    A reduction after the op (any loss: ``jnp.sum(out * w)``) becomes a YNNPACK
    fusion that pulls in every elementwise producer it supports -- the whole sum
    of gathered terms, but not the gathers -- so each tap's term would be
    materialised (16x the output and 10x the time for 16 taps). A
    ``reduce_precision`` to the dtype's own exponent and mantissa is not
    supported there: the sum stays in one loop with its gathers, and only the
    output is stored. It changes no bit (NaN, infinities and subnormals
    included), its derivative is the identity, and it costs less in the loop
    than the select it replaces (``where(x == x, x, x + x)``: box_p2's forward
    about 5-9% slower). (An optimization barrier does not help: XLA:CPU
    removes it before fusion.)
    """
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@fence.defjvp
def _fence_jvp(primals, tangents):
    return fence(primals[0]), tangents[0]


def finish_output(
    out: Array, rois: Rois, layout: DataFormat, dtype: Any, *, fenced: bool = True
) -> Array:
    """``[K, PH, PW, C]`` -> the caller's leading shape and layout, in ``dtype``.

    ``fenced=False``: the caller has put its vectorized reads behind
    :func:`fence` itself (a loop's output is stored anyway and needs none).
    """
    out = out.astype(dtype)
    if fenced:
        out = fence(out)
    if layout is DataFormat.NCHW:
        out = jnp.moveaxis(out, -1, 1)
    return out.reshape(rois.lead_shape + out.shape[1:])


@dataclasses.dataclass(frozen=True)
class Call:
    """One op call with its common arguments checked and put in canonical form."""

    features: Array
    layout: DataFormat
    pooled: tuple[int, int]
    spatial_scale: float
    size: tuple[int, int]
    channels: int
    rois: Rois
    dtype: Any

    def output(self, body: Callable[[], Array], channels: int | None = None) -> Array:
        """``body() -> [K, PH, PW, C']`` (skipped when there are no boxes), shaped for the
        caller and cast to the features' dtype."""
        if self.rois.coords.shape[0] == 0:
            c = self.channels if channels is None else channels
            out = jnp.zeros((0, *self.pooled, c), self.dtype)
        else:
            out = body()
        return finish_output(out, self.rois, self.layout, self.features.dtype)


def prepare(
    features: Any,
    boxes: Any,
    box_indices: Any,
    *,
    output_size: Any,
    spatial_scale: Any,
    data_format: Any,
    checks: Any = False,
    width: int = 4,
    what: str = "(x1, y1, x2, y2)",
) -> Call:
    """The checks every op shares: layout, output size, scale, features, boxes."""
    layout = DataFormat.parse(data_format)
    pooled = output_size_pair(output_size)
    scale = positive_scale(spatial_scale)
    checks = check_bool(checks, "checks")
    n, h, w, c = features_nhwc_shape(features, layout)
    rois = parse_boxes(boxes, box_indices, n, width=width, what=what)
    if checks:
        runtime_checks(rois, n)
    dtype = compute_dtype(features, boxes)
    return Call(jnp.asarray(features), layout, pooled, scale, (h, w), c, rois, dtype)
