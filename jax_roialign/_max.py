"""Max mode: the largest bilinearly interpolated sample of each bin (mmcv's ``pool_mode='max'``).

The max does not factorise per axis, so it works on the 2-D samples. It is
computed in two steps:

1. *Search* (no gradient): the index ``(i, j)`` of the largest sample of every
   bin and channel, found by scanning a window of samples. For a fixed grid the
   window is the whole ``s x s`` grid. For an adaptive grid (``ceil(bin size)``
   samples per axis, unbounded) only the samples inside ``[-1, L]`` matter: they
   form an index range per bin (:func:`_sampling.valid_range`, widened by one
   sample at each end and tested sample by sample), at most
   about ``2 L + 3`` long because adaptive samples are more than half a cell
   apart. That range is scanned in tiles of ``TUNING.max_tile`` samples per
   axis, each box as many tiles as its own largest bin needs: the boxes sorted
   by that count and scanned in chunks, each by a ``while_loop`` (one tile for
   small boxes; a large box costs its own chunk, not every box). The samples
   outside the range read 0; when a bin has any, a 0 takes part in the max (as
   do invalid samples inside the range).
2. *Read*: the winning sample is read again, differentiably, from the features
   and the box geometry. The forward value is the same number; the gradient
   goes to the four neighbours of the arg-max sample (as mmcv's backward) and,
   through its position, to the box.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _sampling, _shard
from ._contract import read, rows_by_cost
from ._tuning import TUNING
from ._validation import DataFormat
from ._window import _row, _set_row

Array = jax.Array


def inside(y: Array, length: int) -> Array:
    """Whether positions ``y`` are read at all: ``-1 <= y <= L`` (False for NaN)."""
    return (y >= -1.0) & (y <= float(length))


def point_tap_table(y: Array, length: int, live: Array) -> tuple[Array, Array, Array]:
    """:func:`point_taps` of positions ``y [K, ...]`` as a tap table of the window
    reader: ``idx, w [K, S, 2]`` (low, high) and ``live [K, S]``, ``S`` the
    positions of a box in row-major order and ``live [K, ...]`` those that count."""
    k = y.shape[0]
    low, high, w_low, w_high = point_taps(y, length)
    idx = jnp.stack([low, high], axis=-1).reshape(k, -1, 2)
    w = jnp.stack([w_low, w_high], axis=-1).reshape(k, -1, 2)
    return idx, w, live.reshape(k, -1)


def point_taps(y: Array, length: int) -> tuple[Array, Array, Array, Array]:
    """torchvision's bilinear rule for positions ``y`` (any shape) on an axis of ``length``.

    Returns ``low, high`` (int32 indices) and their weights ``w_low, w_high``.
    Outside ``[-1, L]`` (or NaN) both weights are 0; else ``y`` is clamped to
    ``>= 0`` and at or past ``L - 1`` both neighbours are ``L - 1``.
    """
    valid = inside(y, length)
    u = jnp.maximum(jnp.where(valid, y, 0.0), 0.0)
    low = jnp.floor(u)
    at_end = low >= length - 1
    low = jnp.where(at_end, float(length - 1), low)
    frac = jnp.where(at_end, 0.0, u - low)
    high = jnp.where(at_end, low, low + 1.0)
    zero = jnp.zeros_like(frac)
    w_low = jnp.where(valid, 1.0 - frac, zero)
    w_high = jnp.where(valid, frac, zero)
    return low.astype(jnp.int32), high.astype(jnp.int32), w_low, w_high


def bilinear_2d(
    features: Array,
    layout: DataFormat,
    b: Array,
    y_taps: tuple[Array, Array, Array, Array],
    x_taps: tuple[Array, Array, Array, Array],
    dtype: Any,
    channel: Array | None = None,
    flat_index: bool = True,
) -> Array:
    """``sum_uv wy_u wx_v F[b, iy_u, ix_v]`` for broadcastable tap arrays.

    Without ``channel`` it returns ``[..., C]``; with ``channel`` (an index array
    broadcastable with the taps, the last axis being C) it reads one channel per
    element, for per-channel positions (``flat_index``: :func:`_per_channel`).
    """
    if channel is not None:
        return _per_channel(features, layout, b, y_taps, x_taps, dtype, channel, flat_index)
    rows, cols, w = _four_taps(y_taps, x_taps)
    b = jnp.expand_dims(b, -1)
    v = read(features, layout, b, rows, cols).astype(dtype)  # [..., 4, C]
    return jnp.sum(w[..., None] * v, axis=-2)


def _four_taps(y_taps, x_taps, *shapes):
    """``(rows, cols, weights)``, each ``[..., 4]`` (broadcast with ``shapes``):
    the taps (low, low), (low, high), (high, low), (high, high) of each point."""
    y_low, y_high, wy_low, wy_high = y_taps
    x_low, x_high, wx_low, wx_high = x_taps
    shape = jnp.broadcast_shapes(y_low.shape, x_low.shape, *shapes)

    def stack(*parts):
        return jnp.stack([jnp.broadcast_to(p, shape) for p in parts], axis=-1)

    rows = stack(y_low, y_low, y_high, y_high)
    cols = stack(x_low, x_high, x_low, x_high)
    w = stack(wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high)
    return rows, cols, w


def _per_channel(features, layout, b, y_taps, x_taps, dtype, channel, flat_index):
    """:func:`bilinear_2d` with one channel per element: the four taps of every
    element one gather of single elements, summed in tap order. ``flat_index``:
    by one int32 index per tap into the flattened map (lean: four coordinates
    per tap were the bulk of max mode's memory; and its transpose is a
    one-dimensional scatter-add, twice as fast), else by coordinates (faster
    for a forward alone: XLA:CPU fuses the flat index's arithmetic into the
    gather, once per tap)."""
    rows, cols, w = _four_taps(y_taps, x_taps, channel.shape)
    b, ch = jnp.expand_dims(b, -1).astype(jnp.int32), channel[..., None]
    nhwc = layout is DataFormat.NHWC
    if not flat_index or features.size >= 2**31:  # (a flat int32 index would overflow)
        v = features[b, rows, cols, ch] if nhwc else features[b, ch, rows, cols]
    elif nhwc:
        _, h, w_, c = features.shape
        v = jnp.take(features.reshape(-1), ((b * h + rows) * w_ + cols) * c + ch, mode="clip")
    else:
        _, c, h, w_ = features.shape
        v = jnp.take(features.reshape(-1), ((b * c + ch) * h + rows) * w_ + cols, mode="clip")
    return jnp.sum(w * v.astype(dtype), axis=-1)


def _search_window(grid: _sampling.AxisGrid) -> tuple[Array, Array, Array]:
    """``(start, n, total)`` per bin ``[K, P]``: the sample indices to scan and the grid size.

    Fixed grid: all ``s`` samples (the invalid ones read 0 by themselves).
    Adaptive grid: the exact range of the samples inside ``[-1, L]``.
    """
    if grid.static_count is not None:
        shape = grid.first.shape
        s = float(grid.static_count)
        return jnp.zeros(shape, grid.first.dtype), jnp.full(shape, s), jnp.full(shape, s)
    has = grid.count >= 1.0
    safe = _sampling.AxisGrid(
        jnp.where(has, grid.first, 0.0),
        jnp.where(has, grid.bin, 1.0),
        grid.count,
        None,
        grid.length,
    )
    lo, hi = _sampling.valid_range(safe)
    # One more sample at each end: a sample on -1 or L exactly may be rounded
    # either way by a differently fused computation; the search tests it itself.
    lo = jnp.maximum(lo - 1.0, 0.0)
    hi = jnp.minimum(hi + 1.0, safe.count)
    n = jnp.where(has, hi - lo, 0.0)
    total = jnp.broadcast_to(jnp.where(has, grid.count, 0.0), lo.shape)
    return lo, n, total


def _tile_taps(grid: _sampling.AxisGrid, idx: Array) -> tuple[Array, Array, Array, Array]:
    """Taps of samples ``idx`` ``[K, P]`` (float sample indices) of ``grid``."""
    y = _sampling.sample_positions(grid, idx[..., None])[..., 0]
    return point_taps(y, grid.length)


def aggregate_max(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    dtype: Any,
    *,
    flat_index: bool = True,
) -> Array:
    """Max over each bin's bilinear samples, ``[K, PH, PW, C]``, for any pair of axis grids.

    ``ok`` ``[K, 1, 1]`` (0 or 1) zeroes invalid boxes. An empty grid gives 0.
    ``flat_index``: how the winners are read again (:func:`_per_channel`; the
    same numbers).
    """
    k, ph = gy.first.shape
    pw = gx.first.shape[1]
    c = features.shape[-1] if layout is DataFormat.NHWC else features.shape[1]
    b = batch[:, None, None]

    # -- 1. search, without gradient ------------------------------------------
    sgy = jax.tree_util.tree_map(jax.lax.stop_gradient, gy)
    sgx = jax.tree_util.tree_map(jax.lax.stop_gradient, gx)
    sfeat = jax.lax.stop_gradient(features)
    start_y, n_y, tot_y = _search_window(sgy)
    start_x, n_x, tot_x = _search_window(sgx)
    static = gy.static_count is not None and gx.static_count is not None
    ty = gy.static_count if gy.static_count is not None else TUNING.max_tile
    tx = gx.static_count if gx.static_count is not None else TUNING.max_tile

    def scan_tile(carry, oy, ox, box):
        """Folds the samples ``start + o + [0, t)`` of both axes of boxes ``box``
        (an index array, or every box) into their running max ``carry``."""
        best, bi, bj = carry
        sy, sx = (jax.tree.map(lambda a: a[box], g) for g in (sgy, sgx))
        for a in range(ty):
            iy = oy + a
            y_taps = _tile_taps(sy, start_y[box] + iy)
            y_taps = tuple(t[:, :, None] for t in y_taps)
            in_y = (iy < n_y[box])[:, :, None]
            for t in range(tx):
                jx = ox + t
                x_taps = _tile_taps(sx, start_x[box] + jx)
                x_taps = tuple(v[:, None, :] for v in x_taps)
                inside = (in_y & (jx < n_x[box])[:, None, :])[..., None]
                val = bilinear_2d(sfeat, layout, b[box], y_taps, x_taps, dtype)
                better = inside & (val > best)
                best = jnp.where(better, val, best)
                bi = jnp.where(better, iy, bi)
                bj = jnp.where(better, jx, bj)
        return best, bi, bj

    shape = (k, ph, pw, c)
    init = (
        jnp.full(shape, -jnp.inf, dtype),
        jnp.zeros(shape, dtype),
        jnp.zeros(shape, dtype),
    )
    init = _shard.varying(init, features, batch, ok, gy, gx)
    zero = jnp.zeros((), dtype)
    if static:
        best, bi, bj = scan_tile(init, zero, zero, slice(None))
    else:
        best, bi, bj = _search_by_cost(scan_tile, init, n_y, n_x, ty, tx, dtype)

    # -- 2. read the winner again, differentiably ----------------------------
    def positions(grid, start, idx, axis):
        # idx [K, PH, PW, C] sample index along `axis` (1: y, 2: x) -> positions.
        first = jnp.expand_dims(grid.first, 3 - axis)[..., None]
        bin_size = grid.bin[:, :, None, None]
        count = jnp.maximum(grid.count, 1.0)[:, :, None, None]
        st = jnp.expand_dims(start, 3 - axis)[..., None]
        i = jax.lax.stop_gradient(st + idx)
        return first + ((i + 0.5) * bin_size) / count

    y = positions(gy, start_y, bi, 1)
    x = positions(gx, start_x, bj, 2)
    ch = jnp.arange(c, dtype=jnp.int32)
    value = bilinear_2d(
        features,
        layout,
        batch[:, None, None, None],
        point_taps(y, gy.length),
        point_taps(x, gx.length),
        dtype,
        channel=ch,
        flat_index=flat_index,
    )
    # Samples outside the windows read 0; those inside were scanned (the invalid
    # ones among them as 0). The forward value is the search's own maximum (so
    # it agrees with its choice); the gradient is the re-read sample's.
    n_window = (n_y[:, :, None] * n_x[:, None, :])[..., None]
    total = (tot_y[:, :, None] * tot_x[:, None, :])[..., None]
    zero_wins = (n_window < total) & ~(best >= 0)
    value = best + (value - jax.lax.stop_gradient(value))
    out = jnp.where((total > 0) & ~zero_wins, value, 0.0)
    return out * ok[..., None]


def _search_by_cost(scan_tile, init, n_y, n_x, ty: int, tx: int, dtype):
    """The adaptive search, each box scanning as many tiles as its own bins need.

    The boxes are sorted by their tile count and scanned in chunks
    (:func:`._contract.rows_by_cost`), each chunk by a ``while_loop`` of its
    costliest box's count (one box larger than the map no longer makes every
    box scan its range). A box's tiles are visited in the same order whatever
    the loop's count (row by row, left to right: tile ``(a, b)`` before ``(a',
    b')`` iff ``(a, b) < (a', b')``), so each box finds the same winner."""
    # Boxes not ``ok`` have all-zero coordinates (a count of 1 at most).
    m_y = jnp.ceil(jnp.max(n_y, axis=1) / ty)  # [K]
    m_x = jnp.maximum(jnp.ceil(jnp.max(n_x, axis=1) / tx), 1.0)
    zero = jnp.zeros((), dtype)

    def read(box):
        rows_y, rows_x = jnp.max(m_y[box]).astype(dtype), jnp.max(m_x[box]).astype(dtype)

        def body(state):
            t, part = state
            a = jnp.floor(t / rows_x)
            return t + 1.0, scan_tile(part, a * ty, (t - a * rows_x) * tx, box)

        part = tuple(x[box] for x in init)
        return jax.lax.while_loop(lambda s: s[0] < rows_y * rows_x, body, (zero, part))[1]

    row_bytes = 3 * init[0][0].size * init[0].dtype.itemsize
    return rows_by_cost(m_y * m_x, row_bytes, read, init)


def window_max(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    dtype: Any,
) -> Array:
    """:func:`aggregate_max` through the box-local window reader (the TPU path: no
    gather or scatter), for fixed and adaptive grids.

    The same search and the same numbers, read in blocks: a block is
    ``t_y x t_x`` samples of every bin (the whole ``s x s`` grid for a fixed grid,
    one block; ``TILE x TUNING.max_tile`` samples of the search range for an adaptive one, as
    many blocks as the largest bin needs, in :func:`aggregate_max`'s tile order).
    Each sample is a point with its two taps per axis, read through one window per
    box (:func:`._window.fold_taps`), and each box's block is folded at once into
    the running maximum and the index of its first largest sample (strictly
    larger wins, so the scan order decides ties; NaN never wins). No per-sample
    array exists for all boxes: the forward holds the maximum and the index.

    Non-finite features: the window is contracted whole (on a TPU, by the MXU),
    so a NaN or an infinity in the cells a box's window reads makes the box's
    samples NaN, and the bins NaN (with no gradient), where the gather path of
    :func:`aggregate_max` confines it to the samples that touch it.

    The gradient goes to the winning sample alone (:func:`_winner_ops`): the
    blocks are read again as their transpose with each box's cotangent kept at its
    winners (:func:`._window.taps_vjp`), which gives the feature gradient and the
    gradient of the winners' tap weights, and through those the box gradient.
    First order (the folds are loops with data-dependent trip counts).
    """
    from ._window import fold_taps

    c = features.shape[-1] if layout is DataFormat.NHWC else features.shape[1]
    blocks = _Blocks(gy, gx, ok, c)
    sfeat = jax.lax.stop_gradient(features)
    k, ph, pw, _ = blocks.out_shape

    def body(blk, carry):
        taps_y, taps_x, code = blk

        def emit(i, v, carry):
            best, where = carry
            v, codes = blocks.split(v, i, code)
            top = jnp.max(v, axis=(1, 3))  # NaN if the window read a non-finite cell
            first = jnp.min(jnp.where(v == top[:, None, :, None], codes, _NONE), axis=(1, 3))
            b, w = _row(best, i), _row(where, i)
            # An earlier block keeps equal values; a NaN stays (and has no winner).
            better = (top > b) | jnp.isnan(top)
            return _set_row(best, i, jnp.where(better, top, b)), _set_row(
                where, i, jnp.where(better, first, w)
            )

        return fold_taps([sfeat], layout, blocks.batch(batch), taps_y, taps_x, dtype, emit, carry)

    init = (jnp.full((k, ph, pw, c), -jnp.inf, dtype), jnp.zeros((k, ph, pw, c), jnp.int32))
    init = _shard.varying(init, features, batch, ok, gy, gx)
    best, where = blocks.fold(body, init)
    aux = (jax.lax.stop_gradient(batch), where, blocks.sgy, blocks.sgx, jax.lax.stop_gradient(ok))
    value = _winner_ops(layout, c, dtype)(features, gy.first, gy.bin, gx.first, gx.bin, best, aux)
    # As aggregate_max: outside the search ranges a bin's samples read 0, and a 0
    # takes part when the range does not cover the whole grid.
    n_window = (blocks.n_y[:, :, None] * blocks.n_x[:, None, :])[..., None]
    total = (blocks.tot_y[:, :, None] * blocks.tot_x[:, None, :])[..., None]
    zero_wins = (n_window < total) & (best < 0)
    out = jnp.where((total > 0) & ~zero_wins, value, 0.0)
    return out * ok[..., None]


_NONE = jnp.iinfo(jnp.int32).max


def block_counts(n_y: Array, n_x: Array, live: Array, t_y: int, t_x: int) -> tuple[Array, Array]:
    """Blocks of ``t_y x t_x`` samples per axis (int32) that cover the longest
    range ``n [K, P]`` of a live box (``live`` broadcastable against ``n``); at
    least one block across, so an empty call still runs one (empty) block."""
    m_y = jnp.ceil(jnp.max(jnp.where(live, n_y, 0.0), initial=0.0) / t_y)
    m_x = jnp.ceil(jnp.max(jnp.where(live, n_x, 0.0), initial=0.0) / t_x)
    return m_y.astype(jnp.int32), jnp.maximum(m_x, 1.0).astype(jnp.int32)


class _Blocks:
    """The blocks of samples :func:`window_max` reads, and their order.

    Block ``(u, v)`` holds the samples ``start + u * t_y + [0, t_y)`` of every
    row of bins and ``start + v * t_x + [0, t_x)`` of every column (``start`` the
    search range's first sample, :func:`_search_window`); samples past the range
    are read but never win. A sample is coded ``i * stride + j`` (``i``, ``j`` its
    indices from ``start``), so one int32 names a bin's winner.
    """

    def __init__(self, gy, gx, ok, c: int):
        sgy = jax.tree_util.tree_map(jax.lax.stop_gradient, gy)
        sgx = jax.tree_util.tree_map(jax.lax.stop_gradient, gx)
        self.sgy, self.sgx = sgy, sgx
        self.start_y, self.n_y, self.tot_y = _search_window(sgy)
        self.start_x, self.n_x, self.tot_x = _search_window(sgx)
        self.static = gy.static_count is not None and gx.static_count is not None
        self.t_y = gy.static_count if gy.static_count is not None else TUNING.max_tile
        self.t_x = gx.static_count if gx.static_count is not None else TUNING.max_tile
        # A search range is at most about 2 L + 3 samples (module docstring).
        self.stride = self.t_x if self.static else 2 * gx.length + 8
        live = ok[:, 0, 0] > 0
        if self.static:
            self.m_y = self.m_x = jnp.ones((), jnp.int32)
        else:
            self.m_y, self.m_x = block_counts(self.n_y, self.n_x, live[:, None], self.t_y, self.t_x)
        k, ph = gy.first.shape
        pw = gx.first.shape[1]
        self.out_shape = (k, ph, pw, c)
        self.aux = (sgy, sgx, ok, self.start_y, self.n_y, self.start_x, self.n_x)
        self.lengths = (gy.length, gx.length)

    @staticmethod
    def batch(batch: Array) -> Array:
        return jax.lax.stop_gradient(batch)

    def _axis(self, first, bin_size, grid, start, n, o, t: int, length: int, ok):
        """One axis of a block: tap table ``(idx, w [K, P * t, 2], live [K, P * t])``
        and the samples' in-range mask ``[K, P, t]`` (their offsets ``o + [0, t)``)."""
        g = _sampling.AxisGrid(first, bin_size, grid.count, grid.static_count, grid.length)
        i = o + jnp.arange(t, dtype=start.dtype)
        y = _sampling.sample_positions(g, jax.lax.stop_gradient(start[..., None] + i))
        in_range = i < n[..., None]
        live = inside(y, length) & in_range & (ok[:, :, :1] > 0)
        return point_tap_table(y, length, live), in_range

    def taps(self, u, v, first_y=None, bin_y=None, first_x=None, bin_x=None):
        """Block ``(u, v)``: the y and x tap tables and the samples' codes
        ``[K, PH, t_y, PW, t_x]`` (``_NONE`` past a range); the grids' ``first`` and
        ``bin`` may be given (to differentiate the tap weights in them)."""
        sgy, sgx, ok, start_y, n_y, start_x, n_x = self.aux
        oy = jnp.asarray(u * self.t_y).astype(start_y.dtype)
        ox = jnp.asarray(v * self.t_x).astype(start_x.dtype)
        fy = sgy.first if first_y is None else first_y
        by = sgy.bin if bin_y is None else bin_y
        fx = sgx.first if first_x is None else first_x
        bx = sgx.bin if bin_x is None else bin_x
        taps_y, in_y = self._axis(fy, by, sgy, start_y, n_y, oy, self.t_y, self.lengths[0], ok)
        taps_x, in_x = self._axis(fx, bx, sgx, start_x, n_x, ox, self.t_x, self.lengths[1], ok)
        iy = (u * self.t_y + jnp.arange(self.t_y, dtype=jnp.int32))[:, None]
        jx = (v * self.t_x + jnp.arange(self.t_x, dtype=jnp.int32))[None, :]
        codes = iy * self.stride + jx  # [t_y, t_x]
        inside_ = in_y[:, :, :, None, None] & in_x[:, None, None, :, :]
        code = jnp.where(inside_, codes[None, None, :, None, :], _NONE)
        return taps_y, taps_x, code

    def split(self, v: Array, i, code: Array) -> tuple[Array, Array]:
        """Box ``i``'s block ``[PH * t_y, PW * t_x, C]`` as ``[PH, t_y, PW, t_x, C]``
        (samples past a range at ``-inf``), and their codes (same shape)."""
        _, ph, pw, c = self.out_shape
        v = v.reshape(ph, self.t_y, pw, self.t_x, c)
        ci = _row(code, i)[..., None]
        return jnp.where(ci != _NONE, v, -jnp.inf), jnp.broadcast_to(ci, v.shape)

    def fold(self, body, init):
        """``carry = body(block, carry)`` over the blocks in order (row-major)."""
        if self.static:
            return body(self.taps(0, 0), init)

        def step(t, carry):
            u, v = t // self.m_x, t % self.m_x
            return body(self.taps(u, v), carry)

        return jax.lax.fori_loop(0, self.m_y * self.m_x, step, init)


def _winner_ops(layout: DataFormat, c: int, dtype):
    """``value(features, first_y, bin_y, first_x, bin_x, best, aux)``: ``best`` (the
    search's maximum), whose VJP sends each bin's cotangent to its winning sample
    (``aux = (batch, where, ...)``, ``where`` the winners' codes): the feature
    gradient by the blocks' transposed reads, and the gradients of the grids'
    ``first`` and ``bin`` through the winners' tap weights. The blocks are rebuilt
    from ``aux`` (a custom VJP closes over no traced value)."""
    from ._window import taps_vjp

    @jax.custom_vjp
    def value(features, fy, by, fx, bx, best, aux):
        return best

    def fwd(features, fy, by, fx, bx, best, aux):
        return best, (features, fy, by, fx, bx, aux)

    def bwd(res, g):
        features, fy, by, fx, bx, aux = res
        batch, where, sgy, sgx, ok = aux
        blocks = _Blocks(sgy, sgx, ok, c)
        g = g.astype(dtype)
        _, ph, pw, _ = blocks.out_shape
        sfeat = jax.lax.stop_gradient(features)

        def body(t, carry):
            acc, dfy, dby, dfx, dbx = carry
            u, v = t // blocks.m_x, t % blocks.m_x

            def tables(fy, by, fx, bx):
                taps_y, taps_x, _ = blocks.taps(u, v, fy, by, fx, bx)
                return taps_y[1], taps_x[1]

            taps_y, taps_x, code = blocks.taps(u, v)

            def cot(i):  # box i's cotangent of the block's samples
                ci = _row(code, i)[..., None]
                kept = ci == _row(where, i)[:, None, :, None, :]
                out = jnp.where(kept, _row(g, i)[:, None, :, None, :], 0.0)
                return out.reshape(ph * blocks.t_y, pw * blocks.t_x, c)

            (acc,), d_wy, d_wx = taps_vjp(
                [acc], cot, [sfeat], layout, blocks.batch(batch), taps_y, taps_x
            )
            _, vjp = jax.vjp(tables, fy, by, fx, bx)
            d = vjp((d_wy.astype(taps_y[1].dtype), d_wx.astype(taps_x[1].dtype)))
            return (acc,) + tuple(a + b for a, b in zip((dfy, dby, dfx, dbx), d, strict=True))

        zeros = (jnp.zeros(features.shape, dtype),) + tuple(
            jnp.zeros_like(a) for a in (fy, by, fx, bx)
        )
        zeros = _shard.varying(zeros, features, g, fy, by, fx, bx, aux)
        if blocks.static:
            acc, *d = body(jnp.zeros((), jnp.int32), zeros)
        else:
            acc, *d = jax.lax.fori_loop(0, blocks.m_y * blocks.m_x, body, zeros)
        no_aux = jax.tree.map(lambda _: None, aux)
        return (acc.astype(features.dtype), *d, None, no_aux)

    value.defvjp(fwd, bwd)
    return value
