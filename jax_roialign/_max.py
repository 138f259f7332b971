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
   apart. That range is scanned in tiles of ``TILE x TILE`` samples by a
   ``while_loop`` whose trip count is what the largest bin needs (one tile for
   ordinary boxes). The samples outside the range read 0; when a bin has any,
   a 0 takes part in the max (as do invalid samples inside the range).
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
from ._validation import DataFormat

Array = jax.Array

#: Samples per axis scanned per step of the adaptive search.
TILE = 2


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
) -> Array:
    """``sum_uv wy_u wx_v F[b, iy_u, ix_v]`` for broadcastable tap arrays.

    Without ``channel`` it returns ``[..., C]``; with ``channel`` (an index array
    broadcastable with the taps, the last axis being C) it reads one channel per
    element, for per-channel positions.
    """
    y_low, y_high, wy_low, wy_high = y_taps
    x_low, x_high, wx_low, wx_high = x_taps
    shape = jnp.broadcast_shapes(y_low.shape, x_low.shape)

    def stack(*parts):
        return jnp.stack([jnp.broadcast_to(p, shape) for p in parts], axis=-1)

    rows = stack(y_low, y_low, y_high, y_high)
    cols = stack(x_low, x_high, x_low, x_high)
    w = stack(wy_low * wx_low, wy_low * wx_high, wy_high * wx_low, wy_high * wx_high)
    b = jnp.expand_dims(b, -1)
    if channel is None:
        v = _read(features, layout, b, rows, cols).astype(dtype)  # [..., 4, C]
        return jnp.sum(w[..., None] * v, axis=-2)
    v = _read_channel(features, layout, b, rows, cols, channel[..., None]).astype(dtype)
    return jnp.sum(w * v, axis=-1)


def _read(features: Array, layout: DataFormat, b: Array, iy: Array, ix: Array) -> Array:
    if layout is DataFormat.NHWC:
        return features[b, iy, ix]
    return features[b, :, iy, ix]


def _read_channel(features, layout, b, iy, ix, c):
    if layout is DataFormat.NHWC:
        return features[b, iy, ix, c]
    return features[b, c, iy, ix]


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
) -> Array:
    """Max over each bin's bilinear samples, ``[K, PH, PW, C]``, for any pair of axis grids.

    ``ok`` ``[K, 1, 1]`` (0 or 1) zeroes invalid boxes. An empty grid gives 0.
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
    ty = gy.static_count if gy.static_count is not None else TILE
    tx = gx.static_count if gx.static_count is not None else TILE

    def scan_tile(carry, oy, ox):
        """Folds the samples ``start + o + [0, t)`` of both axes into the running max."""
        best, bi, bj = carry
        for a in range(ty):
            iy = oy + a
            y_taps = _tile_taps(sgy, start_y + iy)
            y_taps = tuple(t[:, :, None] for t in y_taps)
            in_y = (iy < n_y)[:, :, None]
            for t in range(tx):
                jx = ox + t
                x_taps = _tile_taps(sgx, start_x + jx)
                x_taps = tuple(v[:, None, :] for v in x_taps)
                inside = (in_y & (jx < n_x)[:, None, :])[..., None]
                val = bilinear_2d(sfeat, layout, b, y_taps, x_taps, dtype)
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
        best, bi, bj = scan_tile(init, zero, zero)
    else:
        live = ok[:, :, 0] > 0
        m_y = jnp.ceil(jnp.max(jnp.where(live, n_y, 0.0), initial=0.0) / ty)
        m_x = jnp.maximum(jnp.ceil(jnp.max(jnp.where(live, n_x, 0.0), initial=0.0) / tx), 1.0)

        def cond(state):
            return state[0] < m_y * m_x

        def body(state):
            t, carry = state
            a = jnp.floor(t / m_x)
            bb = t - a * m_x
            return t + 1.0, scan_tile(carry, a * ty, bb * tx)

        _, (best, bi, bj) = jax.lax.while_loop(cond, body, (zero, init))

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


def window_max(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    dtype: Any,
    *,
    pallas: bool = False,
) -> Array:
    """:func:`aggregate_max` for fixed grids through the box-local window reader (the
    TPU path: no gather or scatter). Every sample is a one-sample bin of its own
    (dense weights of its two taps per axis), read through one window per box
    (:func:`._window.contract_window`); the first largest of each bin's
    ``s_y x s_x`` samples (scan order, as the search's) is picked by a one-hot
    select, so the gradient goes to that sample only, and through its weights to
    the box. Invalid samples read 0 and take part, as in :func:`aggregate_max`.
    """
    from ._window import read_taps

    def taps(grid: _sampling.AxisGrid):
        s = grid.static_count
        assert s is not None
        y = _sampling.sample_positions(grid, jnp.arange(s, dtype=grid.first.dtype))  # [K, P, s]
        return point_tap_table(y, grid.length, inside(y, grid.length) & (ok[:, :, :1] > 0))

    values = read_taps([features], layout, batch, taps(gy), taps(gx), dtype, pallas=pallas)
    # [K, PH * s_y, PW * s_x, C]
    (k, ph), pw = gy.first.shape, gx.first.shape[1]
    sy, sx = gy.static_count, gx.static_count
    assert sy is not None and sx is not None
    c = values.shape[-1]
    v = values.reshape(k, ph, sy, pw, sx, c).transpose(0, 1, 3, 5, 2, 4).reshape(k, ph, pw, c, -1)
    first = jnp.argmax(jax.lax.stop_gradient(v), axis=-1)  # scan order: the first largest
    pick = first[..., None] == jnp.arange(sy * sx)
    return jnp.sum(jnp.where(pick, v, 0.0), axis=-1) * ok[..., None]
