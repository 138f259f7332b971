"""TensorFlow's crops: ``tf.image.crop_and_resize`` and Model Garden's
``multilevel_crop_and_resize``, on the library's shared readers.

Both are separable, so each builds per-axis taps ``idx, w`` ``[K, P, T]`` (the
geometry functions below, one per convention) and reads them through
:mod:`._contract`: :func:`crop_and_resize` through
:func:`._contract.contract_taps` (one map), :func:`multilevel_crop_and_resize`
through :func:`._contract.contract_levels` (each box from its own level, one
level's cost). The feature gradient is the readers' row-window
transpose on CPU (no scatter); the box gradient flows through the weights. On
TPU (``auto`` there) both read through :func:`._window.read_taps` instead: the
taps as dense weights, one window per box, no gather or scatter (the same sum;
float32 rounding differs from the references' order).

Float arithmetic follows the references': products are rounded before they are
added (:func:`._sampling.rounded`) and divisions are true divisions
(:func:`._sampling.exact_divide`), so every sample lands where TensorFlow's does
and the extrapolation masks agree exactly. The forward values are computed in
the references' own order (TensorFlow's ``a + (b - a) * t`` lerps; Model
Garden's weighted corners summed as its average pool does), so float32 outputs
are TensorFlow's bits; the backward is that of the same sum as weighted taps
(the readers' VJP), equal in exact arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _contract, _dispatch, _window
from ._dispatch import Implementation
from ._sampling import by_level, exact_divide, rounded
from ._tuning import TUNING
from ._validation import DataFormat, _check_static_indices, fence

Array = jax.Array

# ---------------------------------------------------------------------------
# Geometry: per-axis taps for each convention.
# ---------------------------------------------------------------------------


def corner_aligned_positions(lo: Array, hi: Array, *, crop: int, length: int) -> Array:
    """``tf.image.crop_and_resize``'s sample positions ``[K, crop]`` on one axis.

    ``lo, hi`` ``[K]`` are normalised box edges (``y1, y2``). With ``crop > 1``,
    ``lo * (L - 1) + i * ((hi - lo) * (L - 1) / (crop - 1))``; with ``crop == 1``
    the centre ``0.5 * (lo + hi) * (L - 1)``; every product and the division
    rounded on its own, as TensorFlow's CPU kernel (float32) computes them.
    """
    span = float(length - 1)
    if crop == 1:
        return rounded(rounded((lo + hi) * 0.5) * span)[:, None]
    step = exact_divide(rounded((hi - lo) * span), float(crop - 1))
    i = jnp.arange(crop, dtype=lo.dtype)
    return rounded(lo * span)[:, None] + rounded(i[None, :] * step[:, None])


def corner_aligned_taps(
    lo: Array, hi: Array, *, crop: int, length: int, nearest: bool
) -> tuple[Array, Array, Array]:
    """Taps of ``tf.image.crop_and_resize`` on one axis: ``idx, w [K, crop, T]`` and
    ``valid [K, crop]``.

    A sample outside ``[0, L - 1]`` (or NaN) is not valid (its whole row or
    column of the crop is the extrapolation value) and gets weight 0. Bilinear
    (``T = 2``): ``floor`` and ``ceil`` neighbours with weights ``1 - t, t``,
    ``t = y - floor(y)`` (at an integer sample both taps are the same cell, so
    the box gradient there is 0, as TensorFlow's). Nearest (``T = 1``): the
    cell ``roundf(y)`` (half away from zero), weight 1.
    """
    pos = corner_aligned_positions(lo, hi, crop=crop, length=length)
    valid = (pos >= 0.0) & (pos <= float(length - 1))
    pos = jnp.where(valid, pos, 0.0)
    low = jnp.floor(jax.lax.stop_gradient(pos))
    w_valid = valid.astype(pos.dtype)
    if nearest:
        near = low + (jax.lax.stop_gradient(pos) - low >= 0.5).astype(pos.dtype)
        return near[..., None].astype(jnp.int32), w_valid[..., None], valid
    high = jnp.ceil(jax.lax.stop_gradient(pos))
    frac = pos - low
    idx = jnp.stack([low, high], axis=-1).astype(jnp.int32)
    w = jnp.stack([1.0 - frac, frac], axis=-1) * w_valid[..., None]
    return idx, w, valid


def clamped_bin_taps(
    start: Array, size: Array, boundary: Array, *, pooled: int, sample_offset: float
) -> tuple[Array, Array]:
    """Model Garden's taps on one axis: ``idx, w [K, pooled, 2]``.

    One sample per bin, ``y = start + ((i + sample_offset) * size) / pooled``;
    ``y0 = min(max(floor(y), 0), boundary)``, ``y1 = min(y0 + 1, boundary)``
    (``boundary`` ``[K]`` may be fractional; the cells are ``int(y0), int(y1)``);
    weights ``1 - t, t`` with ``t = y - y0`` from the clamped ``y0``: below 0 the
    sample extrapolates linearly, past ``boundary`` both taps are the edge.
    """
    dtype = start.dtype
    i = jnp.asarray(np.arange(pooled) + float(sample_offset), dtype)
    pos = start[:, None] + exact_divide(rounded(i[None, :] * size[:, None]), float(pooled))
    b = boundary[:, None]
    y0 = jnp.minimum(jnp.maximum(jnp.floor(jax.lax.stop_gradient(pos)), 0.0), b)
    y1 = jnp.minimum(y0 + 1.0, b)
    frac = pos - y0
    idx = jnp.stack([y0, y1], axis=-1).astype(jnp.int32)
    w = jnp.stack([1.0 - frac, frac], axis=-1)
    return idx, w


# ---------------------------------------------------------------------------
# tf.image.crop_and_resize
# ---------------------------------------------------------------------------

_METHODS = ("bilinear", "nearest")


def crop_and_resize(
    image: Array,
    boxes: Array,
    box_indices: Array,
    crop_size: int | Sequence[int],
    *,
    method: str = "bilinear",
    extrapolation_value: float | Array = 0.0,
    implementation: str | None = None,
) -> Array:
    """Crops boxes out of images and resizes them, as ``tf.image.crop_and_resize``.

    A box ``(y1, x1, y2, x2)`` in normalised coordinates is mapped onto the image
    as ``y * (H - 1)``, ``x * (W - 1)`` (corner-aligned: 0 is the first pixel's
    centre, 1 the last's). Output row ``i`` samples
    ``y1 * (H - 1) + i * (y2 - y1) * (H - 1) / (crop_h - 1)`` (the box centre when
    ``crop_h == 1``), columns alike; ``y1 > y2`` flips the crop, and coordinates
    outside ``[0, 1]`` are allowed: a sample outside ``[0, H - 1]`` makes its
    whole row (or column) ``extrapolation_value``. ``"bilinear"`` interpolates
    the ``floor``/``ceil`` neighbours; ``"nearest"`` reads the pixel
    ``roundf(y), roundf(x)`` (half away from zero). The sample positions are
    TensorFlow's float32 arithmetic exactly (no fused multiply-add), and so is
    the interpolation: float32 outputs are TensorFlow's bits.

    Same numbers as ``tf.image.crop_and_resize(image, boxes, box_indices,
    crop_size, method, extrapolation_value)`` (on TPU the same sum is two small
    matmuls per box, with no gather: float32 within rounding of those numbers).
    Unlike :func:`jax_roialign.roi_align` (half-pixel, an average over each bin)
    it takes one corner-aligned sample per output pixel. Differentiable with
    respect to ``image`` (float images) and, for ``"bilinear"``, ``boxes``
    (TensorFlow's ``CropAndResizeGradBoxes``; the gradient is 0 where a sample
    is outside the image or on an integer coordinate), under ``jit``/``vmap``
    and to any order in reverse mode. For ``"nearest"`` the box gradient is 0
    (TensorFlow returns the bilinear one there).

    Args:
      image: ``[N, H, W, C]``, any real dtype (integer images are read as float32).
      boxes: ``[K, 4]`` normalised ``(y1, x1, y2, x2)``, floating point.
      box_indices: ``[K]`` integer image index of each box, in ``[0, N)`` (an
        index out of range is a ``ValueError`` when known at trace time, and
        gives zeros when traced).
      crop_size: ``(crop_h, crop_w)``, each ``>= 1`` (an int for a square crop).
      method: ``"bilinear"`` (default) or ``"nearest"``.
      extrapolation_value: the value of samples outside the image (a number or a
        scalar array; differentiable).
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by platform; or ``"gather"``, ``"scatter"``,
        ``"window"`` (others raise ``ValueError``).

    Returns:
      ``[K, crop_h, crop_w, C]``, float32 (float64 for a float64 image under x64).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign import crop_and_resize
      >>> image = jnp.arange(25.0).reshape(1, 5, 5, 1)
      >>> boxes = jnp.array([[0.0, 0.0, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]])
      >>> out = crop_and_resize(image, boxes, jnp.array([0, 0]), (3, 3))
      >>> out.shape
      (2, 3, 3, 1)
      >>> out[0, :, :, 0].tolist()
      [[0.0, 1.0, 2.0], [5.0, 6.0, 7.0], [10.0, 11.0, 12.0]]
      >>> out[1, 0, :, 0].tolist()  # flipped: starts at the bottom right
      [24.0, 22.0, 20.0]
      >>> crop_and_resize(image, jnp.array([[-0.5, 0.0, 0.5, 1.0]]), jnp.array([0]), (3, 2),
      ...                 extrapolation_value=-1.0)[0, :, :, 0].tolist()
      [[-1.0, -1.0], [0.0, 4.0], [10.0, 14.0]]
    """
    image = jnp.asarray(image)
    shape = jnp.shape(image)
    if len(shape) != 4:
        raise ValueError(f"image must be 4-D [N, H, W, C], got shape {shape}")
    idt = jnp.result_type(image)
    if not (jnp.issubdtype(idt, jnp.floating) or jnp.issubdtype(idt, jnp.integer)):
        raise TypeError(f"image must be a real (integer or floating) array, got dtype {idt}")
    n, h, w, c = shape
    if h < 1 or w < 1:
        raise ValueError(f"image must have a non-empty spatial extent, got shape {shape}")
    ch, cw = _crop_size(crop_size)
    nearest = _method(method)
    impl = _dispatch.parse_implementation(implementation)
    bshape, bdt = jnp.shape(boxes), jnp.result_type(boxes)
    if not jnp.issubdtype(bdt, jnp.floating):
        raise TypeError(f"boxes must be floating point, got dtype {bdt}")
    if len(bshape) != 2 or bshape[1] != 4:
        raise ValueError(f"boxes must be [K, 4] normalised (y1, x1, y2, x2), got shape {bshape}")
    k = bshape[0]
    ishape, idt_b = jnp.shape(box_indices), jnp.result_type(box_indices)
    if not jnp.issubdtype(idt_b, jnp.integer):
        raise TypeError(f"box_indices must be integers, got dtype {idt_b}")
    if ishape != (k,):
        raise ValueError(
            f"box_indices must have shape [K] = ({k},) to match boxes {bshape}, got {ishape}"
        )
    _check_static_indices(box_indices, n)
    dtype = jnp.float64 if idt == jnp.float64 else jnp.float32
    extra = jnp.asarray(extrapolation_value)
    if extra.ndim != 0:
        raise ValueError(
            f"extrapolation_value must be a scalar, got shape {jnp.shape(extrapolation_value)}"
        )
    if k == 0:
        return jnp.zeros((0, ch, cw, c), dtype)
    if not jnp.issubdtype(idt, jnp.floating):
        image = image.astype(dtype)
    coords = jnp.asarray(boxes).astype(dtype)
    raw = jnp.asarray(box_indices).astype(jnp.int32)
    ok = (raw >= 0) & (raw < n)
    batch = jnp.clip(raw, 0, n - 1)
    recipe = Crop((ch, cw), (h, w), np.dtype(dtype), nearest)
    return _dispatch.call(recipe, impl, image, coords, batch, ok, extra.astype(dtype))[0]


@dataclasses.dataclass(frozen=True)
class Crop(_dispatch.Recipe):
    """``crop_and_resize`` on ``(image, coords [K, 4], batch [K], ok [K], extra [])``:
    taps (``GATHER``: the row-window gradient; ``SCATTER``: autodiff's), in
    TensorFlow's float order for bilinear crops, or box-local windows (``WINDOW``)."""

    name = "crop_and_resize"
    supports = frozenset({Implementation.GATHER, Implementation.SCATTER, Implementation.WINDOW})
    unsupported_reason = "crops read through taps or windows"
    crop: tuple[int, int]
    size: tuple[int, int]
    dtype: Any
    nearest: bool

    def out_avals(self, image, coords, *rest):
        shape = (coords.shape[0], *self.crop, image.shape[3])
        return [jax.core.ShapedArray(shape, self.dtype)]

    def forward(self, impl, exact=True):
        def fn(image, coords, batch, ok, extra):
            (ch, cw), (h, w), dtype = self.crop, self.size, self.dtype
            taps_y = corner_aligned_taps(
                coords[:, 0], coords[:, 2], crop=ch, length=h, nearest=self.nearest
            )
            taps_x = corner_aligned_taps(
                coords[:, 1], coords[:, 3], crop=cw, length=w, nearest=self.nearest
            )
            (iy, wy, vy), (ix, wx, vx) = taps_y, taps_x
            if impl is Implementation.WINDOW:  # box-local windows, no gather or scatter
                live = ((iy, wy, vy & ok[:, None]), (ix, wx, vx & ok[:, None]))
                out = _window.read_taps([image], DataFormat.NHWC, batch, *live, dtype)
            elif self.nearest or not exact:
                row_vjp = impl is Implementation.GATHER
                out = _contract.contract_taps(
                    image, DataFormat.NHWC, batch, iy, wy, ix, wx, dtype, row_vjp=row_vjp
                )
            else:
                op = _lerp_op(np.dtype(dtype), impl is Implementation.GATHER)
                out = op(image, wy, wx, batch, iy, ix)
            out = jnp.where(ok[:, None, None, None], out, 0.0)
            inside = (vy[:, :, None] & vx[:, None, :])[..., None]
            return [jnp.where(inside, out, extra)]

        return fn

    def differentiable(self, impl):
        # The weighted sum (TensorFlow's order only rounds differently).
        return self.forward(Implementation.SCATTER, exact=False)


def _exact_op(exact, weighted):
    """A ``custom_vjp`` op ``(map, wy, wx, *ints)`` whose value is ``exact`` (the
    reference's float arithmetic, in its order) and whose VJP is that of
    ``weighted`` (the same sum as weighted taps through :mod:`._contract`:
    row-window feature gradient, weight gradient by autodiff; equal to ``exact``
    in exact arithmetic and differentiable again, so any order works)."""

    @jax.custom_vjp
    def op(fmap, wy, wx, *ints):
        return exact(fmap, wy, wx, *ints)

    def fwd(fmap, wy, wx, *ints):
        return exact(fmap, wy, wx, *ints), (fmap, wy, wx, ints)

    def bwd(res, g):
        fmap, wy, wx, ints = res
        _, vjp = jax.vjp(lambda f, a, b: weighted(f, a, b, *ints), fmap, wy, wx)
        return (*vjp(g), *(None for _ in ints))

    op.defvjp(fwd, bwd)
    return op


@functools.lru_cache(maxsize=64)
def _lerp_op(dtype: Any, row_vjp: bool):
    """Bilinear crops in TensorFlow's order, ``top + (bottom - top) * t_y`` with
    ``top = tl + (tr - tl) * t_x`` (each product rounded): float32 values are
    TensorFlow's bits. Arguments ``(image, wy, wx, batch, iy, ix)``."""

    def weighted(image, wy, wx, batch, iy, ix):
        return _contract.contract_taps(
            image, DataFormat.NHWC, batch, iy, wy, ix, wx, dtype, row_vjp=row_vjp
        )

    def lerp(image, wy, wx, batch, iy, ix):
        _, h, w, c = image.shape
        if c > TUNING.few_channels:
            b = batch[:, None, None]

            def read(a: int, t: int) -> Array:
                return image[b, iy[:, :, None, a], ix[:, None, :, t]].astype(dtype)

            return ordered_lerp(read, wy, wx)
        # Few channels: one gather per sample of its 2 x 2 cells from
        # (min(floor, H - 2), min(floor, W - 2)) -- which hold the floor and ceil
        # neighbours -- instead of one per neighbour: a quarter of the gathers (a
        # third less time for C = 3); the same values. The map is read as rows
        # [N * H, W * C], so a sample's index is (image row, first column): two
        # int32 per sample instead of three (the index array is the output's
        # size for C = 3: 37 -> 26 MiB and 61 -> 49 ms for 64 crops of 224 x 224).
        # With more channels the four gathers fuse into the lerp and are faster,
        # forward and backward.
        if h < 2 or w < 2:  # a one-pixel side: cells past it are never picked
            image = jnp.pad(image, ((0, 0), (0, max(2 - h, 0)), (0, max(2 - w, 0)), (0, 0)))
            h, w = max(h, 2), max(w, 2)
        rows = image.reshape(-1, w * c)
        y0 = jnp.minimum(iy[..., 0], h - 2)
        x0 = jnp.minimum(ix[..., 0], w - 2)
        starts = jnp.stack(
            jnp.broadcast_arrays((batch[:, None] * h + y0)[:, :, None], (x0 * c)[:, None, :]),
            axis=-1,
        )
        dims = jax.lax.GatherDimensionNumbers(
            offset_dims=(3, 4), collapsed_slice_dims=(), start_index_map=(0, 1)
        )
        # [K, PH, PW, y or y + 1, (x, x + 1) x C]
        cells = jax.lax.gather(rows, starts, dims, (2, 2 * c), mode="clip").astype(dtype)
        oy = (iy - y0[..., None])[:, :, None, :]  # [K, PH, 1, 2], each 0 or 1
        ox = (ix - x0[..., None])[:, None, :, :]  # [K, 1, PW, 2]

        def at(a: int, t: int) -> Array:
            row = jnp.where((oy[..., a] == 0)[..., None], cells[..., 0, :], cells[..., 1, :])
            return jnp.where((ox[..., t] == 0)[..., None], row[..., :c], row[..., c:])

        return ordered_lerp(at, wy, wx)

    return _exact_op(lerp, weighted)


def ordered_lerp(at, wy: Array, wx: Array) -> Array:
    """TensorFlow's bilinear order from the neighbours ``at(a, t)`` ``[K, PH, PW, C]``
    (``a``: top/bottom, ``t``: left/right) and the fractions in ``wy, wx``."""
    ty = wy[:, :, None, 1:]
    tx = wx[:, None, :, 1:]
    top = at(0, 0) + rounded((at(0, 1) - at(0, 0)) * tx)
    bottom = at(1, 0) + rounded((at(1, 1) - at(1, 0)) * tx)
    return top + rounded((bottom - top) * ty)


def _weighted_rows(dtype: Any, min_row_length: int, row_vjp: bool):
    """The corners' weighted sum over the levels' flat rows (the derivatives' form):
    ``(flat, wy, wx, batch, offset, row_length, iy, ix)`` as
    :func:`._contract.contract_rows`."""

    def weighted(flat, wy, wx, batch, offset, row_length, iy, ix):
        return _contract.contract_rows(
            flat,
            DataFormat.NHWC,
            batch,
            offset,
            row_length,
            iy,
            wy,
            ix,
            wx,
            dtype,
            min_row_length=min_row_length,
            row_vjp=row_vjp,
        )

    return weighted


@functools.lru_cache(maxsize=64)
def _rows_sum_op(dtype: Any, row_vjp: bool, min_row_length: int):
    """Model Garden's weighted corners summed in its order, each weight
    ``wy * wx`` and each term rounded (its ``x4`` and average pool's ``/4`` are
    exact): float32 values are its bits. Arguments ``(flat, wy, wx, batch,
    offset, row_length, iy, ix)`` as :func:`._contract.contract_rows`."""

    weighted = _weighted_rows(dtype, min_row_length, row_vjp)

    def ordered(flat, wy, wx, batch, offset, row_length, iy, ix):
        b = batch[:, None, None]
        base = offset[:, None, None]
        rl = row_length[:, None, None]
        return ordered_corners(
            lambda rows, cols: flat[b, base + rows * rl + cols], iy, wy, ix, wx, dtype
        )

    return _exact_op(ordered, weighted)


def ordered_corners(reader, iy: Array, wy: Array, ix: Array, wx: Array, dtype: Any) -> Array:
    """Model Garden's sum of the weighted corners ``reader(rows, cols)`` in its
    order: each weight ``wy * wx`` and each term rounded, added tap pair by tap
    pair (a ``combine`` of :func:`._contract.contract_levels`)."""
    acc = None
    for a in range(iy.shape[-1]):
        for t in range(ix.shape[-1]):
            rows, cols = iy[:, :, None, a], ix[:, None, :, t]
            w = rounded(wy[:, :, None, a] * wx[:, None, :, t])[..., None]
            term = rounded(w * reader(rows, cols).astype(dtype))
            acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def _crop_size(crop_size: Any) -> tuple[int, int]:
    if isinstance(crop_size, numbers.Integral) and not isinstance(crop_size, bool):
        pair: tuple[Any, ...] = (crop_size, crop_size)
    elif isinstance(crop_size, (Sequence, np.ndarray)) and not isinstance(crop_size, str):
        pair = tuple(crop_size)
    else:
        raise TypeError(f"crop_size must be a pair of ints (crop_h, crop_w), got {crop_size!r}")
    if len(pair) != 2 or not all(
        isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, bool) for v in pair
    ):
        raise TypeError(f"crop_size must be a pair of ints (crop_h, crop_w), got {crop_size!r}")
    if pair[0] < 1 or pair[1] < 1:
        raise ValueError(f"crop_size must be at least 1 on each axis, got {crop_size!r}")
    return int(pair[0]), int(pair[1])


def _method(method: Any) -> bool:
    """``True`` for nearest, ``False`` for bilinear."""
    if isinstance(method, str) and method.lower() in _METHODS:
        return method.lower() == "nearest"
    raise ValueError(f"method must be 'bilinear' or 'nearest', got {method!r}")


# ---------------------------------------------------------------------------
# Model Garden's multilevel_crop_and_resize
# ---------------------------------------------------------------------------

_LOG2 = float(np.float32(np.log(2.0)))  # log(2) rounded to float32, as TensorFlow's


def model_garden_levels(boxes: Array, min_level: int, max_level: int) -> Array:
    """Model Garden's FPN level of boxes ``[..., 4]`` ``(y1, x1, y2, x2)``, int32.

    ``floor(log(sqrt(h * w) / 224) / log(2)) + 4`` in float32 (``h, w`` in the
    boxes' dtype, then cast), clamped to ``[min_level, max_level]``; a zero,
    negative or non-finite area (where TensorFlow's cast to int32 gives
    ``INT_MIN``) goes to ``min_level``.
    """
    b = jax.lax.stop_gradient(jnp.asarray(boxes))
    height = (b[..., 2] - b[..., 0]).astype(jnp.float32)
    width = (b[..., 3] - b[..., 1]).astype(jnp.float32)
    root = jnp.sqrt(rounded(height * width))
    ratio = exact_divide(root, 224.0)
    ratio = jnp.where(root == 0, 0.0, ratio)  # divide_no_nan (224 is never 0)
    raw = jnp.floor(exact_divide(jnp.log(ratio), _LOG2)) + 4.0
    fits = jnp.isfinite(raw) & (raw >= min_level)
    level = jnp.minimum(jnp.where(fits, raw, float(min_level)), float(max_level))
    return level.astype(jnp.int32)


def _pyramid(features: Any) -> tuple[list[int], list[Array]]:
    if not isinstance(features, Mapping) or len(features) == 0:
        raise TypeError(
            "features must be a non-empty dict from pyramid level (e.g. '2'...'6' or ints) "
            f"to [B, H_l, W_l, C] maps, got {type(features).__name__}"
        )
    levels = {}
    for key, value in features.items():
        try:
            level = int(key)
        except (TypeError, ValueError):
            raise ValueError(
                f"features keys must be pyramid levels ('2', '3', ... or ints), got {key!r}"
            ) from None
        if level in levels:
            raise ValueError(f"features has level {level} twice (keys {list(features)!r})")
        levels[level] = jnp.asarray(value)
    order = sorted(levels)
    if order != list(range(order[0], order[0] + len(order))):
        raise ValueError(f"features must hold consecutive levels, got {order}")
    maps = [levels[i] for i in order]
    first = jnp.shape(maps[0])
    for level, m in zip(order, maps, strict=True):
        s = jnp.shape(m)
        if len(s) != 4:
            raise ValueError(f"features[{level!r}] must be 4-D [B, H, W, C], got shape {s}")
        if not jnp.issubdtype(jnp.result_type(m), jnp.floating):
            raise TypeError(
                f"features[{level!r}] must be floating point, got dtype {jnp.result_type(m)}"
            )
        if s[1] < 1 or s[2] < 1:
            raise ValueError(f"features[{level!r}] must have a non-empty extent, got shape {s}")
        if s[0] != first[0] or s[3] != first[3]:
            raise ValueError(
                f"every level must have the batch size and channels of level {order[0]} "
                f"{first}; level {level} has shape {s}"
            )
    return order, maps


def multilevel_crop_and_resize(
    features: Mapping[Any, Array],
    boxes: Array,
    output_size: int = 7,
    sample_offset: float = 0.5,
    *,
    implementation: str | None = None,
) -> Array:
    """RoI Align from a feature pyramid, as TF Model Garden's ``multilevel_crop_and_resize``.

    Each box ``(y1, x1, y2, x2)`` (image pixels) goes to level
    ``floor(log(sqrt(h * w) / 224) / log(2)) + 4`` (float32; a zero-area box to
    the lowest level), clamped to the pyramid's levels, and is divided by
    ``2**level``. Each of the ``output_size x output_size`` bins takes one
    bilinear sample at ``y1 + (i + sample_offset) * h / output_size`` (x alike),
    reading ``y0 = min(max(floor(y), 0), boundary)`` and ``min(y0 + 1, boundary)``
    with weights from ``y - y0``, where ``boundary = H_min / 2**(level - min_level)
    - 1`` (``H_min`` the lowest level's height): a sample below 0 extrapolates
    linearly from rows 0 and 1 (torchvision's RoI Align reads 0 beyond -1 and
    clamps to the edge in between), one past the boundary takes the edge value.

    On CPU the boxes are sorted by level and read in chunks, each from its own
    level (the pyramid is not concatenated), so the cost is one level's; the
    feature gradient is added box by box into row windows of each level, without
    a scatter. (A pyramid whose levels are less than half the one below reads
    past a level's end as Model Garden's flat gather does: through one flat
    concatenation.) On TPU each box reads one window of its
    own level (no gather or scatter; float32 within rounding of the CPU's
    numbers), and with batch-sharded features each device pools its own images
    (no collective). Differentiable in ``features`` and ``boxes`` (reverse mode,
    any order). Same numbers as Model Garden's
    ``official.vision.ops.spatial_transform_ops.multilevel_crop_and_resize(
    features, boxes, output_size, sample_offset)`` (its gather path), float32
    outputs bit for bit.

    Args:
      features: dict from level to ``[B, H_l, W_l, C]`` maps, consecutive levels,
        keys as Model Garden writes them (``"2"`` ... ``"6"``) or ints; the
        levels halve in size (``H_l = H_min / 2**(l - min)``, as Model Garden
        assumes; its boundary is computed from the lowest level).
      boxes: ``[B, N, 4]`` ``(y1, x1, y2, x2)`` in image pixels.
      output_size: the side of the square output, ``>= 1``.
      sample_offset: where in each bin the sample sits (0.5: its centre).
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by platform; or ``"gather"``, ``"scatter"``,
        ``"window"`` (others raise ``ValueError``).

    Returns:
      ``[B, N, output_size, output_size, C]`` in the features' dtype (computed
      in float32 or wider).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jax_roialign import multilevel_crop_and_resize
      >>> features = {"2": jnp.ones((1, 64, 64, 8)), "3": jnp.ones((1, 32, 32, 8)) * 3}
      >>> boxes = jnp.array([[[0.0, 0.0, 64.0, 64.0], [0.0, 0.0, 200.0, 120.0]]])
      >>> out = multilevel_crop_and_resize(features, boxes, output_size=7)
      >>> out.shape
      (1, 2, 7, 7, 8)
      >>> round(float(out[0, 0].mean()), 6), round(float(out[0, 1].mean()), 6)  # levels 2, 3
      (1.0, 3.0)
    """
    impl = _dispatch.parse_implementation(implementation)
    order, maps = _pyramid(features)
    if isinstance(output_size, bool) or not isinstance(output_size, (numbers.Integral)):
        raise TypeError(f"output_size must be an int, got {output_size!r}")
    if output_size < 1:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    pooled = int(output_size)
    if isinstance(sample_offset, bool) or not isinstance(sample_offset, numbers.Real):
        raise TypeError(f"sample_offset must be a Python number, got {sample_offset!r}")
    bshape, bdt = jnp.shape(boxes), jnp.result_type(boxes)
    if not jnp.issubdtype(bdt, jnp.floating):
        raise TypeError(f"boxes must be floating point, got dtype {bdt}")
    b, _, _, c = jnp.shape(maps[0])
    if len(bshape) != 3 or bshape[2] != 4 or bshape[0] != b:
        raise ValueError(
            f"boxes must be [B, N, 4] (y1, x1, y2, x2) with the features' batch size B={b}, "
            f"got shape {bshape}"
        )
    out_dtype = jnp.result_type(*maps)
    dtype = jnp.result_type(out_dtype, bdt, jnp.float32)
    num = bshape[1]
    if num == 0:
        return jnp.zeros((b, 0, pooled, pooled, c), out_dtype)
    heights = np.array([jnp.shape(m)[1] for m in maps])
    widths = np.array([jnp.shape(m)[2] for m in maps])
    # Model Garden's bounds keep every tap inside its level when each level is at
    # least half the one below it (floor(H_min / 2**l) <= H_l): then each level
    # can be read on its own.
    halves = 2 ** np.arange(len(order))
    in_levels = bool(
        np.all(heights[0] // halves <= heights) and np.all(widths[0] // halves <= widths)
    )
    recipe = MultilevelCrop(
        levels=(order[0], order[-1]),
        heights=tuple(int(x) for x in heights),
        widths=tuple(int(x) for x in widths),
        pooled=pooled,
        sample_offset=float(sample_offset),
        dtype=np.dtype(dtype),
        in_levels=in_levels,
    )
    coords = jnp.asarray(boxes).reshape(b * num, 4).astype(dtype)
    out = _dispatch.call(recipe, impl, maps, coords, per_image=True)[0]
    return out.reshape(b, num, pooled, pooled, c).astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class MultilevelCrop(_dispatch.Recipe):
    """``multilevel_crop_and_resize`` on ``(*maps, coords [B * N, 4])`` (image-major):
    each box read from its level (``GATHER``: the level-sorted read with the
    row-window gradient, where the levels hold their taps), from the levels'
    concatenation (``SCATTER``: autodiff's gradient), or through box-local
    windows of its level (``WINDOW``)."""

    name = "multilevel_crop_and_resize"
    supports = frozenset({Implementation.GATHER, Implementation.SCATTER, Implementation.WINDOW})
    unsupported_reason = "crops read through taps or windows"
    levels: tuple[int, int]
    heights: tuple[int, ...]
    widths: tuple[int, ...]
    pooled: int
    sample_offset: float
    dtype: Any
    in_levels: bool

    def out_avals(self, *args):
        maps, coords = args[:-1], args[-1]
        shape = (coords.shape[0], self.pooled, self.pooled, maps[0].shape[3])
        return [jax.core.ShapedArray(shape, self.dtype)]

    def taps(self, coords):
        """Each box's level and its taps ``(level, iy, wy, ix, wx)``."""
        dtype, (min_level, max_level) = self.dtype, self.levels
        level = model_garden_levels(coords, min_level, max_level) - min_level
        # 2**-level is exact, like Model Garden's division by 2**level.
        inv = by_level(2.0 ** -np.arange(min_level, max_level + 1), level, dtype)
        y1, x1 = coords[:, 0] * inv, coords[:, 1] * inv
        h = (coords[:, 2] - coords[:, 0]) * inv
        w = (coords[:, 3] - coords[:, 1]) * inv
        stride = by_level(2.0 ** np.arange(len(self.heights)), level, jnp.float32)
        bound_y = exact_divide(jnp.full_like(stride, float(self.heights[0])), stride) - 1.0
        bound_x = exact_divide(jnp.full_like(stride, float(self.widths[0])), stride) - 1.0
        opts = dict(pooled=self.pooled, sample_offset=self.sample_offset)
        iy, wy = clamped_bin_taps(y1, h, bound_y.astype(dtype), **opts)
        ix, wx = clamped_bin_taps(x1, w, bound_x.astype(dtype), **opts)
        return level, iy, wy, ix, wx

    def forward(self, impl, exact=True):
        def fn(*args):
            maps, coords = list(args[:-1]), args[-1]
            n, c = maps[0].shape[0], maps[0].shape[3]
            batch = jnp.repeat(jnp.arange(n, dtype=jnp.int32), coords.shape[0] // n)
            out = self._read(impl, exact, maps, c, batch, *self.taps(coords))
            # Vectorized reads go behind a fence (a loss on the output would
            # otherwise store every corner's term); the level-sorted read fences
            # its own, and a loop's output needs none (one would be a copy).
            looped = impl is Implementation.GATHER and self.in_levels and exact
            return [out if looped else fence(out)]

        return fn

    def _read(self, impl, exact, maps, c, batch, level, iy, wy, ix, wx):
        dtype, heights, widths = self.dtype, np.array(self.heights), np.array(self.widths)
        if impl is Implementation.WINDOW:  # box-local windows of each box's level
            # Taps stay inside their level (they do when each level is half
            # the one below it, as Model Garden assumes; the flat read runs on).
            rows = jnp.minimum(iy, by_level(heights - 1, level, jnp.int32)[:, None, None])
            cols = jnp.minimum(ix, by_level(widths - 1, level, jnp.int32)[:, None, None])
            live = jnp.ones(rows.shape[:2], bool)
            taps_y, taps_x = (rows, wy, live), (cols, wx, live)
            return _window.read_taps(
                maps, DataFormat.NHWC, batch, taps_y, taps_x, dtype, level=level
            )
        flats = [m.reshape(m.shape[0], -1, c) for m in maps]
        if impl is Implementation.GATHER and self.in_levels and exact:
            # Each box read from its own level, the pyramid not concatenated;
            # the row-window feature gradient per level.
            return _contract.contract_levels(
                flats,
                [int(x) for x in widths],
                DataFormat.NHWC,
                batch,
                level,
                iy,
                wy,
                ix,
                wx,
                dtype,
                combine=ordered_corners,
            )
        # The levels' concatenation (a pyramid whose taps run past a level: the
        # flat read runs on, as Model Garden's).
        flat, offset, row_length = _contract.concat_levels(flats, widths, DataFormat.NHWC, level)
        if not exact:  # the weighted sum, for derivatives
            weighted = _weighted_rows(dtype, int(widths.min()), row_vjp=False)
            return weighted(flat, wy, wx, batch, offset, row_length, iy, ix)
        op = _rows_sum_op(np.dtype(dtype), impl is Implementation.GATHER, int(widths.min()))
        return op(flat, wy, wx, batch, offset, row_length, iy, ix)

    def differentiable(self, impl):
        return self.forward(Implementation.SCATTER, exact=False)
