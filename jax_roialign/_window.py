"""How to read, box-locally and without gathers: each box reads one window of its map.

The dense reader (:func:`jax_roialign._contract.contract_dense`) contracts the
interpolation weights of a box with the whole map, ``Wy . F . Wx^T``: no gather,
but work proportional to the map for every box. This reader uses the same dense
weights ``wy [K, PH, H]`` and ``wx [K, PW, W]`` (one source of numbers) and reads
only the rows and columns a box's taps touch: a loop over the boxes in which box
``k`` takes one window ``F[b, y0 : y0 + h, x0 : x0 + w, :]`` by ``dynamic_slice``
(a plain slice with a scalar start, never a gather), slices its weights to the
window the same way, and contracts ``wy[k, :, y0:y0+h] . window . wx[k, :, x0:x0+w]^T``
(two small matmuls, the MXU's work on a TPU).

Windows come in a few static sizes (tiers: 16 and 32 cells, each clipped to
the map), and each box takes the smallest tier that holds its taps, so the
work per box follows its own size. Each tier is a loop of its own over its
boxes (boxes grouped by tier with a stable sort): a ``lax.switch`` per box
would copy the array the loop updates (the output, the map's gradient) for
every box. A box larger than the largest tier reads the rows and columns it spans in
tiles of that size (a loop whose trip count is the box's own), so a box larger
than the map reads the whole map once, a box of 40 cells four tiles, and
nothing is ever truncated. Several maps (FPN levels) are read the same way, each
level with tiers (and loops) of its own.

The feature gradient is the transpose, box by box: ``wy^T . g[k] . wx`` added into
the box's window of a zero map with ``dynamic_update_slice``. The boxes go in
order, so it is the same bits on every run. The weights' gradient reads the
window again. The forward is a ``custom_vjp`` whose VJP is the other two, so
reverse mode takes these loops and never stores a window per box (first order;
higher orders differentiate the plain-JAX implementation, :mod:`._dispatch`).

On batch-sharded features the ops run this reader per device
(:mod:`jax_roialign._shard`). (``jax.experimental.custom_partitioning`` would
let XLA split the loops under automatic sharding too, but the TPU compiler does
not run its partitioning callbacks: jax-ml/jax#38196.)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _sampling, _shard
from ._tuning import TUNING
from ._validation import DataFormat

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def tier_sizes(
    height: int, width: int, base: int = TUNING.base_window, tiers: int = TUNING.tiers
) -> tuple[tuple[int, int, int, int], ...]:
    """The windows of one map, smallest first: ``(h, w, tiles_y, tiles_x)``.

    Sides double from ``base`` (each clipped to the map) for at most ``tiers``
    tiers. Every tier but the last is one ``h x w`` window at the box. The last
    is one window too if it covers the whole map; otherwise it covers the box's
    own span in as many ``h x w`` tiles as that needs, at most ``tiles_y x
    tiles_x`` (those of the whole map). So no window, and no compiled
    contraction, is larger than the largest tier, and a large box reads only
    the cells it spans, rounded up to whole tiles.
    """
    sizes: list[tuple[int, int]] = []
    s = base
    while len(sizes) < tiers:
        sizes.append((min(s, height), min(s, width)))
        if s >= max(height, width):
            break
        s *= 2
    sizes = list(dict.fromkeys(sizes))
    th, tw = sizes[-1]
    last = (th, tw, -(-height // th), -(-width // tw))
    return tuple((h, w, 1, 1) for h, w in sizes[:-1]) + (last,)


def tiles_read(tier: tuple[int, int, int, int], need_y: int, need_x: int) -> int:
    """How many ``h x w`` windows a box spanning ``need_y x need_x`` cells reads in ``tier``."""
    h, w, ny, nx = tier
    if ny * nx == 1:
        return 1
    return max(1, -(-need_y // h)) * max(1, -(-need_x // w))


@functools.lru_cache(maxsize=64)
def _layout(layout: DataFormat, shapes: tuple[tuple[int, ...], ...]):
    """``(heights, widths, channels)`` of the maps in either layout."""
    if layout is DataFormat.NHWC:
        return tuple(s[1] for s in shapes), tuple(s[2] for s in shapes), shapes[0][3]
    return tuple(s[2] for s in shapes), tuple(s[3] for s in shapes), shapes[0][1]


class Plan:
    """Static description of a window read: layouts, map sizes, tiers, dtypes.

    ``points``: each row ``s`` of the weights is one point (a sample, or a bin of
    its own), read as ``out[k, s] = sum_hw wy[k, s, h] wx[k, s, w] F[h, w]``
    (``[K, S, C]``), instead of the separable grid ``[K, PH, PW, C]``. ``taps``:
    the weights are taps ``w [K, S, T]`` at rows ``idx [K, S, T]`` (int tables
    passed with the spans), made dense inside each window, instead of dense
    weights over the whole map. ``group``: points summed per output row (the
    ``group`` consecutive points ``s``, e.g. the samples of one bin), so the
    output is ``[K, S / group, C]``. ``pallas``: the separable read by the
    Pallas kernels of :mod:`jax_roialign._pallas` where they fit. ``prep``: an
    elementwise map applied to every window as it is read, in the compute dtype
    (forward reads only: a read with ``prep`` is not differentiated). ``ps``:
    position-sensitive (R-FCN): the channels are ``C_out x PH x PW`` groups and
    bin ``(p, q)`` keeps only its own group, so each box's ``[PH, PW, C]`` is
    reduced to ``[PH, PW, C_out]`` as it is written (:func:`_keep_own`; the
    cotangent widened back by :func:`_own_cot`), never stored for all boxes.
    ``out_dtype``: the output's dtype (default the compute dtype), each box's
    sums rounded to it as they are written; its cotangent is then widened box by
    box (:func:`_cot_row`), never as a whole. ``by_image``: sum the feature
    gradient of maps narrower than the compute dtype one image at a time
    (:func:`_transpose_by_image`); off for reads whose VJP runs inside another
    loop, where XLA:TPU then holds more, not less.
    """

    def __init__(
        self,
        layout: DataFormat,
        shapes,
        map_dtypes,
        dtype,
        points: bool = False,
        taps: bool = False,
        group: int = 1,
        pallas: bool = False,
        prep=None,
        ps: bool = False,
        out_dtype=None,
        by_image: bool = True,
    ):
        self.layout = layout
        self.ps = bool(ps)
        self.by_image = bool(by_image)
        self.out_dtype = np.dtype(dtype if out_dtype is None else out_dtype)
        self.points, self.taps, self.group = bool(points), bool(taps), int(group)
        self.pallas = bool(pallas)
        self.prep = prep
        self.shapes = tuple(tuple(int(d) for d in s) for s in shapes)
        self.map_dtypes = tuple(np.dtype(d) for d in map_dtypes)
        self.dtype = np.dtype(dtype)
        self.heights, self.widths, self.channels = _layout(layout, self.shapes)
        self.tiers = [tier_sizes(h, w) for h, w in zip(self.heights, self.widths, strict=True)]
        self.branch_offset = list(np.cumsum([0] + [len(t) for t in self.tiers])[:-1])

    def key(self):
        key = (self.layout, self.shapes, self.map_dtypes, self.dtype)
        key += (self.points, self.taps, self.group, self.pallas, self.prep, self.ps)
        return key + (self.out_dtype, self.by_image)

    @property
    def nhwc(self) -> bool:
        return self.layout is DataFormat.NHWC

    def out_channels(self, ph: int, pw: int) -> int:
        """Channels of a box's output: ``C``, or ``C / (PH * PW)`` for ``ps``."""
        if not self.ps:
            return self.channels
        if self.channels % (ph * pw):
            raise ValueError(f"{self.channels} channels do not split into {ph} x {pw} groups")
        return self.channels // (ph * pw)


def _own(ph: int, pw: int) -> np.ndarray:
    """``[PH, PW, 1, PH, PW]``: bin ``(p, q)`` owns channel group ``(p, q)``."""
    return (np.arange(ph)[:, None, None, None, None] == np.arange(ph)[:, None]) & (
        np.arange(pw)[None, :, None, None, None] == np.arange(pw)
    )


def _keep_own(plan: Plan, value: Array) -> Array:
    """A box's ``[PH, PW, C]`` as ``[PH, PW, C_out]``: each bin's own channel group
    (``plan.ps``; else ``value`` as it is)."""
    if not plan.ps:
        return value
    ph, pw, c = value.shape
    v = value.reshape(ph, pw, c // (ph * pw), ph, pw)
    return jnp.sum(jnp.where(_own(ph, pw), v, 0.0), axis=(-2, -1))


def _own_cot(plan: Plan, gk: Array) -> Array:
    """The transpose of :func:`_keep_own`: ``[PH, PW, C_out]`` -> ``[PH, PW, C]``."""
    if not plan.ps:
        return gk
    ph, pw, c = gk.shape
    return jnp.where(_own(ph, pw), gk[..., None, None], 0.0).reshape(ph, pw, c * ph * pw)


def branch_index(plan: Plan, level: Array, need_y: Array, need_x: Array) -> Array:
    """Per box, the branch (level and tier) whose window holds ``need_y x need_x`` cells."""
    index = jnp.zeros_like(need_y)
    for lv, tiers in enumerate(plan.tiers):
        hs = jnp.asarray([h for h, *_ in tiers[:-1]] + [plan.heights[lv]], jnp.int32)
        ws = jnp.asarray([w for _, w, *_ in tiers[:-1]] + [plan.widths[lv]], jnp.int32)
        tier = jnp.sum((need_y[:, None] > hs) | (need_x[:, None] > ws), axis=1)
        tier = jnp.minimum(tier, len(tiers) - 1)  # the whole map holds any box
        index = jnp.where(level == lv, plan.branch_offset[lv] + tier, index)
    return index.astype(jnp.int32)


def level_of(plan: Plan, branch: Array) -> Array:
    """Each box's map, from its branch (:func:`branch_index`), int32."""
    level = jnp.zeros_like(branch)
    for lv, offset in enumerate(plan.branch_offset[1:], start=1):
        level = jnp.where(branch >= offset, lv, level)
    return level.astype(jnp.int32)


def _window(plan: Plan, m: Array, b, y0, x0, h: int, w: int) -> Array:
    """``[h, w, C]`` window of one map at ``(b, y0, x0)``, widened to the compute dtype."""
    z = jnp.zeros((), jnp.int32)
    if plan.nhwc:
        win = jax.lax.dynamic_slice(m, (b, y0, x0, z), (1, h, w, plan.channels))[0]
    else:
        win = jax.lax.dynamic_slice(m, (b, z, y0, x0), (1, plan.channels, h, w))[0]
        win = jnp.moveaxis(win, 0, -1)
    win = win.astype(plan.dtype)
    return win if plan.prep is None else plan.prep(win)


def _add_window(plan: Plan, acc: Array, value: Array, b, y0, x0) -> Array:
    """``acc[b, y0:y0+h, x0:x0+w] += value`` (``value`` ``[h, w, C]``), by slices."""
    z = jnp.zeros((), jnp.int32)
    h, w = value.shape[:2]
    if plan.nhwc:
        start = (b, y0, x0, z)
        cur = jax.lax.dynamic_slice(acc, start, (1, h, w, plan.channels))
        return jax.lax.dynamic_update_slice(acc, cur + value[None].astype(acc.dtype), start)
    start = (b, z, y0, x0)
    cur = jax.lax.dynamic_slice(acc, start, (1, plan.channels, h, w))
    upd = jnp.moveaxis(value, -1, 0)[None].astype(acc.dtype)
    return jax.lax.dynamic_update_slice(acc, cur + upd, start)


def _row(a: Array, k) -> Array:
    """``a[k]`` by a dynamic slice."""
    return jax.lax.dynamic_index_in_dim(a, k, axis=0, keepdims=False)


def _set_row(a: Array, k, value: Array) -> Array:
    return jax.lax.dynamic_update_index_in_dim(a, value.astype(a.dtype), k, axis=0)


def _window_weights(plan: Plan, wk: Array, tk: Array | None, start, size: int, own) -> Array:
    """One box's weights ``[P, size]`` on the rows (columns) ``start + [0, size)``: a
    slice of its dense weights, or its taps ``wk [P, T]`` at ``tk [P, T]`` made
    dense there (a compare, no gather). Rows the tile does not own get 0."""
    if tk is None:
        w = jax.lax.dynamic_slice_in_dim(wk, start, size, axis=1)
    else:
        rows = start + jnp.arange(size, dtype=jnp.int32)
        w = jnp.sum(jnp.where(tk[..., None] == rows, wk[..., None], 0.0), axis=-2)
    w = w.astype(plan.dtype)
    return w if own is None else jnp.where(own, w, 0.0)


def _add_weights_grad(acc: Array, d: Array, tk: Array | None, start) -> Array:
    """Adds a window's weight gradient ``d [P, size]`` into one box's ``acc``:
    its dense rows from ``start`` (a slice update), or its taps ``[P, T]``
    (each tap takes the gradient of its row)."""
    if tk is None:
        cur = jax.lax.dynamic_slice_in_dim(acc, start, d.shape[1], axis=1)
        return jax.lax.dynamic_update_slice_in_dim(acc, cur + d, start, axis=1)
    rows = start + jnp.arange(d.shape[1], dtype=jnp.int32)
    return acc + jnp.sum(jnp.where(tk[..., None] == rows, d[:, None, :], 0.0), axis=-1)


def _point_weights(plan: Plan, wyw: Array, wxw: Array) -> Array:
    """The points' outer-product weights on the window, ``[S / group, h * w]``
    (each group of points summed)."""
    h, w = wyw.shape[1], wxw.shape[1]
    w2 = (wyw[:, :, None] * wxw[:, None, :]).reshape(-1, plan.group, h * w)
    return jnp.sum(w2, axis=1) if plan.group > 1 else w2[:, 0]


def _contract(plan: Plan, win: Array, wyw: Array, wxw: Array) -> Array:
    """One window's part of a box's output: ``wy . win . wx^T`` ``[PH, PW, C]``, or
    per point (``plan.points``) ``[S / group, C]``: the points' outer-product
    weights ``[S / group, h * w]`` times the window ``[h * w, C]`` (one matmul)."""
    if plan.points:
        h, w, c = win.shape
        w2 = _point_weights(plan, wyw, wxw)
        return jnp.einsum("sk,kc->sc", w2, win.reshape(h * w, c), precision=_HIGHEST)
    z = jnp.einsum("hwc,qw->hqc", win, wxw, precision=_HIGHEST)
    return jnp.einsum("ph,hqc->pqc", wyw, z, precision=_HIGHEST)


def _contract_t(plan: Plan, gk: Array, wyw: Array, wxw: Array) -> Array:
    """The transpose of :func:`_contract`: the window's gradient ``[h, w, C]``."""
    h, w = wyw.shape[1], wxw.shape[1]
    if plan.points:
        w2 = _point_weights(plan, wyw, wxw)
        val = jnp.einsum("sk,sc->kc", w2, gk, precision=_HIGHEST)
        return val.reshape(h, w, -1)
    u = jnp.einsum("pqc,qw->pwc", gk, wxw, precision=_HIGHEST)
    return jnp.einsum("ph,pwc->hwc", wyw, u, precision=_HIGHEST)


def _contract_dw(plan: Plan, win: Array, gk: Array, wyw: Array, wxw: Array):
    """The gradient of ``<gk, _contract(win, wyw, wxw)>`` in ``wyw`` and ``wxw``."""
    if plan.points:
        h, w, c = win.shape
        d_w2 = jnp.einsum("sc,kc->sk", gk, win.reshape(h * w, c), precision=_HIGHEST)
        if plan.group > 1:  # each point of a group gets the group's gradient
            d_w2 = jnp.repeat(d_w2, plan.group, axis=0)
        d_w2 = d_w2.reshape(-1, h, w)
        d_wy = jnp.einsum("shw,sw->sh", d_w2, wxw, precision=_HIGHEST)
        d_wx = jnp.einsum("shw,sh->sw", d_w2, wyw, precision=_HIGHEST)
        return d_wy, d_wx
    # Contract the window over its minor axes only (w, c), with rows as a
    # batch axis, so it is read in the map's own layout.
    z = jnp.einsum("hwc,qw->hqc", win, wxw, precision=_HIGHEST)
    d_wy = jnp.einsum("pqc,hqc->ph", gk, z, precision=_HIGHEST)
    t = jnp.einsum("ph,pqc->hqc", wyw, gk, precision=_HIGHEST)
    d_wx = jnp.einsum("hwc,hqc->hqw", win, t, precision=_HIGHEST).sum(0)
    return d_wy, d_wx


def _per_tile(plan: Plan, lv: int, tier, span_y, span_x, wyk, wxk, fn, init, *, taps=(None, None)):
    """Runs ``fn(carry, y0, x0, wy_window, wx_window, own)`` over the windows of one tier.

    ``span_y``, ``span_x``: ``[2]`` int32, the box's first row (column) and how
    many it needs. A one-window tier reads one window at the box's first row and
    column (kept inside the map). The last tier of a large map loops over tiles
    that cover the box's span exactly once, as many as the span needs: tile
    ``(i, j)`` owns rows ``lo_y + i * h`` on (columns likewise); one clipped at
    the map's far edge overlaps the one before it, and the overlapped rows
    (columns) get zero weight in it (``own``: the ``[h]``, ``[w]`` masks of the
    rows and columns a tile owns; ``None`` for a single window). ``taps``: the
    box's tap rows and columns when
    ``wyk``, ``wxk`` are tap weights (:func:`_window_weights`).
    """
    h, w, ny, nx = tier
    height, width = plan.heights[lv], plan.widths[lv]

    def window(carry, y0, x0, from_y, from_x):
        y0, x0 = jnp.asarray(y0, jnp.int32), jnp.asarray(x0, jnp.int32)
        own = None
        if from_y is not None:
            own = (y0 + jnp.arange(h) >= from_y, x0 + jnp.arange(w) >= from_x)
        wyw = _window_weights(plan, wyk, taps[0], y0, h, None if own is None else own[0])
        wxw = _window_weights(plan, wxk, taps[1], x0, w, None if own is None else own[1])
        return fn(carry, y0, x0, wyw, wxw, own)

    lo_y, lo_x = jnp.clip(span_y[0], 0, height - 1), jnp.clip(span_x[0], 0, width - 1)
    if ny * nx == 1:
        y0 = jnp.minimum(lo_y, height - h)
        x0 = jnp.minimum(lo_x, width - w)
        return window(init, y0, x0, None, None)

    # The tiles the box's span needs (at least one: no taps reads zeros).
    across = jnp.clip((span_x[1] + w - 1) // w, 1, nx)
    down = jnp.clip((span_y[1] + h - 1) // h, 1, ny)

    def tile(i, carry):
        from_y = lo_y + (i // across) * h
        from_x = lo_x + (i % across) * w
        y0, x0 = jnp.minimum(from_y, height - h), jnp.minimum(from_x, width - w)
        return window(carry, y0, x0, from_y, from_x)

    return jax.lax.fori_loop(0, down * across, tile, init)


def _branches(plan: Plan, body):
    """``body(level, tier)`` for every branch, in :func:`branch_index` order."""
    return [
        functools.partial(body, lv, tier) for lv, tiers in enumerate(plan.tiers) for tier in tiers
    ]


def _box_taps(taps, k):
    """Box ``k``'s tap rows and columns, ``(None, None)`` for dense weights."""
    return (_row(taps[0], k), _row(taps[1], k)) if taps else (None, None)


def _forward(plan: Plan, maps, wy, wx, batch, branch, span_y, span_x, *taps, emit=None, init=None):
    """``out[k] = wy[k] . window_k . wx[k]^T`` for every box: ``[K, PH, PW, C]``
    (``[K, S, C]`` for points), each box's row written in place into the output
    (by the Pallas kernel of :mod:`jax_roialign._pallas` where the plan asks for
    it and it fits). ``taps``: the tap rows and columns ``[K, S, T]`` of tap
    weights.

    ``wy``, ``wx`` may also be functions ``k -> [PH, H]`` (weights computed box by
    box); ``emit(k, value, carry)`` replaces the write of each box's ``[PH, PW, C]``
    (a fold over the boxes from ``init``)."""
    if plan.pallas and not plan.ps and emit is None and not callable(wy) and not callable(wx):
        from . import _pallas

        if _pallas.supported(plan, wy.shape[1]):
            level = level_of(plan, branch)
            out = _pallas.forward(plan, maps, wy, wx, batch, level, span_y, span_x)
            return out.astype(plan.out_dtype)
    refs = (maps, batch, span_y, span_x, taps) + tuple(a for a in (wy, wx) if not callable(a))
    if init is None:
        if plan.points:
            shape: tuple[int, ...] = (wy.shape[1] // plan.group, plan.channels)
        else:
            shape = (wy.shape[1], wx.shape[1], plan.out_channels(wy.shape[1], wx.shape[1]))
        init = _shard.varying(jnp.zeros((wy.shape[0],) + shape, plan.out_dtype), *refs)

    def body(lv, tier, k, out):
        b, ly, lx = (_row(a, k) for a in (batch, span_y, span_x))
        wyk, wxk = _box(wy, k), _box(wx, k)

        def read(acc, y0, x0, wyw, wxw, own):
            win = _window(plan, maps[lv], b, y0, x0, tier[0], tier[1])
            return acc + _contract(plan, win, wyw, wxw)

        if plan.points:
            shape: tuple[int, ...] = (wyk.shape[0] // plan.group,)
        else:
            shape = (wyk.shape[0], wxk.shape[0])
        zero = _shard.varying(jnp.zeros(shape + (plan.channels,), plan.dtype), *refs)
        tk = _box_taps(taps, k)
        value = _keep_own(plan, _per_tile(plan, lv, tier, ly, lx, wyk, wxk, read, zero, taps=tk))
        return _set_row(out, k, value) if emit is None else emit(k, value, out)

    return _each_box(plan, branch, body, init)


def _box(a, k) -> Array:
    """Row ``k`` of a per-box table, or ``a(k)`` for one computed box by box."""
    return a(k) if callable(a) else _row(a, k)


def _by_branch(plan: Plan, branch: Array):
    """Boxes grouped by branch (:func:`groups`)."""
    return _sampling.groups(branch, sum(len(t) for t in plan.tiers))


def _each_box(plan: Plan, branch: Array, body, carry):
    """``carry = body(level, tier, k, carry)`` for every box ``k``: one loop per
    branch over that branch's boxes, in a fixed order (by branch, then by
    position). No ``switch``: an array updated inside one is copied (on TPU
    also relaid out) for every box, be it the map's gradient or the output."""
    order, starts, ends = _by_branch(plan, branch)
    for i, fn in enumerate(_branches(plan, body)):
        carry = jax.lax.fori_loop(
            starts[i], ends[i], lambda j, c, fn=fn: fn(_row(order, j), c), carry
        )
    return carry


def _transpose(
    plan: Plan, g, wy, wx, batch, branch, span_y, span_x, *taps, images: int | None = None
):
    """The feature gradient: per map, ``sum_k`` of ``wy[k]^T . g[k] . wx[k]`` in its window.

    Each box adds its windows into the map in place (:func:`_each_box`); the
    boxes go in a fixed order, so the sum is the same on every run. ``images``
    overrides the maps' batch size (a vmapped call folded into the images).
    """
    if plan.pallas and not plan.ps:
        from . import _pallas

        if _pallas.supported(plan, wy.shape[1]):
            g = g.astype(plan.dtype)
            level = level_of(plan, branch)
            acc = _pallas.transpose(plan, g, wy, wx, batch, level, span_y, span_x, images)
            return tuple(a.astype(d) for a, d in zip(acc, plan.map_dtypes, strict=True))
    shapes = [s if images is None else (images,) + s[1:] for s in plan.shapes]
    refs = (g, wy, wx, batch, span_y, span_x, taps)
    widened = any(d != plan.dtype for d in plan.map_dtypes)
    if widened and plan.by_image and shapes[0][0] > 1:
        return _transpose_by_image(
            plan, shapes, refs, g, wy, wx, batch, branch, span_y, span_x, *taps
        )
    acc = _shard.varying(tuple(jnp.zeros(s, plan.dtype) for s in shapes), *refs)
    acc = _transpose_into(plan, acc, g, wy, wx, batch, branch, span_y, span_x, *taps)
    return tuple(a.astype(d) for a, d in zip(acc, plan.map_dtypes, strict=True))


def _transpose_by_image(plan: Plan, shapes, refs, g, wy, wx, batch, branch, span_y, span_x, *taps):
    """:func:`_transpose` for maps narrower than the compute dtype (bfloat16 maps,
    float32 sums): one image at a time, its boxes' windows added into a map of
    one image in the compute dtype, which is then rounded into that image of the
    result. A cell only takes boxes of its own image, in the same order as in one
    pass over all images (by branch, then position), so the sums are the same
    bits, and the wide accumulator is one image instead of all of them."""
    nb = sum(len(t) for t in plan.tiers)
    n = shapes[0][0]
    order, starts, ends = _sampling.groups(batch * nb + branch, n * nb)
    local = jnp.zeros_like(batch)  # every box reads image 0 of the one-image accumulator
    body = _transpose_body(plan, g, wy, wx, local, span_y, span_x, taps)
    zeros = [jnp.zeros(s, d) for s, d in zip(shapes, plan.map_dtypes, strict=True)]
    out = _shard.varying(tuple(zeros), *refs)

    def image(i, out):
        acc = tuple(jnp.zeros((1,) + s[1:], plan.dtype) for s in shapes)
        acc = _shard.varying(acc, *refs)
        for j, fn in enumerate(_branches(plan, body)):
            group = i * nb + j
            acc = jax.lax.fori_loop(
                _row(starts, group),
                _row(ends, group),
                lambda t, c, fn=fn: fn(_row(order, t), c),
                acc,
            )
        return tuple(
            jax.lax.dynamic_update_index_in_dim(o, a.astype(o.dtype), i, axis=0)
            for o, a in zip(out, acc, strict=True)
        )

    return jax.lax.fori_loop(0, n, image, out)


def _transpose_into(plan: Plan, acc, g, wy, wx, batch, branch, span_y, span_x, *taps):
    """``acc`` (maps in the compute dtype) plus :func:`_transpose`'s sums, in place
    (``g``, ``wy``, ``wx`` may be functions of the box, as for :func:`_forward`)."""
    body = _transpose_body(plan, g, wy, wx, batch, span_y, span_x, taps)
    return _each_box(plan, branch, body, tuple(acc))


def _cot_row(plan: Plan, g, k) -> Array:
    """Box ``k``'s cotangent in the compute dtype (its channel groups widened for
    ``plan.ps``). A narrower ``g`` is widened here, box by box: behind a barrier,
    or XLA:TPU hoists the conversion out of the loops and stores a widened copy
    of the whole cotangent in each loop's layout (two float32 copies of a
    bfloat16 output)."""
    if callable(g):
        return _own_cot(plan, g(k).astype(plan.dtype))
    gk = _row(g, k)
    if gk.dtype != plan.dtype:
        gk = jax.lax.optimization_barrier(gk).astype(plan.dtype)
    return _own_cot(plan, gk)


def _transpose_body(plan: Plan, g, wy, wx, batch, span_y, span_x, taps):
    """``body(level, tier, k, acc)``: box ``k``'s windows of ``wy^T . g[k] . wx``
    added into ``acc`` (in place) at image ``batch[k]``. The cotangent is widened
    to the compute dtype box by box (a bfloat16 ``g`` is never copied whole)."""

    def body(lv, tier, k, acc):
        b, ly, lx = _row(batch, k), _row(span_y, k), _row(span_x, k)
        wyk, wxk = _box(wy, k), _box(wx, k)
        gk = _cot_row(plan, g, k)

        def add(acc, y0, x0, wyw, wxw, own):
            acc = list(acc)
            acc[lv] = _add_window(plan, acc[lv], _contract_t(plan, gk, wyw, wxw), b, y0, x0)
            return tuple(acc)

        return _per_tile(plan, lv, tier, ly, lx, wyk, wxk, add, acc, taps=_box_taps(taps, k))

    return body


def _grad_rows(plan: Plan, maps, lv, tier, b, wyk, wxk, gk, tk=(None, None)):
    """``fn`` for :func:`_per_tile`: adds one window's part of the weights' gradient
    of box ``k`` into its rows ``(d_wy [PH, H], d_wx [PW, W])`` (or its taps)."""
    h, w = tier[:2]

    def grad(rows, y0, x0, wyw, wxw, own):
        win = _window(plan, maps[lv], b, y0, x0, h, w)
        d_wy, d_wx = _contract_dw(plan, win, gk, wyw, wxw)
        if own is not None:  # rows and columns a tile does not own get nothing
            d_wy = jnp.where(own[0], d_wy, 0.0)
            d_wx = jnp.where(own[1], d_wx, 0.0)
        ry, rx = rows
        return _add_weights_grad(ry, d_wy, tk[0], y0), _add_weights_grad(rx, d_wx, tk[1], x0)

    return grad


def _weights_grad_fast(plan: Plan, maps, g, wy, wx, batch, branch, span_y, span_x, *taps):
    """``g`` may be a function of the box (as for :func:`_transpose_into`); it is
    widened to the compute dtype box by box."""
    refs = (maps, wy, wx, batch, span_y, span_x, taps) + (() if callable(g) else (g,))

    def body(lv, tier, k, out):
        b, ly, lx, wyk, wxk = (_row(a, k) for a in (batch, span_y, span_x, wy, wx))
        gk = _cot_row(plan, g, k)
        wyk, wxk = wyk.astype(plan.dtype), wxk.astype(plan.dtype)
        tk = _box_taps(taps, k)
        zeros = _shard.varying((jnp.zeros_like(wyk), jnp.zeros_like(wxk)), *refs)
        grad = _grad_rows(plan, maps, lv, tier, b, wyk, wxk, gk, tk)
        ry, rx = _per_tile(plan, lv, tier, ly, lx, wyk, wxk, grad, zeros, taps=tk)
        return _set_row(out[0], k, ry), _set_row(out[1], k, rx)

    out = _shard.varying((jnp.zeros(wy.shape, plan.dtype), jnp.zeros(wx.shape, plan.dtype)), *refs)
    d_wy, d_wx = _each_box(plan, branch, body, out)
    return d_wy.astype(wy.dtype), d_wx.astype(wx.dtype)


def _weights_grad(plan: Plan, maps, g, wy, wx, batch, branch, span_y, span_x, *taps):
    """``d<g, forward>/d wy`` and ``/d wx`` inside each box's windows (zero outside
    them): one loop per tier over its boxes, large boxes by the tiles of their own
    span (:func:`_each_box`, dynamic trip counts; first order)."""
    return _weights_grad_fast(plan, tuple(maps), g, wy, wx, batch, branch, span_y, span_x, *taps)


# ---------------------------------------------------------------------------
# Per-image form: image of each box from its position; vmap folded into the images.
# ---------------------------------------------------------------------------


def _flat(per_image: bool, maps, *box_args):
    """Box tables ``[N, R, ...]`` flattened to ``[N * R, ...]``, with each box's image."""
    if not per_image:
        return box_args
    n, r = box_args[0].shape[:2]
    flat = [a.reshape((n * r,) + a.shape[2:]) for a in box_args]
    batch = jnp.repeat(jnp.arange(n, dtype=jnp.int32), r)
    return flat, batch


def _impls(plan: Plan, per_image: bool):
    """The three loops as functions of ``(maps..., tables...)``, per-image shaped or flat."""
    nmaps = len(plan.shapes)

    def unpack(args):
        return list(args[:nmaps]), args[nmaps:]

    def forward(*args):
        maps, (wy, wx, *rest) = unpack(args)
        if per_image:
            n, r = wy.shape[:2]
            (wy, wx, *idx), batch = _flat(True, maps, wy, wx, *rest)
            out = _forward(plan, maps, wy, wx, batch, *idx)
            return out.reshape((n, r) + out.shape[1:])
        return _forward(plan, maps, wy, wx, *rest)

    def transpose(g, wy, wx, *rest):
        if per_image:
            n, r = wy.shape[:2]
            g = g.reshape((n * r,) + g.shape[2:])
            (wy, wx, *idx), batch = _flat(True, None, wy, wx, *rest)
            return _transpose(plan, g, wy, wx, batch, *idx, images=n)
        return _transpose(plan, g, wy, wx, *rest)

    def weights_grad(*args):
        maps, (g, wy, wx, *rest) = unpack(args)
        if per_image:
            n, r = wy.shape[:2]
            g = g.reshape((n * r,) + g.shape[2:])
            shapes = (wy.shape, wx.shape)
            (wy, wx, *idx), batch = _flat(True, maps, wy, wx, *rest)
            d_wy, d_wx = _weights_grad(plan, maps, g, wy, wx, batch, *idx)
            return d_wy.reshape(shapes[0]), d_wx.reshape(shapes[1])
        return _weights_grad(plan, maps, g, wy, wx, *rest)

    return forward, transpose, weights_grad


def _fold_vmap(fn, kind: str):
    """A ``custom_vmap`` rule folding a vmapped axis into the images: ``B`` calls on
    ``N`` images are one call on ``B * N`` images (per-image tables ``[N, R, ...]``
    become ``[B * N, R, ...]``), so vmap adds no gather or scatter."""

    @jax.custom_batching.custom_vmap
    def wrapped(*args):
        return fn(*args)

    @wrapped.def_vmap
    def rule(axis_size, in_batched, *args):
        args = [
            a if batched else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
            for a, batched in zip(args, in_batched, strict=True)
        ]
        folded = [a.reshape((-1,) + a.shape[2:]) for a in args]
        out = wrapped(*folded)
        if kind == "maps":
            out = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in out)
            return out, tuple(True for _ in out)
        if kind == "pair":
            out = tuple(o.reshape((axis_size, -1) + o.shape[1:]) for o in out)
            return out, (True, True)
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    return wrapped


@functools.lru_cache(maxsize=128)
def _ops(key, per_image: bool):
    """``(op, transpose)``: the read as a ``custom_vjp`` whose VJP is the transpose
    and the weights' gradient, and that transpose. First order: higher orders
    differentiate the plain-JAX implementation (:mod:`jax_roialign._dispatch`)."""
    plan = Plan(*key)
    fwd_impl, t_impl, wg_impl = _impls(plan, per_image)
    if per_image:
        fwd_impl = _fold_vmap(fwd_impl, "out")
        t_impl = _fold_vmap(t_impl, "maps")
        wg_impl = _fold_vmap(wg_impl, "pair")
    # Nested jits: each is traced once per argument shape and reused (autodiff
    # traces a backward more than once).
    fwd_impl, t_impl, wg_impl = (jax.jit(f) for f in (fwd_impl, t_impl, wg_impl))

    def is_zero(x: Any) -> bool:
        return isinstance(x, jax.custom_derivatives.SymbolicZero)

    @jax.custom_vjp
    def op(maps, wy, wx, idx):
        return fwd_impl(*maps, wy, wx, *idx)

    def transpose(g, wy, wx, idx):
        return t_impl(g, wy, wx, *idx)

    def op_fwd(maps, wy, wx, idx):
        vals = (
            tuple(m.value for m in maps),
            wy.value,
            wx.value,
            jax.tree.map(lambda a: a.value, idx),
        )
        want_maps = any(m.perturbed for m in maps)
        want_w = wy.perturbed or wx.perturbed
        return op(*vals), (vals, want_maps, want_w)

    def op_bwd(res, cot):
        (maps, wy, wx, idx), want_maps, want_w = res
        d_maps = tuple(None for _ in maps)
        d_wy = d_wx = None
        if not is_zero(cot):
            cot = jnp.asarray(cot)
            if want_maps:
                d_maps = transpose(cot, wy, wx, idx)
            if want_w:
                d_wy, d_wx = wg_impl(*maps, cot, wy, wx, *idx)
        return d_maps, d_wy, d_wx, jax.tree.map(lambda _: None, idx)

    op.defvjp(op_fwd, op_bwd, symbolic_zeros=True)
    return op, transpose


def contract_window(
    maps: Sequence[Array],
    layout: DataFormat,
    wy: Array,
    wx: Array,
    level: Array,
    lo_y: Array,
    need_y: Array,
    lo_x: Array,
    need_x: Array,
    dtype,
    *,
    batch: Array | None = None,
    pallas: bool = False,
    ps: bool = False,
    out_dtype=None,
) -> Array:
    """``out[k] = sum_hw wy[k, :, h] wx[k, :, w] F_level[k][batch[k], h, w, :]``, box-locally.

    Args:
      maps: one or more feature maps ``[N, H_l, W_l, C]`` (or NCHW); box ``k`` reads
        ``maps[level[k]]``.
      wy, wx: dense weights ``[K, PH, H]``, ``[K, PW, W]`` (``H, W`` at least the
        largest map's; columns past a map's size must be zero), or per image
        ``[N, R, PH, H]`` / ``[N, R, PW, W]`` (box ``(n, r)`` reads image ``n``).
      level: ``[K]`` (or ``[N, R]``) int32 map of each box.
      lo_y, need_y, lo_x, need_x: ``[K]`` (or ``[N, R]``) int32, the first row and
        the number of rows (columns) that hold every tap of the box; a box whose
        weights are zero may say 0. Rows outside are never read, so they must be
        exact (:func:`jax_roialign._sampling.tap_span`).
      dtype: the compute dtype; the windows are widened to it as they are read.
      batch: ``[K]`` image of each box (flat tables only).
      pallas: read with the Pallas kernels of :mod:`jax_roialign._pallas` (the
        forward and the feature gradient; the weights' gradient is this
        reader's). Interpreted off TPU.
      ps: position-sensitive: bin ``(p, q)`` keeps only channel group ``(p, q)``
        of ``C = C_out x PH x PW`` (channel ``(c * PH + p) * PW + q``), reduced box
        by box as it is read (``Plan.ps``).
      out_dtype: the output's dtype (default ``dtype``): each box's sums are
        rounded to it as they are written, so a narrower output (the maps'
        bfloat16, when nothing but a cast follows) has a narrow cotangent, widened
        box by box in the backward instead of as a whole.

    Returns ``[K, PH, PW, C]`` (or ``[N, R, PH, PW, C]``; ``C_out`` with ``ps``) in
    ``out_dtype``.
    """
    span = (lo_y, need_y, lo_x, need_x)
    return _read(
        maps, layout, wy, wx, level, span, dtype, batch, pallas=pallas, ps=ps, out_dtype=out_dtype
    )


def _read(
    maps,
    layout,
    wy,
    wx,
    level,
    span,
    dtype,
    batch,
    *,
    points=False,
    taps=None,
    group=1,
    pallas=False,
    ps=False,
    out_dtype=None,
    by_image=True,
):
    """:func:`contract_window` and :func:`contract_points`: ``taps`` the tap rows and
    columns ``(idx_y, idx_x)`` when ``wy``, ``wx`` are tap weights."""
    maps = tuple(maps)
    if wy.shape[-2] % group:
        raise ValueError(f"{wy.shape[-2]} points do not split into groups of {group}")
    shapes, dtypes = [m.shape for m in maps], [m.dtype for m in maps]
    plan = Plan(
        layout,
        shapes,
        dtypes,
        dtype,
        points,
        taps is not None,
        group,
        pallas,
        ps=ps,
        out_dtype=out_dtype,
        by_image=by_image,
    )
    per_image = batch is None
    heights, widths = max(plan.heights), max(plan.widths)
    if taps is None:
        if wy.shape[-1] < heights or wx.shape[-1] < widths:
            raise ValueError("window weights must cover the largest map")
        wy, wx = wy[..., :heights], wx[..., :widths]
    wy, wx = wy.astype(dtype), wx.astype(dtype)
    idx: tuple[Array, ...] = _box_tables(plan, level, *span)
    if taps is not None:
        idx += tuple(t.astype(jnp.int32) for t in taps)
    if batch is not None:
        idx = (batch.astype(jnp.int32),) + idx
    op, _ = _ops(plan.key(), per_image)
    return op(maps, wy, wx, idx)


def _box_tables(plan: Plan, level, lo_y, need_y, lo_x, need_x) -> tuple[Array, Array, Array]:
    """The loops' integer tables (any leading shape): each box's branch and its
    spans ``[..., 2]`` (first row or column, how many) per axis."""
    branch = branch_index(plan, level.reshape(-1), need_y.reshape(-1), need_x.reshape(-1))
    span_y = jnp.stack([lo_y, need_y], axis=-1).astype(jnp.int32)
    span_x = jnp.stack([lo_x, need_x], axis=-1).astype(jnp.int32)
    return branch.reshape(level.shape), span_y, span_x


def _taps_spans(taps_y, taps_x) -> tuple[Array, Array, Array, Array]:
    """``(lo_y, need_y, lo_x, need_x)`` of separable tap tables ``(idx, w, live)``."""
    (iy, _, live_y), (ix, _, live_x) = taps_y, taps_x
    return (*_sampling.taps_span(iy, live_y), *_sampling.taps_span(ix, live_x))


def contract_points(
    maps: Sequence[Array],
    layout: DataFormat,
    wy: Array,
    wx: Array,
    level: Array,
    lo_y: Array,
    need_y: Array,
    lo_x: Array,
    need_x: Array,
    dtype,
    *,
    batch: Array | None = None,
    group: int = 1,
) -> Array:
    """``out[k, s] = sum_hw wy[k, s, h] wx[k, s, w] F_level[k][batch[k], h, w, :]``, box-locally.

    :func:`contract_window` for points that are not one separable grid (bins
    moved each by its own offset, rotated samples): row ``s`` of ``wy``
    ``[K, S, H]`` and ``wx`` ``[K, S, W]`` weighs one point (a bin's separable
    average, or one sample). Each box still reads one window (or the tiles of
    its span), contracted with its points' outer-product weights (one matmul per
    window); the same loops, transposes and weight gradients. Returns ``[K, S, C]``
    (``[N, R, S, C]`` per image); with ``group``, each ``group`` consecutive points
    summed: ``[K, S / group, C]`` (a bin's samples, never ``[K, S, C]``).
    """
    span = (lo_y, need_y, lo_x, need_x)
    return _read(maps, layout, wy, wx, level, span, dtype, batch, points=True, group=group)


def read_taps(
    maps: Sequence[Array],
    layout: DataFormat,
    batch: Array,
    taps_y: tuple[Array, Array, Array],
    taps_x: tuple[Array, Array, Array],
    dtype,
    *,
    level: Array | None = None,
    pallas: bool = False,
) -> Array:
    """:func:`contract_window` of separable taps ``(idx, w, live)`` per axis
    (``idx, w [K, P, T]``, ``live [K, P]`` the samples whose taps count): each
    box's taps as dense weights over the largest map, each box's span from its
    live taps. ``level``: the map of each box (default: the first). ``pallas``:
    the forward and feature gradient by the Pallas kernels.
    Returns ``[K, P_y, P_x, C]``."""
    (iy, wy, _), (ix, wx, _) = taps_y, taps_x
    heights, widths, _ = _layout(layout, tuple(tuple(m.shape) for m in maps))
    wyd = _sampling.taps_to_dense(iy, wy, max(heights))
    wxd = _sampling.taps_to_dense(ix, wx, max(widths))
    lo_y, need_y, lo_x, need_x = _taps_spans(taps_y, taps_x)
    if level is None:  # one map (typed like the boxes, for explicit sharding)
        level = jnp.zeros_like(lo_y)
    return contract_window(
        maps, layout, wyd, wxd, level, lo_y, need_y, lo_x, need_x, dtype, batch=batch, pallas=pallas
    )


def read_point_taps(
    maps: Sequence[Array],
    layout: DataFormat,
    batch: Array,
    taps_y: tuple[Array, Array, Array],
    taps_x: tuple[Array, Array, Array],
    dtype,
    *,
    level: Array | None = None,
    group: int = 1,
    by_image: bool = True,
) -> Array:
    """:func:`contract_points` of taps ``(idx, w, live)`` per axis (``idx, w [K, S, T]``,
    ``live [K, S]`` or ``[K, S, T]`` the taps that count: every tap whose weight
    or whose weight's derivative can be nonzero): each point reads
    ``sum_ab wy[k, s, a] wx[k, s, b] F[idx_y[k, s, a], idx_x[k, s, b]]``. The taps
    stay taps (``[K, S, T]``, no dense weights over the map): each window makes
    its own rows of them dense. Returns ``[K, S / group, C]``."""
    (iy, wy, _), (ix, wx, _) = taps_y, taps_x
    span = _taps_spans(taps_y, taps_x)
    if level is None:  # one map (typed like the boxes, for explicit sharding)
        level = jnp.zeros_like(span[0])
    taps = (iy, ix)
    return _read(
        maps,
        layout,
        wy,
        wx,
        level,
        span,
        dtype,
        batch,
        points=True,
        taps=taps,
        group=group,
        by_image=by_image,
    )


def _boxwise(plan: Plan, batch, taps_y, taps_x):
    """Separable taps as per-box functions ``k -> [P, H]`` of dense weights (never a
    ``[K, P, H]`` table) and the integer tables: ``(wy, wx, batch, branch, span_y,
    span_x)`` for :func:`_forward` and :func:`_transpose_into`."""
    (iy, wy, _), (ix, wx, _) = taps_y, taps_x

    def dense(idx, w, length):
        def rows(k):
            one = _sampling.taps_to_dense(_row(idx, k)[None], _row(w, k)[None], length)[0]
            return one.astype(plan.dtype)

        return rows

    span = _taps_spans(taps_y, taps_x)
    tables = _box_tables(plan, jnp.zeros_like(span[0]), *span)
    wyd, wxd = dense(iy, wy, max(plan.heights)), dense(ix, wx, max(plan.widths))
    return wyd, wxd, batch.astype(jnp.int32), *tables


def fold_taps(
    maps: Sequence[Array],
    layout: DataFormat,
    batch: Array,
    taps_y: tuple[Array, Array, Array],
    taps_x: tuple[Array, Array, Array],
    dtype,
    emit,
    init,
    *,
    prep=None,
):
    """:func:`read_taps` of one map, each box's ``[P_y, P_x, C]`` handed to
    ``carry = emit(k, value, carry)`` instead of written out (a fold over the boxes
    from ``init``, in the reader's order; ``emit`` updates row ``k`` of its carry in
    place), with each box's dense weights computed box by box. Not differentiable:
    for searches and for the custom VJPs of callers. ``prep``: an elementwise
    function applied to every window as it is read, in ``dtype`` (a module-level
    function: it keys the plan)."""
    maps = tuple(maps)
    plan = Plan(layout, [m.shape for m in maps], [m.dtype for m in maps], dtype, prep=prep)
    wy, wx, batch, branch, span_y, span_x = _boxwise(plan, batch, taps_y, taps_x)
    return _forward(plan, maps, wy, wx, batch, branch, span_y, span_x, emit=emit, init=init)


def add_transpose_taps(
    acc: Sequence[Array],
    g,
    layout: DataFormat,
    batch: Array,
    taps_y: tuple[Array, Array, Array],
    taps_x: tuple[Array, Array, Array],
) -> tuple[Array, ...]:
    """``acc`` plus the transpose of :func:`read_taps` applied to ``g`` ``[K, P_y, P_x, C]``
    (or a function ``k -> [P_y, P_x, C]``, the cotangent made box by box): maps in
    the compute dtype (``acc``'s) with each box's ``wy^T . g[k] . wx`` added into its
    windows, box by box in place. Not differentiable: for the custom VJPs of callers
    that sum several reads' transposes into one map."""
    acc = tuple(acc)
    plan = Plan(layout, [a.shape for a in acc], [a.dtype for a in acc], acc[0].dtype)
    return _transpose_into(plan, acc, g, *_boxwise(plan, batch, taps_y, taps_x))


def taps_vjp(
    acc: Sequence[Array],
    cot,
    maps: Sequence[Array],
    layout: DataFormat,
    batch: Array,
    taps_y: tuple[Array, Array, Array],
    taps_x: tuple[Array, Array, Array],
) -> tuple[tuple[Array, ...], Array, Array]:
    """The VJP of :func:`read_taps` (one map or several, read at level 0) for a
    cotangent made box by box, ``cot(k) -> [P_y, P_x, C]``: ``acc`` (maps in the
    compute dtype) plus the feature gradient, and the gradients of the tap weights,
    ``d_wy [K, P_y, T]`` and ``d_wx [K, P_x, T]``. The taps stay taps (made dense
    inside each window), so nothing ``[K, P, H]`` is built. Not differentiable: for
    the custom VJPs of callers (a fold over the boxes has no per-sample output to
    differentiate)."""
    acc, maps = tuple(acc), tuple(maps)
    dtype = acc[0].dtype
    plan = Plan(layout, [m.shape for m in maps], [m.dtype for m in maps], dtype, taps=True)
    (iy, wy, _), (ix, wx, _) = taps_y, taps_x
    span = _taps_spans(taps_y, taps_x)
    branch, span_y, span_x = _box_tables(plan, jnp.zeros_like(span[0]), *span)
    b = batch.astype(jnp.int32)
    wy, wx = wy.astype(dtype), wx.astype(dtype)
    idx = (iy.astype(jnp.int32), ix.astype(jnp.int32))
    out = tuple(_transpose_into(plan, acc, cot, wy, wx, b, branch, span_y, span_x, *idx))
    d_wy, d_wx = _weights_grad_fast(plan, maps, cot, wy, wx, b, branch, span_y, span_x, *idx)
    return out, d_wy, d_wx


def _tree_row(tree, k):
    """Row ``k`` of every array of a pytree (``None`` leaves stay)."""
    return jax.tree.map(lambda a: _row(a, k), tree)


def contract_points_boxwise(
    maps: Sequence[Array],
    layout: DataFormat,
    rows,
    params,
    aux,
    lo_y: Array,
    need_y: Array,
    lo_x: Array,
    need_x: Array,
    dtype,
    *,
    batch: Array,
) -> Array:
    """:func:`contract_points` of one map with each box's weights computed in the
    loop, never as ``[K, S, H]`` tables.

    ``rows(params_k, aux_k) -> (wy [S, H], wx [S, W])``: box ``k``'s dense weights
    from its rows of ``params`` (a pytree of ``[K, ...]`` arrays, differentiated)
    and of ``aux`` (not differentiated); a static function (the plan's closed
    form, e.g. :func:`jax_roialign._sampling.dense_weights` of the box's grids).
    The gradient is a custom VJP: the feature gradient is the transpose with the
    weights made again box by box, and the gradient of ``params`` is each box's
    weights' gradient (read from its windows) taken through ``rows`` by a VJP per
    box, so the closed form's intermediates exist for one box at a time. First
    order (the loops' trip counts are data). Returns ``[K, S, C]``.
    """
    maps = tuple(maps)
    plan = Plan(layout, [m.shape for m in maps], [m.dtype for m in maps], dtype, points=True)
    level = jnp.zeros_like(lo_y)
    branch, span_y, span_x = _box_tables(plan, level, lo_y, need_y, lo_x, need_x)
    ints = (batch.astype(jnp.int32), branch, span_y, span_x)
    return _boxwise_op(plan, rows)(maps, params, aux, ints)


def _boxwise_weights(plan: Plan, rows, params, aux):
    """``(wy, wx)`` as functions of the box (for :func:`_forward`, :func:`_transpose_into`)."""

    def one(k):
        return rows(_tree_row(params, k), _tree_row(aux, k))

    return (lambda k: one(k)[0].astype(plan.dtype)), (lambda k: one(k)[1].astype(plan.dtype))


def _boxwise_op(plan: Plan, rows):
    def no_grad(tree):
        return jax.tree.map(lambda _: None, tree)

    @jax.custom_vjp
    def op(maps, params, aux, ints):
        wy, wx = _boxwise_weights(plan, rows, params, aux)
        shape = jax.eval_shape(lambda: rows(_tree_row(params, 0), _tree_row(aux, 0)))[0].shape
        init = jnp.zeros((ints[0].shape[0], shape[0], plan.channels), plan.dtype)
        init = _shard.varying(init, maps, params, aux, ints)
        return _forward(plan, maps, wy, wx, *ints, init=init)

    def fwd(maps, params, aux, ints):
        return op(maps, params, aux, ints), (maps, params, aux, ints)

    def bwd(res, g):
        maps, params, aux, ints = res
        wy, wx = _boxwise_weights(plan, rows, params, aux)
        acc = tuple(jnp.zeros(s, plan.dtype) for s in plan.shapes)
        acc = _shard.varying(acc, maps, g, params, aux, ints)
        acc = _transpose_into(plan, acc, g, wy, wx, *ints)
        d_maps = tuple(a.astype(d) for a, d in zip(acc, plan.map_dtypes, strict=True))
        d_params = _boxwise_params_grad(plan, maps, g, rows, params, aux, *ints)
        return d_maps, d_params, no_grad(aux), no_grad(ints)

    op.defvjp(fwd, bwd)
    return op


def _boxwise_params_grad(plan: Plan, maps, g, rows, params, aux, batch, branch, span_y, span_x):
    """``d<g, op>/d params``: per box, the weights' gradient inside its windows
    (:func:`_grad_rows`) taken through ``rows`` by the box's own VJP."""
    refs = (maps, g, params, aux, batch, span_y, span_x)
    out = _shard.varying(jax.tree.map(jnp.zeros_like, params), *refs)

    def body(lv, tier, k, out):
        b, ly, lx = _row(batch, k), _row(span_y, k), _row(span_x, k)
        ak = _tree_row(aux, k)
        (wyk, wxk), vjp = jax.vjp(lambda p: rows(p, ak), _tree_row(params, k))
        wyc, wxc = wyk.astype(plan.dtype), wxk.astype(plan.dtype)
        zeros = _shard.varying((jnp.zeros_like(wyc), jnp.zeros_like(wxc)), *refs)
        grad = _grad_rows(plan, maps, lv, tier, b, wyc, wxc, _cot_row(plan, g, k))
        ry, rx = _per_tile(plan, lv, tier, ly, lx, wyc, wxc, grad, zeros)
        (dp,) = vjp((ry.astype(wyk.dtype), rx.astype(wxk.dtype)))
        return jax.tree.map(lambda o, d: _set_row(o, k, d), out, dp)

    return _each_box(plan, branch, body, out)
