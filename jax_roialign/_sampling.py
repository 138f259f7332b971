"""Sampling geometry shared by every op: where to sample, and how a sample reads the map.

Everything here works on one axis at a time. RoI Align's average over a regular
grid of bilinear samples factorises into a y-part and an x-part (the boundary
rule and the bilinear weights are both products), so each op builds, per axis,
*taps*: for every box ``k`` and bin ``p`` a short list of map indices and
weights, ``idx[k, p, t]`` and ``w[k, p, t]``. The value of bin ``(ph, pw)`` is
then ``sum_a sum_b wy[k, ph, a] * wx[k, pw, b] * F[k, idy[k, ph, a], idx[k, pw, b]]``.

Two constructions give the taps:

* :func:`sample_taps` -- one sample at a time, for a grid whose size is known
  statically (``sampling_ratio > 0``): two taps per sample (the low and high
  neighbour), bit-for-bit the arithmetic of torchvision's kernel.
* :func:`grid_row_weights` -- the exact average over an arithmetic progression of
  ``g`` samples, evaluated directly at any rows in closed form. ``g`` may be a
  traced, per-box value (adaptive sampling ``ceil(bin size)``) and unbounded:
  the cost is per row, not per sample, so a box a thousand times larger than the
  map costs what a small one does and nothing is truncated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def exact_divide(x: Array, d: Array | float) -> Array:
    """``x / d`` rounded as IEEE division, as the C++ reference computes it.

    XLA rewrites a division by a constant or a broadcast value into a
    multiplication by its reciprocal, which can be one ulp off; a sample that the
    reference puts exactly on -1 or H would then fall on the other side of the
    boundary. The barrier hides the divisor from that rewrite.
    """
    x, d = jnp.broadcast_arrays(x, jnp.asarray(d, jnp.result_type(x)))
    return x / jax.lax.optimization_barrier(d)


def rounded(x: Array) -> Array:
    """Keeps a product from being contracted with a following add.

    The reference rounds ``a * b`` before adding ``c``; XLA's CPU and GPU backends
    may emit a fused multiply-add that rounds once, which moves a sample by an ulp,
    across -1 or H if it sat there. A select between the two breaks the pattern
    (an optimization barrier does not: it is removed before code generation).
    """
    return jnp.where(x == x, x, jnp.zeros_like(x))


@dataclasses.dataclass(frozen=True)
class AxisGrid:
    """The sample grid along one axis, for every box and bin.

    Attributes:
      first: ``[K, P]`` position of bin ``p``'s edge, ``start + p * bin``.
      bin: ``[K, 1]`` bin size (may be zero or negative for aligned boxes).
      count: ``[K, 1]`` samples per bin, as a float (``sampling_ratio`` or
        ``ceil(roi_size / P)``); zero or below means no sample.
      static_count: the count when it is the same static ``sampling_ratio`` for
        every box, else ``None`` (adaptive).
      length: the map's length along this axis (H or W), static; with ``extent``
        it is the largest length any box sees (it sizes dense weights).
      extent: optional ``[K, 1]`` per-box map length (boxes pooled from maps of
        different sizes, e.g. FPN levels); ``None`` means ``length`` for all.
      valid: optional ``(lo, hi)``, :func:`valid_range` computed once
        (:func:`with_valid_range`) and reused by the taps, the window choice
        and the dense weights, instead of being traced and compiled for each.
      rows: optional ``(first_row, need)``, :func:`row_window` computed once
        (:func:`with_geometry`), for the same reason.
    """

    first: Array
    bin: Array
    count: Array
    static_count: int | None
    length: int
    extent: Array | None = None
    valid: tuple[Array, Array] | None = None
    rows: tuple[Array, Array] | None = None

    @property
    def limit(self) -> Array | int:
        """The map length each box sees: ``extent`` when given, else ``length``."""
        return self.length if self.extent is None else self.extent


jax.tree_util.register_dataclass(
    AxisGrid,
    data_fields=["first", "bin", "count", "extent", "valid", "rows"],
    meta_fields=["static_count", "length"],
)


def axis_grid(
    lo: Array,
    hi: Array,
    *,
    pooled: int,
    length: int,
    spatial_scale: float,
    offset: float,
    min_size: float | None,
    sampling_ratio: int,
    extent: Array | None = None,
) -> AxisGrid:
    """Maps box edges ``lo, hi`` ``[K]`` (image coordinates) onto the map's sample grid.

    ``offset`` is subtracted after scaling (0.5 for ``aligned=True``); ``min_size``
    clamps the RoI size from below (1.0 for torchvision's ``aligned=False``).
    ``spatial_scale`` may be a per-box ``[K]`` array, and ``extent`` ``[K]`` a
    per-box map length (multi-level pooling).
    """
    start = rounded(lo * spatial_scale) - offset
    end = rounded(hi * spatial_scale) - offset
    size = end - start
    if min_size is not None:
        size = jnp.maximum(size, jnp.asarray(min_size, size.dtype))
    bin_size = exact_divide(size, float(pooled))
    if sampling_ratio > 0:
        count = jnp.full_like(size, float(sampling_ratio))
        static_count: int | None = sampling_ratio
    else:
        count = jnp.maximum(jnp.ceil(bin_size), 0.0)
        static_count = None
    p = jnp.arange(pooled, dtype=size.dtype)
    first = start[:, None] + rounded(p[None, :] * bin_size[:, None])
    ext = None if extent is None else jnp.asarray(extent, size.dtype)[:, None]
    return AxisGrid(first, bin_size[:, None], count[:, None], static_count, length, ext)


def sample_positions(grid: AxisGrid, i: Array) -> Array:
    """Sample ``i`` of every bin, with torchvision's operation order.

    ``y = (start + p * bin) + ((i + 0.5) * bin) / count``; ``i`` broadcasts
    against ``[K, P]`` from the right (``[K, P, T]`` or ``[T]`` after expansion).
    """
    count = jnp.maximum(grid.count, 1.0)
    first = grid.first[..., None]
    bin_size = grid.bin[..., None]
    return first + exact_divide((i + 0.5) * bin_size, count[..., None])


def sample_taps(grid: AxisGrid) -> tuple[Array, Array]:
    """Two taps per sample for a static grid: ``idx, w`` of shape ``[K, P, 2 * s]``.

    Per sample ``y``: outside ``[-1, L]`` (or NaN) it reads 0; else ``y`` is clamped
    to ``>= 0``, the low neighbour is ``floor(y)``, and at or past ``L - 1`` both
    neighbours are ``L - 1``. Weights carry the ``1 / s`` of the average.
    """
    s = grid.static_count
    if s is None:
        raise ValueError("sample_taps needs a static sampling grid")
    dtype = grid.first.dtype
    length = _limit3(grid, dtype)
    i = jnp.arange(s, dtype=dtype)
    y = sample_positions(grid, i)  # [K, P, s]
    valid = (y >= -1.0) & (y <= length)
    u = jnp.maximum(jnp.where(valid, y, 0.0), 0.0)
    low = jnp.floor(u)
    at_end = low >= length - 1
    low = jnp.where(at_end, length - 1, low)
    frac = jnp.where(at_end, 0.0, u - low)
    high = jnp.where(at_end, low, low + 1.0)
    scale = jnp.where(valid, 1.0 / s, 0.0).astype(dtype)
    idx = jnp.concatenate([low, high], axis=-1).astype(jnp.int32)
    w = jnp.concatenate([(1.0 - frac) * scale, frac * scale], axis=-1)
    return idx, w


# ---------------------------------------------------------------------------
# Closed form: exact average over an arithmetic progression of samples.
# ---------------------------------------------------------------------------


def _limit3(grid: AxisGrid, dtype) -> Array:
    """The per-box (or per-bin) length as a float broadcasting against ``[K, P, T]``."""
    if grid.extent is None:
        return jnp.asarray(float(grid.length), dtype)
    return grid.extent[..., None].astype(dtype)


def _count_below(grid: AxisGrid, x: Array | float, strict: bool) -> Array:
    """#samples with ``y < x`` (``strict``) or ``y <= x``, from the index formula.

    Only valid for a positive step. The result may be off by one where a sample
    sits on ``x`` up to rounding; callers either do not care (the weight is
    continuous there) or fix it up with :func:`_exact_count`.
    """
    count = jnp.maximum(grid.count, 1.0)
    step = grid.bin / count
    q = (x - grid.first) / step - 0.5
    n = jnp.ceil(q) if strict else jnp.floor(q) + 1.0
    return jnp.clip(n, 0.0, grid.count)


def _exact_count(grid: AxisGrid, x: Array | float, strict: bool) -> Array:
    """#samples with ``y < x`` (``strict``) or ``y <= x``, exactly as the float reference.

    The samples are monotone in their index even after rounding, so the count
    is the formula's estimate corrected by comparing the neighbouring samples,
    computed with the reference's own arithmetic.
    """
    n = _count_below(grid, x, strict)
    for _ in range(2):
        before = sample_positions(grid, (n - 1.0)[..., None])[..., 0]
        at = sample_positions(grid, n[..., None])[..., 0]
        below_before = before < x if strict else before <= x
        below_at = at < x if strict else at <= x
        n = jnp.where((n > 0) & ~below_before, n - 1.0, n)
        n = jnp.where((n < grid.count) & below_at, n + 1.0, n)
    return n


def valid_range(grid: AxisGrid) -> tuple[Array, Array]:
    """Index range ``[lo, hi)`` of the samples inside ``[-1, L]``, exact, ``[K, P]``."""
    if grid.valid is not None:
        return grid.valid
    limit = grid.limit if grid.extent is not None else float(grid.length)
    lo = _exact_count(grid, -1.0, strict=True)
    hi = _exact_count(grid, limit, strict=False)
    return lo, jnp.maximum(hi, lo)


def _partial_sum(grid: AxisGrid, n0: Array, n1: Array, c: Array) -> Array:
    """``sum_{i in [n0, n1)} (y_i - c)`` in closed form."""
    step = grid.bin / jnp.maximum(grid.count, 1.0)
    mean_offset = (grid.first - c) + step * ((n0 + n1) * 0.5)
    return (n1 - n0) * mean_offset


def _with_samples(grid: AxisGrid) -> tuple[AxisGrid, Array]:
    """The grid with a harmless step in bins without samples (``count < 1``), and
    the mask of bins with samples. Nothing changes in the other bins."""
    has_samples = grid.count >= 1.0
    safe = AxisGrid(
        jnp.where(has_samples, grid.first, 0.0),
        jnp.where(has_samples, grid.bin, 1.0),
        grid.count,
        None,
        grid.length,
        grid.extent,
        grid.valid,
    )
    return safe, has_samples


def with_valid_range(grid: AxisGrid) -> AxisGrid:
    """``grid`` carrying its :func:`valid_range` (of the bins with samples; a bin
    without samples gets an empty range), so that every later use shares one
    computation. A static grid is returned as it is."""
    if grid.static_count is not None or grid.valid is not None:
        return grid
    safe, _ = _with_samples(grid)
    return dataclasses.replace(grid, valid=valid_range(safe))


def grid_row_weights(grid: AxisGrid, rows: Array) -> Array:
    """Exact per-row weight of each bin's sample average, ``[K, P, T]``.

    ``rows`` ``[K, P, T]`` (int) are map indices; rows outside ``[0, L)`` get 0.
    The weight of row ``r`` is ``(1/g) * sum_i phi_r(y_i)`` over the ``g`` samples of
    the bin, ``phi_r`` the bilinear weight of row ``r`` after the boundary rules.
    It is a piecewise-linear function of the sample position, so the sum splits
    into four runs of consecutive samples (the flat part below row 0, the rising
    and falling sides of the tent, the flat part above row L-1), each summed in
    closed form. Only the runs' ends at -1 and L are discontinuities of
    ``phi``; they are counted exactly (:func:`valid_range`). Needs a positive
    step (``g >= 1`` means a positive RoI size under adaptive sampling).
    """
    dtype = grid.first.dtype
    length = _limit3(grid, dtype)
    # A bin without samples (count < 1) gets weight 0; give it a harmless step
    # so that no inf/NaN reaches the gradient through the unselected branch.
    grid, has_samples = _with_samples(grid)
    lo, hi = valid_range(grid)
    lo, hi = lo[..., None], hi[..., None]
    r = rows.astype(dtype)

    def n_at(x: Array) -> Array:
        # Cumulative count of valid samples below x, for interior breakpoints.
        return jnp.clip(_count_below(_expand(grid), x, strict=True), lo, hi)

    n_r = n_at(r)
    n_rm1 = jnp.where(r >= 1, n_at(r - 1.0), lo)
    n_rp1 = jnp.where(r <= length - 2, n_at(r + 1.0), hi)
    g = _expand(grid)
    rising = _partial_sum(g, n_rm1, n_r, r - 1.0)
    falling = -_partial_sum(g, n_r, n_rp1, r + 1.0)
    rising = jnp.where(r >= 1, rising, 0.0)
    falling = jnp.where(r <= length - 2, falling, 0.0)
    flat_low = jnp.where(r == 0, n_r - lo, 0.0)
    flat_high = jnp.where(r == length - 1, hi - n_r, 0.0)
    total = rising + falling + flat_low + flat_high
    inside = (rows >= 0) & (rows < length) & has_samples[..., None]
    return jnp.where(inside, total / jnp.maximum(grid.count[..., None], 1.0), 0.0)


def _expand(grid: AxisGrid) -> AxisGrid:
    """Adds a trailing axis so that per-bin fields broadcast against ``[K, P, T]``."""
    ext = None if grid.extent is None else grid.extent[..., None]
    return AxisGrid(
        grid.first[..., None], grid.bin[..., None], grid.count[..., None], None, grid.length, ext
    )


def row_window(grid: AxisGrid) -> tuple[Array, Array]:
    """First row each bin touches and how many rows it needs, ``[K, P]`` int32 each.

    From the first and last valid sample (exact: :func:`valid_range` and
    :func:`sample_positions` follow the reference's arithmetic), clamped into the map.
    """
    if grid.rows is not None:
        return grid.rows
    lo, hi = valid_range(grid)
    y_first = sample_positions(grid, lo[..., None])[..., 0]
    y_last = sample_positions(grid, (hi - 1.0)[..., None])[..., 0]
    top = jnp.asarray(grid.limit, y_first.dtype) - 1.0
    first_row = jnp.floor(jnp.clip(y_first, 0.0, top))
    last_row = jnp.minimum(jnp.floor(jnp.clip(y_last, 0.0, top)) + 1.0, top)
    need = jnp.where(hi > lo, last_row - first_row + 1.0, 0.0)
    return first_row.astype(jnp.int32), need.astype(jnp.int32)


def window_taps(grid: AxisGrid, taps: int) -> tuple[Array, Array]:
    """Per-row taps for each bin: ``taps`` consecutive rows from the bin's first row.

    Exact when every bin needs at most ``taps`` rows (see :func:`row_window`).
    """
    rows = _window_rows(grid, taps)
    return _into_map(grid, rows), grid_row_weights(grid, rows)


def _window_rows(grid: AxisGrid, taps: int) -> Array:
    """``taps`` consecutive rows from each bin's first row, ``[K, P, taps]``."""
    return row_window(grid)[0][..., None] + jnp.arange(taps, dtype=jnp.int32)


def _into_map(grid: AxisGrid, rows: Array) -> Array:
    """``rows [K, P, T]`` clamped into the map each box sees (a tap's index; its
    weight is 0 outside)."""
    top = jnp.asarray(grid.limit, jnp.int32) - 1
    if grid.extent is not None:
        top = top[..., None]
    return jnp.clip(rows, 0, top)


def axis_taps(grid: AxisGrid, window: int) -> tuple[Array, Array]:
    """The taps of a grid: two per sample for a static grid, else ``window`` rows per bin."""
    if grid.static_count is not None:
        return sample_taps(grid)
    return window_taps(grid, window)


def window_choice(grid: AxisGrid, windows: tuple[int, ...], live: Array) -> Array:
    """Index of the smallest of ``windows`` (ascending) that every live bin fits.

    ``live`` ``[K, P]`` (broadcastable) masks boxes or bins that give zeros anyway.
    ``len(windows)`` means none fits (take the dense path), except that a static
    grid, or a window as long as the map, always fits.
    """
    if grid.static_count is not None:
        return jnp.asarray(0, jnp.int32)
    _, rows = row_window(grid)
    need = jnp.max(jnp.where(live, rows, 0))
    index = jnp.sum((need > jnp.asarray(windows)).astype(jnp.int32))
    if windows[-1] >= grid.length:
        index = jnp.minimum(index, len(windows) - 1)
    return index


def window_class(grid: AxisGrid, windows: tuple[int, ...], live: Array) -> Array:
    """Each box's index of the smallest of ``windows`` (ascending) that its live
    bins fit, ``[K]`` int32: :func:`window_choice` box by box (the call's choice
    is the largest of them)."""
    k = grid.first.shape[0]
    if grid.static_count is not None:
        return jnp.zeros((k,), jnp.int32)
    _, rows = row_window(grid)
    need = jnp.max(jnp.where(live, rows, 0), axis=-1)
    index = jnp.sum((need[:, None] > jnp.asarray(windows)).astype(jnp.int32), axis=-1)
    if windows[-1] >= grid.length:
        index = jnp.minimum(index, len(windows) - 1)
    return index


def every_row(length: int, lead: tuple[int, ...]) -> Array:
    """``0 .. length - 1`` along a new last axis, broadcast to ``lead``, int32.

    Not a constant to XLA: on a constant index grid of ``[K, P, L]`` XLA
    evaluated the weights' integer and float arithmetic while compiling
    (constant folding; the dense weights of box_p4_adaptive alone: 0.95 s to
    compile, 0.38 s with the indices behind the barrier).
    """
    rows = jax.lax.optimization_barrier(jnp.arange(length, dtype=jnp.int32))
    return jnp.broadcast_to(rows, lead + (length,))


def dense_weights(grid: AxisGrid) -> Array:
    """Weights over every row of the map, ``[K, P, L]``: exact for any grid."""
    if grid.static_count is not None:
        idx, w = sample_taps(grid)
        return taps_to_dense(idx, w, grid.length)
    return grid_row_weights(grid, every_row(grid.length, grid.first.shape))


def taps_to_dense(idx: Array, w: Array, length: int, start: Array | None = None) -> Array:
    """Sums taps ``[K, P, T]`` into dense weights over ``length`` rows from ``start`` ``[K]``."""
    rows = jnp.arange(length, dtype=jnp.int32)
    rel = idx if start is None else idx - start[:, None, None]
    onehot = rel[..., None] == rows  # [K, P, T, length]
    return jnp.sum(jnp.where(onehot, w[..., None], 0.0), axis=-2)


def taps_span(idx: Array, live: Array) -> tuple[Array, Array]:
    """First row and number of rows ``[K]`` (int32) that hold every tap ``[K, P, T]``
    of the live samples ``[K, P]`` (``[K, P, T]`` also works): a tap of weight 0
    too, since its weight's derivative need not be 0. No live sample: 0 rows."""
    live = jnp.broadcast_to(live if live.ndim == idx.ndim else live[..., None], idx.shape)
    first = jnp.min(jnp.where(live, idx, jnp.iinfo(jnp.int32).max), axis=(1, 2))
    count = jnp.maximum(jnp.max(jnp.where(live, idx, -1), axis=(1, 2)) - first + 1, 0)
    return jnp.where(count > 0, first, 0).astype(jnp.int32), count.astype(jnp.int32)


def tap_span(grid: AxisGrid, live: Array | None = None) -> tuple[Array, Array]:
    """First row and number of rows ``[K]`` (int32) that hold every tap of each box.

    Every row whose weight, or whose weight's derivative, can be nonzero lies in
    ``[first, first + count)``: for a static grid the low and high neighbour of
    every sample inside ``[-1, L]`` (a high neighbour of weight 0 still carries a
    gradient), for an adaptive grid each bin's :func:`row_window`. ``live`` ``[K]``
    masks boxes that read nothing (they get ``count = 0``).
    """
    big = jnp.iinfo(jnp.int32).max
    if grid.static_count is not None:
        dtype = grid.first.dtype
        length = _limit3(grid, dtype)
        y = sample_positions(grid, jnp.arange(grid.static_count, dtype=dtype))
        valid = (y >= -1.0) & (y <= length)
        low = jnp.floor(jnp.maximum(jnp.where(valid, y, 0.0), 0.0))
        low = jnp.minimum(low, length - 1.0)
        high = jnp.minimum(low + 1.0, length - 1.0)
        first = jnp.min(jnp.where(valid, low.astype(jnp.int32), big), axis=(1, 2))
        last = jnp.max(jnp.where(valid, high.astype(jnp.int32), -1), axis=(1, 2))
    else:
        rows, need = row_window(grid)
        used = need > 0
        first = jnp.min(jnp.where(used, rows, big), axis=1)
        last = jnp.max(jnp.where(used, rows + need - 1, -1), axis=1)
    count = jnp.maximum(last - first + 1, 0)
    if live is not None:
        count = jnp.where(live, count, 0)
    first = jnp.where(count > 0, first, 0)
    return first.astype(jnp.int32), count.astype(jnp.int32)


# ---------------------------------------------------------------------------
# Several adaptive grids at once (both axes, a call's windows and dense rows):
# one closed form in the program instead of one per axis and use. XLA compiles
# each copy of the closed form on its own (hundreds of fused elementwise ops):
# box_p4_adaptive's programs are 10-27% smaller with one copy.
# ---------------------------------------------------------------------------


def _bins(grid: AxisGrid) -> AxisGrid:
    """The grid with every field per bin, ``[K, P]``, and the map length each bin
    sees as an explicit extent (the same numbers)."""
    shape = grid.first.shape

    def per_bin(a: Array) -> Array:
        return jnp.broadcast_to(a, shape)

    extent = grid.extent if grid.extent is not None else float(grid.length)
    return AxisGrid(
        grid.first,
        per_bin(grid.bin),
        per_bin(grid.count),
        None,
        grid.length,
        per_bin(jnp.asarray(extent, grid.first.dtype)),
        grid.valid,
        grid.rows,
    )


def _concat(grids: list[AxisGrid]) -> AxisGrid:
    """The bins of several grids of the same boxes side by side, ``[K, sum P]``
    (per-bin fields, :func:`_bins`). The boxes stay the leading axis, so boxes
    sharded over devices stay sharded."""

    def cat(parts: list[Any]) -> Any:
        if any(p is None for p in parts):
            return None
        if isinstance(parts[0], tuple):
            return tuple(jnp.concatenate(q, axis=1) for q in zip(*parts, strict=True))
        return jnp.concatenate(parts, axis=1)

    return AxisGrid(
        cat([g.first for g in grids]),
        cat([g.bin for g in grids]),
        cat([g.count for g in grids]),
        None,
        max(g.length for g in grids),
        cat([g.extent for g in grids]),
        cat([g.valid for g in grids]),
        cat([g.rows for g in grids]),
    )


def _split(joint: Array, grids: list[AxisGrid]) -> list[Array]:
    """``[K, sum P, ...]`` back to each grid's ``[K, P, ...]``."""
    out, start = [], 0
    for g in grids:
        p = g.first.shape[1]
        out.append(joint[:, start : start + p])
        start += p
    return out


def with_geometry(*grids: AxisGrid) -> tuple[AxisGrid, ...]:
    """The grids carrying their :func:`valid_range` and :func:`row_window`, computed
    for all adaptive grids together (one closed form in the program). Static grids
    are returned as they are. The numbers are those of the per-grid functions."""
    todo = [g for g in grids if g.static_count is None and (g.valid is None or g.rows is None)]
    if not todo:
        return grids
    if all(g.valid is None for g in todo):
        safe = _concat([_bins(_with_samples(g)[0]) for g in todo])
        valid = valid_range(safe)
        todo = [
            dataclasses.replace(g, valid=(lo, hi))
            for g, lo, hi in zip(todo, *(_split(v, todo) for v in valid), strict=True)
        ]
    else:
        todo = [with_valid_range(g) for g in todo]
    first_row, need = row_window(_concat([_bins(g) for g in todo]))
    done = iter(
        dataclasses.replace(g, rows=(r, n))
        for g, r, n in zip(todo, _split(first_row, todo), _split(need, todo), strict=True)
    )
    return tuple(
        next(done) if g.static_count is None and (g.valid is None or g.rows is None) else g
        for g in grids
    )


def closed_form(
    grids: tuple[AxisGrid, ...], *, taps: tuple[int, ...] | None = None, dense: bool = False
) -> tuple[list[tuple[Array, Array]] | None, list[Array] | None]:
    """``(window taps, dense weights)`` of adaptive grids from one evaluation of
    :func:`grid_row_weights`: for grid ``i`` the taps of a ``taps[i]``-row window
    (as :func:`window_taps`) and, with ``dense``, its weights over every row (as
    :func:`dense_weights`). Either part is ``None`` when not asked for. The grids
    should carry their geometry (:func:`with_geometry`)."""
    grids = with_geometry(*grids)
    windows = [] if taps is None else [_window_rows(g, t) for g, t in zip(grids, taps, strict=True)]
    pieces = []
    for i, g in enumerate(grids):
        parts = windows[i : i + 1]
        if dense:
            parts.append(every_row(g.length, g.first.shape))
        pieces.append(jnp.concatenate(parts, axis=-1))
    width = max(r.shape[-1] for r in pieces)
    # Rows -1 pad the shorter lists: outside the map, weight 0.
    pad = [((0, 0), (0, 0), (0, width - r.shape[-1])) for r in pieces]
    rows = jnp.concatenate(
        [jnp.pad(r, w, constant_values=-1) for r, w in zip(pieces, pad, strict=True)], axis=1
    )
    weights = _split(grid_row_weights(_concat([_bins(g) for g in grids]), rows), list(grids))
    tap_out: list[tuple[Array, Array]] | None = None
    dense_out: list[Array] | None = None
    if taps is not None:
        tap_out = [
            (_into_map(g, window), w[..., :t])
            for g, t, window, w in zip(grids, taps, windows, weights, strict=True)
        ]
    if dense:
        offsets = taps if taps is not None else (0,) * len(grids)
        dense_out = [
            w[..., t : t + g.length] for g, t, w in zip(grids, offsets, weights, strict=True)
        ]
    return tap_out, dense_out


def _both(gy: AxisGrid, gx: AxisGrid, windows: tuple[int, int] | None) -> tuple[Any, Any]:
    """Window taps (``windows`` given) or dense weights of both axes: static grids
    per axis, the adaptive ones from one :func:`closed_form`."""
    grids = (gy, gx)
    out: list[Any] = [
        None
        if g.static_count is None
        else (dense_weights(g) if windows is None else axis_taps(g, windows[i]))
        for i, g in enumerate(grids)
    ]
    adaptive = [i for i, g in enumerate(grids) if g.static_count is None]
    if adaptive:
        some = tuple(grids[i] for i in adaptive)
        found: list[Any] | None
        if windows is None:
            _, found = closed_form(some, dense=True)
        else:
            found, _ = closed_form(some, taps=tuple(windows[i] for i in adaptive))
        assert found is not None
        for i, value in zip(adaptive, found, strict=True):
            out[i] = value
    return out[0], out[1]


def both_taps(
    gy: AxisGrid, gx: AxisGrid, windows: tuple[int, int]
) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """:func:`axis_taps` of both axes (``windows`` rows / columns per bin for
    adaptive grids), the adaptive axes' closed form evaluated once for both."""
    return _both(gy, gx, windows)


def both_dense(gy: AxisGrid, gx: AxisGrid) -> tuple[Array, Array]:
    """:func:`dense_weights` of both axes, the adaptive axes' closed form
    evaluated once for both."""
    return _both(gy, gx, None)


def groups(key: Array, count: int) -> tuple[Array, Array, Array]:
    """Boxes grouped by ``key [K]`` (values ``0 .. count - 1``): ``(order, starts,
    ends)``, boxes ``order[starts[i]:ends[i]]`` (in their own order) being those
    of key ``i`` (a stable sort; int32)."""
    order = jnp.argsort(key, stable=True).astype(jnp.int32)
    sizes = jnp.sum(key[None, :] == jnp.arange(count, dtype=key.dtype)[:, None], axis=1)
    ends = jnp.cumsum(sizes).astype(jnp.int32)
    return order, ends - sizes.astype(jnp.int32), ends


def by_level(values, level: Array, dtype) -> Array:
    """``values[level]`` for a short static table (one value per FPN level or map),
    by selects: no gather, and the result is typed (sharded) like ``level``."""
    out = jnp.zeros_like(level, dtype=dtype)
    for i, v in enumerate(np.asarray(values).tolist()):
        out = jnp.where(level == i, jnp.asarray(v, dtype), out)
    return out


def box_grids(
    coords: Array,
    ok: Array,
    pooled: tuple[int, int],
    size: tuple[int, int],
    *,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: Any,
) -> tuple[AxisGrid, AxisGrid]:
    """The y and x sample grids of axis-aligned boxes ``coords [K, 4]`` ``(x1, y1, x2,
    y2)`` (image coordinates), boxes not ``ok`` made harmless (all zeros)."""
    coords = jnp.where(ok[:, None], coords.astype(dtype), 0.0)
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))
    common: dict[str, Any] = dict(
        spatial_scale=spatial_scale,
        offset=0.5 if aligned else 0.0,
        min_size=None if aligned else 1.0,
        sampling_ratio=sampling_ratio,
    )
    gy = axis_grid(y1, y2, pooled=pooled[0], length=size[0], **common)
    gx = axis_grid(x1, x2, pooled=pooled[1], length=size[1], **common)
    return gy, gx
