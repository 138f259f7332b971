"""How to aggregate: contractions of per-axis taps with the feature map.

The feature map is always addressed as ``[N, H, W, C]`` logically; for NCHW the
reads index the channel axis second, so no transposed copy of the map is made.
Reads are done in the map's own dtype and cast to the compute dtype per value.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _shard
from ._sampling import by_level, groups
from ._tuning import TUNING
from ._validation import DataFormat, fence

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def read(features: Array, layout: DataFormat, b: Array, iy: Array, ix: Array) -> Array:
    """Gathers ``features[b, iy, ix, :]`` for broadcastable index arrays; returns ``[..., C]``."""
    if layout is DataFormat.NHWC:
        return features[b, iy, ix]
    return features[b, :, iy, ix]


def contract_taps(
    features: Array,
    layout: DataFormat,
    batch: Array,
    iy: Array,
    wy: Array,
    ix: Array,
    wx: Array,
    dtype,
    *,
    row_vjp: bool = True,
) -> Array:
    """``out[k,ph,pw,c] = sum_ab wy[k,ph,a] wx[k,pw,b] F[batch[k], iy[k,ph,a], ix[k,pw,b], c]``.

    ``iy, wy``: ``[K, PH, A]`` (separable) or ``[K, PH, PW, A]`` (per bin, e.g. deformable);
    ``ix, wx``: ``[K, PW, B]`` or ``[K, PH, PW, B]``. One gather per tap pair, each the
    size of the output, summed in one fused loop, so no tensor larger than the
    output is materialised.

    ``row_vjp``: for separable taps, the feature gradient is :func:`rows_transpose`
    (box by box, row windows; deterministic) instead of autodiff's scatter-add.
    """
    if row_vjp and iy.ndim == 3 and ix.ndim == 3:
        flat, width = flat_view(features, layout)
        k = batch.shape[0]
        offset = jnp.zeros((k,), jnp.int32)
        row_length = jnp.full((k,), width, jnp.int32)
        return contract_rows(
            flat, layout, batch, offset, row_length, iy, wy, ix, wx, dtype, min_row_length=width
        )
    b = batch[:, None, None]
    return contract_taps_with(
        lambda rows, cols: read(features, layout, b, rows, cols), iy, wy, ix, wx, dtype
    )


def contract_taps_with(
    reader, iy: Array, wy: Array, ix: Array, wx: Array, dtype, *, rolled: bool | None = None
) -> Array:
    """:func:`contract_taps` for any ``reader(rows [K,PH,PW], cols [K,PH,PW]) -> [K,PH,PW,C]``.

    Lets ops that address the map differently (a flat concatenation of FPN
    levels, a channel group per bin) share the same tap loop. Up to
    ``TUNING.unroll_limit`` tap pairs are unrolled (one fused loop, nothing larger than
    the output); a wider window goes through a ``lax.scan`` over its rows, each
    step ``B`` reads, which keeps compile time and the backward's memory flat.
    ``rolled``: that choice made by the caller (a narrower window read as a wider
    one would be, row by row, sums the same taps in the same order: the same bits).
    """
    if iy.ndim == 3:
        iy, wy = iy[:, :, None, :], wy[:, :, None, :]
    if ix.ndim == 3:
        ix, wx = ix[:, None, :, :], wx[:, None, :, :]

    def rows_sum(iy: Array, wy: Array) -> Array:
        acc = None
        for a in range(iy.shape[-1]):
            rows = iy[..., a]
            row_w = wy[..., a]
            for t in range(ix.shape[-1]):
                w = (row_w * wx[..., t])[..., None]
                term = w * reader(rows, ix[..., t]).astype(dtype)
                acc = term if acc is None else acc + term
        assert acc is not None
        return acc

    if rolled is None:
        rolled = iy.shape[-1] * ix.shape[-1] > TUNING.unroll_limit
    if not rolled or iy.shape[-1] == 1:
        return rows_sum(iy, wy)

    def step(acc, taps):
        return acc + rows_sum(taps[0][..., None], taps[1][..., None]), None

    # The first row starts the sum (not zeros), so the carry has the data's
    # sharding type also inside shard_map.
    rest = (jnp.moveaxis(iy[..., 1:], -1, 0), jnp.moveaxis(wy[..., 1:], -1, 0))
    out, _ = jax.lax.scan(step, rows_sum(iy[..., :1], wy[..., :1]), rest)
    return out


def contract_dense(
    features: Array,
    layout: DataFormat,
    batch: Array,
    wy: Array,
    wx: Array,
    dtype,
    chunk: int = 16,
) -> Array:
    """The same sum with dense weights over the whole map.

    ``wy [K, PH, H]`` and ``wx [K, PW, W]`` (separable): two matmuls per box
    (``Wy . F . Wx^T``). Per-bin weights ``wy [K, PH, PW, H]`` / ``wx [K, PH, PW, W]``
    are accepted too. The image is picked by a one-hot weight so there is no
    gather; boxes go in chunks to bound the intermediate.
    """
    return contract_dense_of(features, layout, batch, lambda w: w, (wy, wx), dtype, chunk)


def dense_chunk(f: Array, layout: DataFormat, b_c: Array, wy_c: Array, wx_c: Array, dtype) -> Array:
    """One chunk of :func:`contract_dense_of`: the map ``f`` (already in ``dtype``)
    contracted with a few boxes' dense weights, the image picked by a one-hot."""
    n = f.shape[0]
    chw = "nhwc" if layout is DataFormat.NHWC else "nchw"
    onehot = (b_c[:, None] == jnp.arange(n)).astype(dtype)
    if wy_c.ndim == 3 and wx_c.ndim == 3:
        wyn = wy_c[:, :, None, :] * onehot[:, None, :, None]
        z = jnp.einsum(f"kpnh,{chw}->kpwc", wyn, f, precision=_HIGHEST)
        return jnp.einsum("kpwc,kqw->kpqc", z, wx_c, precision=_HIGHEST)
    ph, pw = (wy_c.shape[1], wx_c.shape[-2]) if wx_c.ndim == 3 else wx_c.shape[1:3]
    wy4 = jnp.broadcast_to(
        wy_c[:, :, None, :] if wy_c.ndim == 3 else wy_c,
        (wy_c.shape[0], ph, pw, f.shape[1 if chw == "nhwc" else 2]),
    )
    wx4 = jnp.broadcast_to(
        wx_c[:, None, :, :] if wx_c.ndim == 3 else wx_c, (wx_c.shape[0], ph, pw, wx_c.shape[-1])
    )
    wyn = wy4[:, :, :, None, :] * onehot[:, None, None, :, None]
    z = jnp.einsum(f"kabnh,{chw}->kabwc", wyn, f, precision=_HIGHEST)
    return jnp.einsum("kabwc,kabw->kabc", z, wx4, precision=_HIGHEST)


def contract_dense_of(
    features: Array, layout: DataFormat, batch: Array, weights, params, dtype, chunk: int = 16
) -> Array:
    """:func:`contract_dense` of ``weights(params_chunk) -> (wy, wx)``, the weights
    made chunk by chunk from ``params`` (a pytree of ``[K, ...]`` arrays; padded
    boxes get zeros), so that no ``[K, P, H]`` array exists, nor in the VJP (each
    chunk is rematerialized)."""
    f = features.astype(dtype)

    def one(args):
        params_c, b_c = args
        wy_c, wx_c = weights(params_c)
        return dense_chunk(f, layout, b_c, wy_c, wx_c, dtype)

    # Rematerialised: autodiff would store every chunk's ``Wy . F`` (``[K, PH, W, C]``)
    # for the weights' gradient, also when this path is a branch not taken.
    one = jax.checkpoint(one)
    k = batch.shape[0]
    if k <= chunk:
        return one((params, batch))
    pad = -k % chunk

    def cut(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((-1, chunk) + x.shape[1:])

    out = jax.lax.map(one, jax.tree.map(cut, (params, batch)))
    return out.reshape((-1,) + out.shape[2:])[:k]


# ---------------------------------------------------------------------------
# Separable taps on a row-major map, with a box-by-box transpose.
# ---------------------------------------------------------------------------


def flat_view(features: Array, layout: DataFormat) -> tuple[Array, int]:
    """``[N, H * W, C]`` (NHWC) or ``[N, C, H * W]`` (NCHW) view of a map, and ``W``."""
    if layout is DataFormat.NHWC:
        n, h, w, c = features.shape
        return features.reshape(n, h * w, c), w
    n, c, h, w = features.shape
    return features.reshape(n, c, h * w), w


def concat_levels(
    flats: Sequence[Array], widths: Sequence[int], layout: DataFormat, level: Array
) -> tuple[Array, Array, Array]:
    """The levels' flat views (:func:`flat_view`) as one flat map, with each box's
    level offset into it and row length (``[K]`` int32): the arguments a flat
    read of :func:`contract_rows` takes for boxes on several levels."""
    axis = 1 if layout is DataFormat.NHWC else 2
    sizes = [f.shape[axis] for f in flats]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return (
        jnp.concatenate(list(flats), axis=axis),
        by_level(offsets, level, jnp.int32),
        by_level(np.asarray(widths), level, jnp.int32),
    )


def read_flat(flat: Array, layout: DataFormat, b: Array, pos: Array) -> Array:
    """``flat[b, pos]`` as ``[..., C]`` for either flat layout (indices in range).

    The gather written out: NumPy-style indexing would first wrap negative
    indices (a compare and a select per index array and per read), which the
    callers' indices, clipped into range, never are; those ops made a tenth of
    the lowering time of a program with many tap reads."""
    b, pos = jnp.broadcast_arrays(b, pos)
    idx = jnp.stack([b.astype(jnp.int32), pos.astype(jnp.int32)], axis=-1)
    nhwc = layout is DataFormat.NHWC
    c = flat.shape[2] if nhwc else flat.shape[1]
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=(idx.ndim - 1,),
        collapsed_slice_dims=(0, 1) if nhwc else (0, 2),
        start_index_map=(0, 1) if nhwc else (0, 2),
    )
    return jax.lax.gather(
        flat,
        idx,
        dnums,
        (1, 1, c) if nhwc else (1, c, 1),
        mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )


def contract_rows(
    flat: Array,
    layout: DataFormat,
    batch: Array,
    offset: Array,
    row_length: Array,
    iy: Array,
    wy: Array,
    ix: Array,
    wx: Array,
    dtype,
    *,
    min_row_length: int,
    row_vjp: bool = True,
) -> Array:
    """:func:`contract_taps` on a flat map: row ``r``, column ``c`` of box ``k`` is
    ``flat[batch[k], offset[k] + r * row_length[k] + c]`` (one map, or FPN levels
    concatenated). Separable taps ``[K, P, T]``; returns ``[K, PH, PW, C]``.

    Differentiable in ``flat``, ``wy`` and ``wx`` (reverse mode, first order). The
    feature gradient is :func:`rows_transpose`: per box, the cotangent is
    contracted with the x-weights of a run of columns and added row by row with
    ``dynamic_update_slice``, in box order -- no scatter, so it is the same bits
    on every run and every backend, and nothing the size of the taps is stored.
    ``row_vjp=False`` leaves the gradient to autodiff (a scatter-add of the taps).
    """
    if not row_vjp:
        return _rows_forward(layout, dtype, flat, wy, wx, batch, offset, row_length, iy, ix)
    op, _ = _rows_ops(
        layout,
        np.dtype(dtype),
        min(TUNING.row_chunk, int(min_row_length)),
        tuple(flat.shape),
        np.dtype(flat.dtype),
    )
    return op(flat, wy, wx, batch, offset, row_length, iy, ix)


def _widen_bf16(bits: Array) -> Array:
    """bfloat16 values stored as ``uint16`` -> float32 (exact: the high half of the word)."""
    wide = jax.lax.shift_left(bits.astype(jnp.uint32), jnp.uint32(16))
    return jax.lax.bitcast_convert_type(wide, jnp.float32)


def _rows_forward(layout, dtype, flat, wy, wx, batch, offset, row_length, iy, ix, narrow=False):
    reader = _row_reader(layout, dtype, flat, batch, offset, row_length, narrow)
    return contract_taps_with(reader, iy, wy, ix, wx, dtype)


def _row_reader(layout, dtype, flat, batch, offset, row_length, narrow):
    """``reader(rows, cols)`` of :func:`contract_taps_with` for a flat map."""
    b = batch[:, None, None]
    base = offset[:, None, None]
    rl = row_length[:, None, None]
    if narrow and flat.dtype == jnp.bfloat16 and np.dtype(dtype).itemsize >= 4:
        # Gather the 16-bit words and widen only what was read: XLA:CPU gathers
        # bfloat16 in float32, i.e. from a float32 copy of the whole map (2x its
        # bytes); the integer view costs one 16-bit copy at most. No derivative
        # in ``flat`` (``narrow`` is for the custom-VJP op, whose map gradient
        # is the transpose).
        bits = jax.lax.bitcast_convert_type(flat, jnp.uint16)

        def reader(rows, cols):
            return _widen_bf16(read_flat(bits, layout, b, base + rows * rl + cols))

    else:

        def reader(rows, cols):
            return read_flat(flat, layout, b, base + rows * rl + cols)

    return reader


def _weights_grad_taps(layout, dtype, flat, wy, wx, ints, g, rolled=False):
    """``(d_wy, d_wx)`` of ``<g, forward(flat, wy, wx)>`` tap pair by tap pair: each
    pair's reads times ``g`` summed over the channels first (the contiguous axis),
    then weighted by the other axis' weights. Autodiff of the same sum stores
    every pair's reads (``[K, PH, PW, C]`` each) and reduces them over two axes:
    several times slower on XLA:CPU."""
    batch, offset, row_length, iy, ix = ints
    reader = _row_reader(layout, dtype, flat, batch, offset, row_length, True)
    g = jnp.asarray(g).astype(dtype)

    def row(a_iy, a_wy):
        """One y-tap's ``d_wy [K, PH]`` and its share of ``d_wx [K, PW, T]``."""
        d_wy: Any = 0.0
        d_wx = []
        for t in range(ix.shape[-1]):
            values = reader(a_iy[:, :, None], ix[:, None, :, t]).astype(dtype)
            pair = jnp.sum(g * values, axis=-1)  # [K, PH, PW]
            d_wy = d_wy + jnp.sum(pair * wx[:, None, :, t], axis=2)
            d_wx.append(jnp.sum(pair * a_wy[:, :, None], axis=1))
        return d_wy, jnp.stack(d_wx, axis=-1)

    if not rolled and iy.shape[-1] * ix.shape[-1] <= TUNING.unroll_limit:
        rows = [row(iy[..., a], wy[..., a]) for a in range(iy.shape[-1])]
        d_wy = jnp.stack([r[0] for r in rows], axis=-1)
        d_wx = sum((r[1] for r in rows[1:]), rows[0][1])
    else:  # a wide window: one y-tap per step, in order

        def step(acc, taps):
            d_wy, d_wx = row(*taps)
            return acc + d_wx, d_wy

        first_wy, first_wx = row(iy[..., 0], wy[..., 0])
        rest = (jnp.moveaxis(iy[..., 1:], -1, 0), jnp.moveaxis(wy[..., 1:], -1, 0))
        d_wx, rest_wy = jax.lax.scan(step, first_wx, rest)
        d_wy = jnp.concatenate([first_wy[..., None], jnp.moveaxis(rest_wy, 0, -1)], axis=-1)
    return d_wy.astype(wy.dtype), d_wx.astype(wx.dtype)


def weights_grad_rows(layout, dtype, flat, wy, wx, ints, g, rolled=False):
    """:func:`_weights_grad_taps` over chunks of boxes, in order.

    XLA:CPU does not fuse a gather into the reduction that consumes it, so every
    tap pair's reads (``[K, PH, PW, C]``, the output's size) are stored, and the
    scheduler may keep all of them at once: 16x the output for 2 x 2 samples,
    100x and more for adaptive windows. Chunks of boxes bound what is held to
    about ``TUNING.weights_grad_bytes`` and keep it in cache.
    """
    k, ph, a_n = wy.shape
    pw, t_n = wx.shape[1:]
    channels = g.shape[-1]
    live = a_n * t_n if not rolled and a_n * t_n <= TUNING.unroll_limit else t_n
    per_box = live * ph * pw * channels * np.dtype(dtype).itemsize
    # At least two boxes a step: with one, XLA:CPU's gathers lose the box axis
    # and run several times slower (mask_p3: 300 ms against 90 ms for two).
    chunk = min(k, max(2, TUNING.weights_grad_bytes // max(per_box, 1)))
    if chunk >= k:
        return _weights_grad_taps(layout, dtype, flat, wy, wx, ints, g, rolled)
    g = jnp.asarray(g)

    def step(i, carry):
        # The last chunk ends at box K (overlapping the one before it: the same
        # boxes give the same values), so nothing is padded or copied.
        start = jnp.minimum(i * chunk, k - chunk)

        def cut(x):
            return jax.lax.dynamic_slice_in_dim(x, start, chunk)

        parts = _weights_grad_taps(
            layout, dtype, flat, cut(wy), cut(wx), tuple(map(cut, ints)), cut(g), rolled
        )
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(acc, part, start, 0)
            for acc, part in zip(carry, parts, strict=True)
        )

    init = _shard.varying((jnp.zeros_like(wy), jnp.zeros_like(wx)), flat, wy, wx, g)
    return jax.lax.fori_loop(0, -(-k // chunk), step, init)


def _is_zero(x: Any) -> bool:
    return isinstance(x, jax.custom_derivatives.SymbolicZero)


@functools.lru_cache(maxsize=256)
def _rows_ops(
    layout: DataFormat,
    dtype: Any,
    chunk: int,
    flat_shape: tuple,
    flat_dtype: Any,
    row_unroll: int = TUNING.row_unroll,
):
    """``(op, transpose)``: :func:`contract_rows` as a ``custom_vjp`` whose VJP is
    the transpose in the map (:func:`rows_transpose`) and the weights' gradient,
    and that transpose. First order: higher orders differentiate the plain-JAX
    implementation (:mod:`jax_roialign._dispatch`)."""
    # Nested jits: each is traced once per argument shape and reused (autodiff
    # traces a backward more than once).
    forward = jax.jit(functools.partial(_rows_forward, layout, dtype, narrow=True))

    # <g, op(flat, wy, wx)> is linear in wy and in wx; the reads of ``flat`` are
    # constants here (no scatter), summed over the channels per tap pair.
    weights_grad = jax.jit(functools.partial(weights_grad_rows, layout, dtype))

    @jax.jit
    def transpose(g, wy, wx, *ints):
        batched = _batched_rows_transpose(layout, dtype, chunk, flat_shape, row_unroll)
        return batched(g, wy, wx, *ints).astype(flat_dtype)

    @jax.custom_vjp
    def op(flat, wy, wx, *ints):
        return forward(flat, wy, wx, *ints)

    def op_fwd(*args):
        # symbolic_zeros: each argument says whether it is differentiated; the
        # residuals record which parts of the gradient anybody asked for.
        values = tuple(a.value for a in args)
        wanted = (args[0].perturbed, args[1].perturbed or args[2].perturbed)
        return forward(*values), (values, wanted)

    def op_bwd(res, cot):
        (flat, wy, wx, *ints), (want_map, want_weights) = res
        d_map = d_wy = d_wx = None
        if not _is_zero(cot):
            if want_map:
                d_map = transpose(cot, wy, wx, *ints)
            if want_weights:
                d_wy, d_wx = weights_grad(flat, wy, wx, tuple(ints), cot)
        return (d_map, d_wy, d_wx) + (None,) * len(ints)

    op.defvjp(op_fwd, op_bwd, symbolic_zeros=True)
    return op, transpose


@functools.lru_cache(maxsize=256)
def _batched_rows_transpose(
    layout: DataFormat,
    dtype: Any,
    chunk: int,
    flat_shape: tuple,
    row_unroll: int = TUNING.row_unroll,
):
    """:func:`rows_transpose` with a vmap rule that folds the vmapped axis into the
    images: ``B`` maps of ``N`` images are one map of ``B * N`` images and the
    boxes of all of them one list. Plain batching would turn every row add into a
    scatter and the per-box loops into loops over the whole batch with selects
    over the whole map."""

    @jax.custom_batching.custom_vmap
    def fn(g, wy, wx, batch, offset, row_length, iy, ix):
        return rows_transpose(
            g,
            flat_shape,
            layout,
            wy,
            wx,
            batch,
            offset,
            row_length,
            iy,
            ix,
            dtype=dtype,
            chunk=chunk,
            row_unroll=row_unroll,
        )

    @fn.def_vmap
    def rule(axis_size, in_batched, g, wy, wx, batch, offset, row_length, iy, ix):
        args = [g, wy, wx, batch, offset, row_length, iy, ix]
        args = [
            a if batched else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
            for a, batched in zip(args, in_batched, strict=True)
        ]
        g, wy, wx, batch, offset, row_length, iy, ix = args
        n = flat_shape[0]
        batch = batch + n * jnp.arange(axis_size, dtype=batch.dtype)[:, None]
        flat = [a.reshape((-1,) + a.shape[2:]) for a in args]
        flat[3] = batch.reshape(-1)
        out = _batched_rows_transpose(
            layout, dtype, chunk, (axis_size * n,) + flat_shape[1:], row_unroll
        )(*flat)
        return out.reshape((axis_size,) + flat_shape), True

    return fn


def rows_transpose(
    g: Array,
    flat_shape: tuple[int, ...],
    layout: DataFormat,
    wy: Array,
    wx: Array,
    batch: Array,
    offset: Array,
    row_length: Array,
    iy: Array,
    ix: Array,
    *,
    dtype,
    chunk: int,
    row_unroll: int = TUNING.row_unroll,
) -> Array:
    """The transpose of :func:`contract_rows` in ``flat``: ``[N, L, C]`` / ``[N, C, L]``.

    For box ``k``, the columns its x-taps touch (nonzero weight) are covered by
    runs of ``chunk`` columns (one run for boxes up to ``chunk`` cells wide, more
    for wider ones, so any box is exact). For each run, ``u = g[k] . Wx_run``
    (``[PH, chunk, C]``, small matmuls) and each y-tap ``(ph, a)`` adds
    ``wy * u[ph]`` to its row. Every add is a ``dynamic_update_slice`` of a
    contiguous run. One loop runs over every box's runs, each in steps of at most
    ``TUNING.row_unroll`` row adds (its trip count is the boxes' total, no loop inside
    another); boxes, runs, bins and taps go in order, so the sum is
    deterministic.

    Outputs wider than ``TUNING.out_slice`` columns are cut into slices of
    ``TUNING.out_slice`` output columns, each a segment with its own runs: a run is
    contracted only with the output columns whose taps can reach it. Without
    slices, a 224-column crop contracts all 224 columns with every 32-column run,
    and most of that matmul multiplies zeros. Work per segment is
    ``taps_y * run_columns * min(PW, TUNING.out_slice) * C`` per run.
    """
    k_boxes, ph_n = iy.shape[0], iy.shape[1]
    a_n = iy.shape[2]
    pw_n = ix.shape[1]
    g = jnp.asarray(g).astype(dtype)
    # Segments: (box, slice of output columns). The last slice starts early
    # enough to be full width; the columns it shares with the slice before it
    # get weight 0 there, so each output column is added once.
    qs = min(pw_n, TUNING.out_slice)
    n_slices = -(-pw_n // qs)
    q_start = np.minimum(np.arange(n_slices) * qs, pw_n - qs)
    if n_slices > 1:
        cols_of = q_start[:, None] + np.arange(qs)  # [S, qs]
        own = cols_of >= (np.arange(n_slices) * qs)[:, None]
        ix_seg = ix[:, cols_of].reshape((k_boxes * n_slices, qs) + ix.shape[2:])
        wx_seg = jnp.where(own[None, :, :, None], wx[:, cols_of], 0).reshape(ix_seg.shape)
    else:
        ix_seg, wx_seg = ix, wx
    k_total = k_boxes * n_slices
    q_first = jnp.asarray(np.tile(q_start, k_boxes), jnp.int32)  # of each segment
    live_x = wx_seg != 0
    far = jnp.iinfo(jnp.int32).max
    x_lo = jnp.min(jnp.where(live_x, ix_seg, far), axis=(1, 2))
    x_hi = jnp.max(jnp.where(live_x, ix_seg + 1, 0), axis=(1, 2))
    live_y = jnp.any(wy != 0, axis=(1, 2))
    if n_slices > 1:
        live_y = jnp.repeat(live_y, n_slices)
    live = live_y & jnp.any(live_x, axis=(1, 2))
    runs = jnp.where(live, (x_hi - x_lo + chunk - 1) // chunk, 0)
    cols = jnp.arange(chunk, dtype=jnp.int32)
    nhwc = layout is DataFormat.NHWC

    # One step adds at most TUNING.row_unroll rows: ``group`` bins (a divisor of PH)
    # with all their y-taps, or, for bins with more taps than that, one bin's
    # taps in blocks of TUNING.row_unroll.
    if a_n <= row_unroll:
        group = max(d for d in range(1, ph_n + 1) if ph_n % d == 0 and d * a_n <= row_unroll)
        block, blocks = a_n, 1
    else:
        group, block, blocks = 1, row_unroll, -(-a_n // row_unroll)
    per_run = (ph_n // group) * blocks
    steps = runs * per_run
    # One bin a step with more taps than a short block: each box adds only the
    # blocks of taps its bins use (past them every weight is zero: the same adds
    # in the same order, the zeros left out). The cotangent's product is made at
    # a bin's first block and carried to its others.
    dynamic = blocks == 1 and group == 1 and a_n > TUNING.tap_block
    if dynamic:
        block = TUNING.tap_block
        used = jnp.max(jnp.where(wy != 0, jnp.arange(1, a_n + 1, dtype=jnp.int32), 0), axis=(1, 2))
        blocks_k = jnp.maximum((used + block - 1) // block, 1)
        if n_slices > 1:
            blocks_k = jnp.repeat(blocks_k, n_slices)
        steps = runs * ph_n * blocks_k
    # One loop over every (box, run, step), boxes in order: a loop nested in a
    # loop costs XLA:CPU more than the work of a typical box. The carry holds
    # the box and its step; ``after[k]`` is the first box after ``k`` with steps.
    index = jnp.arange(k_total, dtype=jnp.int32)
    nxt = jnp.where(steps > 0, index, k_total)
    tail = jnp.concatenate([nxt[1:], jnp.array([k_total], jnp.int32)])
    after = jax.lax.cummin(tail, reverse=True)
    first = jnp.min(nxt)

    def add_row(acc, b, pos, value):
        # value: [chunk, C]. The indices are never negative, and saying so keeps
        # the read and the write at the same index expression: XLA then fuses
        # them into one in-place update (with wrap-around, two kernels per row).
        if nhwc:
            start = (b, pos, jnp.zeros_like(pos))
            size = (1, chunk, value.shape[-1])
            update = value[None]
        else:
            start = (b, jnp.zeros_like(pos), pos)
            size = (1, value.shape[-1], chunk)
            update = value.T[None]
        cur = jax.lax.dynamic_slice(acc, start, size, allow_negative_indices=False)
        return jax.lax.dynamic_update_slice(acc, cur + update, start, allow_negative_indices=False)

    def product(kc, kb, first_bin, start, lo):
        """``u = g[bins] . Wx_run``, ``[group, chunk, C]``."""
        ixk, wxk = ix_seg[kc], wx_seg[kc]
        inside = (ixk >= lo) & (ixk < lo + chunk)
        if n_slices > 1:
            gk = jax.lax.dynamic_slice(  # [group, qs, C]
                g[kb], (first_bin, q_first[kc], jnp.int32(0)), (group, qs, g.shape[-1])
            )
        else:  # one slice: the same program as without slices
            gk = jax.lax.dynamic_slice_in_dim(g[kb], first_bin, group)
        onehot = (ixk[..., None] - start == cols) & inside[..., None]
        wxd = jnp.sum(jnp.where(onehot, wxk[..., None], 0.0), axis=1)  # [qs, chunk]
        return jnp.einsum("pqc,qj->pjc", gk, wxd.astype(dtype), precision=_HIGHEST)

    def step(_, carry):
        acc, k, s, u_kept = carry
        kc = jnp.minimum(k, k_total - 1)  # the segment
        kb = kc // n_slices if n_slices > 1 else kc  # its box
        blocks_c = blocks_k[kc] if dynamic else blocks
        per_run_c = ph_n * blocks_c if dynamic else per_run
        run, rest = s // per_run_c, s % per_run_c
        first_bin = (rest // blocks_c) * group
        first_tap = (rest % blocks_c) * block
        b, base, rl = batch[kb], offset[kb], row_length[kb]
        lo = x_lo[kc] + run * chunk
        start = jnp.clip(lo, 0, rl - chunk)
        if dynamic:
            u = jax.lax.cond(
                first_tap == 0,
                lambda: product(kc, kb, first_bin, start, lo),
                lambda: u_kept,
            )
        else:
            u = product(kc, kb, first_bin, start, lo)
        iyk = jax.lax.dynamic_slice_in_dim(iy[kb], first_bin, group)  # [group, A]
        wyk = jax.lax.dynamic_slice_in_dim(wy[kb], first_bin, group)
        short = (-(-a_n // block) if dynamic else blocks) * block > a_n
        for p in range(group):
            for i in range(block):
                a = first_tap + i
                weight = wyk[p, jnp.minimum(a, a_n - 1)]
                if short:  # the last block is short
                    weight = jnp.where(a < a_n, weight, 0.0)
                pos = base + iyk[p, jnp.minimum(a, a_n - 1)] * rl + start
                acc = add_row(acc, b, pos, weight * u[p])
        done = s + 1 == steps[kc]
        next_k = jnp.where(done, after[kc], k)
        return acc, next_k, jnp.where(done, 0, s + 1), u if dynamic else u_kept

    # Zeros typed like the cotangent (inside shard_map: varying over the same mesh
    # axes), so that the loop's carry keeps one type.
    u0 = jnp.zeros((group, chunk, g.shape[-1]), dtype) if dynamic else jnp.zeros((), dtype)
    init = (jax.lax.full_like(g, 0, dtype, flat_shape), first, jnp.int32(0), u0)
    init = _shard.varying(init, g, wy, wx, ix)
    acc, _, _, _ = jax.lax.fori_loop(0, jnp.sum(steps), step, init)
    return acc


# ---------------------------------------------------------------------------
# Separable taps on several maps (FPN levels), without concatenating them.
# ---------------------------------------------------------------------------


def contract_levels(
    flats: Sequence[Array],
    widths: Sequence[int],
    layout: DataFormat,
    batch: Array,
    level: Array,
    iy: Array,
    wy: Array,
    ix: Array,
    wx: Array,
    dtype,
    *,
    combine: Any = None,
    classes: tuple[Array, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    dense: tuple[Array, Any, Any] | None = None,
) -> Array:
    """:func:`contract_rows` of box ``k`` on its own map ``flats[level[k]]``
    (``[N, H_l * W_l, C]`` / ``[N, C, H_l * W_l]`` views, ``widths`` the ``W_l``),
    with no concatenation of the maps.

    Concatenating an FPN pyramid flat copies every level (P2 of two 800 x 1344
    images, C = 256: 137 MiB) on every call; on XLA:CPU the fresh buffer's page
    faults and the copy cost more than reading the boxes (the FPN step's forward:
    108 ms with it, about 50 without). Here the boxes are sorted by level
    (stably) and read in chunks of a few dozen boxes, each chunk from one level
    (``lax.switch``), and written back in place at their own rows. The feature
    gradient is :func:`rows_transpose` on each level, its boxes in order (the
    same adds as on the concatenation, so the same bits); the weights' gradient
    is read level by level and class by class as the forward is
    (:func:`weights_grads_by_class`), also without a concatenation.
    Under ``vmap`` the mapped axis is folded into the images (one loop, not one
    per mapped element). Differentiable in the maps and the weights (reverse
    mode).

    ``combine(reader, iy, wy, ix, wx, dtype)`` computes the value from the reads
    (default :func:`contract_taps_with`); a reference's own order of the same
    sum goes here (Model Garden's crops), the gradient staying that of the sum.

    ``classes = (cls, (rows, cols))``: box ``k``'s forward reads only the first
    ``rows[cls[k]]`` y-taps and ``cols[cls[k]]`` x-taps of its ``iy``/``ix``
    (the others must have zero weight: the same sum, the same bits), the boxes
    sorted by level and class. The gradients read every tap, as without it.

    ``dense = (mask, grids, weights)``: boxes ``mask [K]`` read instead with
    dense weights over their own level, ``weights(grids of a few boxes) -> (wy,
    wx)`` (``[c, PH, L]``, ``[c, PW, L]`` over the largest level; ``grids`` a
    pytree of ``[K, ...]`` arrays, differentiable in its float leaves), a few
    boxes at a time: exact for any box.
    """
    flats = tuple(flats)
    ladder: tuple[tuple[int, ...], tuple[int, ...]]
    if classes is None:
        cls = jnp.zeros(batch.shape, jnp.int32)
        ladder = ((iy.shape[-1],), (ix.shape[-1],))
    else:
        cls, (rows, cols) = classes
        ladder = (tuple(int(t) for t in rows), tuple(int(t) for t in cols))
    if len(flats) == 1 and combine is None and classes is None and dense is None:
        k = batch.shape[0]
        return fence(
            contract_rows(
                flats[0],
                layout,
                batch,
                jnp.zeros((k,), jnp.int32),
                jnp.full((k,), widths[0], jnp.int32),
                iy,
                wy,
                ix,
                wx,
                dtype,
                min_row_length=widths[0],
            )
        )
    op = _levels_op(
        layout,
        np.dtype(dtype),
        tuple(tuple(f.shape) for f in flats),
        tuple(int(w) for w in widths),
        np.dtype(flats[0].dtype),
        combine or contract_taps_with,
        ladder,
        None if dense is None else _dense_spec(dense),
    )
    key = level * len(ladder[0]) + cls
    floats: tuple = ()
    ints: tuple = ()
    if dense is not None:
        mask, grids, _ = dense
        key = jnp.where(mask, len(flats) * len(ladder[0]) + level, key)
        wy = jnp.where(mask[:, None, None], 0, wy)  # not read through a window
        floats, ints, _, _ = split_leaves(grids)
    return op(flats, wy, wx, batch, key, iy, ix, floats, ints)


def _dense_spec(dense: tuple[Array, Any, Any]) -> tuple[Any, Any, tuple[bool, ...]]:
    """``(weights, treedef, inexact)``: what rebuilds a dense read's grids."""
    _, grids, weights = dense
    _, _, treedef, inexact = split_leaves(grids)
    return weights, treedef, inexact


def split_leaves(tree: Any) -> tuple[tuple, tuple, Any, tuple[bool, ...]]:
    """``(floats, ints, treedef, inexact)``: ``tree``'s inexact leaves (what a
    custom VJP differentiates), its other leaves, and what :func:`join_leaves`
    needs to rebuild it."""
    leaves, treedef = jax.tree.flatten(tree)
    inexact = tuple(bool(jnp.issubdtype(x.dtype, jnp.inexact)) for x in leaves)
    floats = tuple(x for x, f in zip(leaves, inexact, strict=True) if f)
    ints = tuple(x for x, f in zip(leaves, inexact, strict=True) if not f)
    return floats, ints, treedef, inexact


def join_leaves(treedef: Any, inexact: tuple[bool, ...], floats: tuple, ints: tuple) -> Any:
    """The tree :func:`split_leaves` took apart (``floats``, ``ints`` possibly new)."""
    it_f, it_i = iter(floats), iter(ints)
    return jax.tree.unflatten(treedef, [next(it_f) if f else next(it_i) for f in inexact])


def _dense_plan(key: Array, n_levels: int, n_cls: int, chunk: int):
    """:func:`sorted_chunks` of the dense boxes (``key >= n_levels * n_cls``) by
    level: ``(chunks, at)``."""
    base = n_levels * n_cls
    level = jnp.where(key >= base, key - base, n_levels)
    first_chunk, _, at = sorted_chunks(level, n_levels + 1, chunk)
    return first_chunk[n_levels], at


def _dense_level_read(layout, dtype, shape, width, spec, lv_flat, floats, ints, batch, valid):
    """``[c, PH, PW, C]``: ``c`` boxes (their grids' leaves ``floats``, ``ints``,
    images ``batch``; the first ``valid`` their own, the others weight 0) read
    with dense weights from one level's flat map."""
    weights, treedef, inexact = spec
    wy, wx = weights(join_leaves(treedef, inexact, floats, ints))
    if layout is DataFormat.NHWC:
        n, hw, c = shape
        f = lv_flat.reshape(n, hw // width, width, c)
    else:
        n, c, hw = shape
        f = lv_flat.reshape(n, c, hw // width, width)
    own = (jnp.arange(batch.shape[0]) < valid).astype(wy.dtype)[:, None, None]
    wy = wy[..., : hw // width] * own
    return dense_chunk(f.astype(dtype), layout, batch, wy, wx[..., :width], dtype)


def put_rows(out: Array, rows: Array, part: Array, *, add: bool = False) -> Array:
    """``out`` with ``part[i]`` written at (or, with ``add``, added to) row
    ``rows[i]``, one dynamic-update-slice per row: an in-place copy, where a
    scatter would put a scatter in the program (which the TPU and the tests of
    the gather path keep out). Rows written twice take the last value (added
    rows add up)."""

    def one(i, out):
        new = part[i].astype(out.dtype)
        if add:
            new = new + jax.lax.dynamic_index_in_dim(out, rows[i], 0, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(out, new, rows[i], 0)

    return jax.lax.fori_loop(0, rows.shape[0], one, out)


def rows_by_cost(cost: Array, row_bytes: int, read: Any, out: Any) -> Any:
    """``out`` (a pytree of ``[K, ...]`` arrays) with every box's rows replaced
    by ``read(box)`` (``box``: ``[chunk]`` box indices; the same pytree of
    ``[chunk, ...]`` rows). The boxes are taken in the order of ``cost [K]`` (a
    stable sort), ``chunk`` at a time, so that the loops of ``read`` may run as
    long as the chunk's own costliest box needs, not the call's; ``chunk`` is
    ``TUNING.cost_chunk`` boxes at most, fewer where their rows (``row_bytes``
    each) pass ``TUNING.level_chunk_bytes`` (:func:`_levels_chunk`)."""
    k = cost.shape[0]
    if k == 0:
        return out
    chunk = min(TUNING.cost_chunk, _levels_chunk(k, row_bytes))
    order = jnp.argsort(cost, stable=True)

    def step(j, out):
        # The last chunk ends at box K (overlapping the one before it: the same
        # boxes give the same rows), so nothing is padded.
        box = jax.lax.dynamic_slice_in_dim(order, jnp.minimum(j * chunk, k - chunk), chunk)
        return jax.tree.map(lambda x, p: put_rows(x, box, p), out, read(box))

    return jax.lax.fori_loop(0, -(-k // chunk), step, out)


def sorted_chunks(key: Array, count: int, chunk: int):
    """Boxes grouped by ``key [K]`` (values ``0 .. count - 1``, a stable sort:
    :func:`jax_roialign._sampling.groups`), each group in chunks of ``chunk``,
    the chunks of all groups one loop: ``(first_chunk, total, at)``,
    ``first_chunk[g]`` being group ``g``'s first chunk, ``total`` the number of
    chunks, and ``at(j)`` chunk ``j``'s group, its boxes ``[chunk]`` (past the
    group's last box, repeats of it: written twice, the same value) and how
    many are its own."""
    order, starts, ends = groups(key, count)
    counts = (ends - starts + chunk - 1) // chunk
    first_chunk = jnp.cumsum(counts) - counts
    lanes = jnp.arange(chunk, dtype=jnp.int32)

    def at(j):
        g = jnp.sum(first_chunk[1:] <= j).astype(jnp.int32)
        first = starts[g] + (j - first_chunk[g]) * chunk
        box = order[jnp.minimum(first + lanes, ends[g] - 1)]
        return g, box, jnp.minimum(ends[g] - first, chunk)

    return first_chunk, jnp.sum(counts), at


def weights_grads_by_class(
    layout: DataFormat,
    dtype: Any,
    maps: Sequence[Array],
    wy: Array,
    wx: Array,
    ints: tuple[Array, ...],
    g: Array,
    plan: tuple[int, Any, Any],
    branches: Sequence[tuple[int, int, int]],
) -> tuple[Array, Array]:
    """``(d_wy, d_wx)`` of :func:`weights_grad_rows` with box ``k`` read from
    ``maps[m]`` (flat views) through a window of ``ty x tx`` taps only, ``(m, ty,
    tx) = branches[key[k]]``: ``plan = (chunk, chunks, at)``, the first ``chunks``
    chunks of :func:`sorted_chunks` on the keys (keys past the branches are not
    visited: their rows stay zero). ``ints = (batch, offset, row_length, iy,
    ix)``. Past a box's window a tap has zero weight and, out of every sample's
    reach, zero derivative: the same gradient, bit for bit."""
    chunk, chunks, at = plan

    def branch(m: int, ty: int, tx: int):
        def fn(box):
            b, offset, row_length, iy, ix = (x[box] for x in ints)
            cut = (b, offset, row_length, iy[..., :ty], ix[..., :tx])
            d_wy, d_wx = weights_grad_rows(
                layout, dtype, maps[m], wy[box][..., :ty], wx[box][..., :tx], cut, g[box], True
            )
            d_wy = jnp.pad(d_wy, [(0, 0), (0, 0), (0, wy.shape[-1] - ty)])
            return d_wy, jnp.pad(d_wx, [(0, 0), (0, 0), (0, wx.shape[-1] - tx)])

        return fn

    fns = [branch(*spec) for spec in branches]

    def step(j, carry):
        c, box, _ = at(j)  # a repeated box's rows are written twice, the same
        parts = jax.lax.switch(c, fns, box)
        return tuple(put_rows(acc, box, p) for acc, p in zip(carry, parts, strict=True))

    init = (jnp.zeros_like(wy), jnp.zeros_like(wx))
    init = _shard.varying(init, *maps, wy, wx, g)
    return jax.lax.fori_loop(0, chunks, step, init)


def _levels_chunk(k: int, out_row_bytes: int) -> int:
    return int(
        min(
            k,
            TUNING.level_max_boxes,
            max(TUNING.level_min_boxes, TUNING.level_chunk_bytes // out_row_bytes),
        )
    )


def _key_level(key: Array, n_cls: int, n_levels: int) -> Array:
    """Each box's level from its key (``level * n_cls + class``); a dense box's
    key (``n_levels * n_cls + level``) gives the last level (its window weights
    are zero, and the reads that use it skip it)."""
    return jnp.minimum(key // n_cls if n_cls > 1 else key, n_levels - 1)


def _windowed_plan(key: Array, n_windowed: int, out_row_bytes: int):
    """``(chunk, chunks, at)``: the boxes whose key is below ``n_windowed``
    sorted by key in chunks of :func:`_levels_chunk` boxes (:func:`sorted_chunks`;
    the keys past them, the dense boxes, sort last and are not visited)."""
    chunk = _levels_chunk(key.shape[0], out_row_bytes)
    first_chunk, _, at = sorted_chunks(key, n_windowed + 1, chunk)
    return chunk, first_chunk[n_windowed], at


def _levels_forward(
    layout, dtype, widths, combine, ladder, dense, flats, wy, wx, batch, key, iy, ix, floats, ints
):
    """The value of :func:`contract_levels`: the windowed boxes' read, then the
    dense boxes' (``dense``: :func:`_dense_spec`, or ``None``)."""
    out = _levels_windowed(
        layout, dtype, widths, combine, ladder, flats, wy, wx, batch, key, iy, ix
    )
    if dense is None:
        return out
    n_levels, piece = len(flats), TUNING.dense_chunk
    chunks, at = _dense_plan(key, n_levels, len(ladder[0]), piece)

    def branch(lv: int):
        def read(box, valid):
            rows = (tuple(x[box] for x in floats), tuple(x[box] for x in ints), batch[box])
            args = (dense, flats[lv], *rows, valid)
            return _dense_level_read(layout, dtype, flats[lv].shape, widths[lv], *args)

        return read

    branches = [branch(lv) for lv in range(n_levels)]

    def step(j, out):
        lv, box, valid = at(j)
        return put_rows(out, box, jax.lax.switch(lv, branches, box, valid), add=True)

    return jax.lax.fori_loop(0, chunks, step, out)


def _levels_windowed(layout, dtype, widths, combine, ladder, flats, wy, wx, batch, key, iy, ix):
    """The level- and class-sorted chunked read of the windowed boxes:
    ``key = level * len(ladder[0]) + class`` (a dense box's key, past these, is
    not read: its weights are zero)."""
    k, ph = iy.shape[:2]
    pw = ix.shape[1]
    n_levels = len(flats)
    channels = flats[0].shape[-1 if layout is DataFormat.NHWC else 1]
    narrow = flats[0].dtype == jnp.bfloat16 and np.dtype(dtype).itemsize >= 4
    n_cls = len(ladder[0])
    level = _key_level(key, n_cls, n_levels)
    if narrow and combine is contract_taps_with:
        # bfloat16 maps: the 16-bit words of all levels concatenated, one read of
        # every box, widened after the gather (as contract_rows). XLA:CPU makes
        # the integer view of a map a copy anyway; this one copy is as cheap as
        # one per level, and the one read faster than the chunked loop on 16-bit
        # words (FPN step: 58 against 75-90 ms).
        flat, offset, row_length = concat_levels(flats, widths, layout, level)
        reader = _row_reader(layout, dtype, flat, batch, offset, row_length, True)
        # Behind a fence, as every vectorized read: a loss on the output would
        # otherwise store every tap pair's term.
        return fence(combine(reader, iy, wy, ix, wx, dtype))
    # Each level's boxes, in order, class by class, in chunks; the chunks of all
    # levels and classes one loop (dense boxes, past them, are not read here).
    row_bytes = ph * pw * channels * np.dtype(dtype).itemsize
    _, total, at = _windowed_plan(key, n_levels * n_cls, row_bytes)

    def branch(lv: int, ty: int, tx: int):
        def read(maps, wy_c, wx_c, b_c, iy_c, ix_c):
            b = b_c[:, None, None]
            rl = widths[lv]

            def reader(rows, cols):
                return read_flat(maps[lv], layout, b, rows * rl + cols)

            if (ty, tx) == (iy_c.shape[-1], ix_c.shape[-1]):
                return combine(reader, iy_c, wy_c, ix_c, wx_c, dtype)
            # The widest window's first taps, summed in its order.
            rolled = iy_c.shape[-1] * ix_c.shape[-1] > TUNING.unroll_limit
            taps = (iy_c[..., :ty], wy_c[..., :ty], ix_c[..., :tx], wx_c[..., :tx])
            return combine(reader, *taps, dtype, rolled=rolled)

        return read

    windows = list(zip(*ladder, strict=True))
    branches = [branch(lv, ty, tx) for lv in range(n_levels) for ty, tx in windows]

    def step(j, out):
        lv, box, _ = at(j)
        part = jax.lax.switch(lv, branches, flats, wy[box], wx[box], batch[box], iy[box], ix[box])
        return put_rows(out, box, part)

    init = jnp.zeros((k, ph, pw, channels), dtype)
    init = _shard.varying(init, *flats, wy, wx, iy)
    return jax.lax.fori_loop(0, total, step, init)


@functools.lru_cache(maxsize=64)
def _levels_op(
    layout: DataFormat,
    dtype: Any,
    shapes: tuple,
    widths: tuple,
    flat_dtype: Any,
    combine: Any,
    ladder: tuple[tuple[int, ...], tuple[int, ...]],
    dense: Any = None,
):
    """The ``custom_vjp`` op of :func:`contract_levels`:
    ``op(flats, wy, wx, batch, key, iy, ix, floats, ints)``, ``key = level *
    len(ladder[0]) + class`` (``n_levels * len(ladder[0]) + level`` for a dense
    box), ``floats`` and ``ints`` the dense reads' grids (:func:`_dense_spec`)."""
    n_levels = len(shapes)
    n_cls = len(ladder[0])
    pairs = [
        _rows_ops(
            layout,
            dtype,
            min(TUNING.row_chunk, widths[lv]),
            shapes[lv],
            flat_dtype,
            TUNING.level_unroll,
        )
        for lv in range(n_levels)
    ]

    @jax.custom_batching.custom_vmap
    def forward(flats, wy, wx, batch, key, iy, ix, floats, ints):
        args = (flats, wy, wx, batch, key, iy, ix, floats, ints)
        return _levels_forward(layout, dtype, widths, combine, ladder, dense, *args)

    @forward.def_vmap
    def forward_rule(axis_size, in_batched, *args):
        # B calls on N images each are one call on B * N images.
        def full(a, b):
            return a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))

        args = jax.tree.map(full, args, tuple(in_batched))
        flats, wy, wx, batch, key, iy, ix, floats, ints = args
        n = shapes[0][0]
        batch = batch + n * jnp.arange(axis_size, dtype=batch.dtype)[:, None]
        merged = jax.tree.map(
            lambda a: a.reshape((-1,) + a.shape[2:]),
            (flats, wy, wx, batch, key, iy, ix, floats, ints),
        )
        inner = _levels_op(
            layout,
            dtype,
            tuple((axis_size * s[0],) + s[1:] for s in shapes),
            widths,
            flat_dtype,
            combine,
            ladder,
            dense,
        )
        out = inner(*merged)
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    @jax.custom_vjp
    def op(flats, wy, wx, batch, key, iy, ix, floats, ints):
        return forward(flats, wy, wx, batch, key, iy, ix, floats, ints)

    def fwd(flats, wy, wx, batch, key, iy, ix, floats, ints):
        # symbolic_zeros: each argument says whether it is differentiated.
        wanted = (
            any(f.perturbed for f in flats),
            wy.perturbed or wx.perturbed,
            any(f.perturbed for f in floats),
        )
        flats = tuple(f.value for f in flats)
        wy, wx = wy.value, wx.value
        floats = tuple(f.value for f in floats)
        grid_ints = tuple(i.value for i in ints)
        ints = (batch.value, key.value, iy.value, ix.value)
        # ``op``, not ``forward``: when this rule is itself differentiated (second
        # order) the value goes through op's rule again (a custom_vmap has no JVP).
        out = op(flats, wy, wx, *ints, floats, grid_ints)
        return out, (flats, wy, wx, ints, floats, grid_ints, wanted)

    def dense_grads(flats, floats, grid_ints, batch, key, g, d_flats, want_maps, want_grids):
        """The dense boxes' gradients added to ``d_flats`` (the maps', ``()`` when
        not wanted) and to zeros (their grids' float leaves): each chunk's VJP, in
        order."""
        chunks, at = _dense_plan(key, n_levels, n_cls, TUNING.dense_chunk)

        def branch(lv: int):
            def fn(box, valid, d_flats, d_floats):
                ints_c = tuple(x[box] for x in grid_ints)

                def part(flat, fl):
                    args = (dense, flat, fl, ints_c, batch[box], valid)
                    return _dense_level_read(layout, dtype, shapes[lv], widths[lv], *args)

                _, vjp = jax.vjp(part, flats[lv], tuple(x[box] for x in floats))
                d_flat, d_fl = vjp(g[box].astype(dtype))
                if want_maps:
                    d_flats = tuple(
                        d + d_flat.astype(d.dtype) if i == lv else d for i, d in enumerate(d_flats)
                    )
                if want_grids:
                    d_floats = tuple(
                        put_rows(acc, box, x, add=True)
                        for acc, x in zip(d_floats, d_fl, strict=True)
                    )
                return d_flats, d_floats

            return fn

        branches = [branch(lv) for lv in range(n_levels)]

        def step(j, carry):
            lv, box, valid = at(j)
            return jax.lax.switch(lv, branches, box, valid, *carry)

        init = (d_flats, tuple(jnp.zeros_like(x) for x in floats))
        init = _shard.varying(init, g, *flats)
        return jax.lax.fori_loop(0, chunks, step, init)

    def bwd(res, g):
        flats, wy, wx, (batch, key, iy, ix), floats, grid_ints, wanted = res
        want_maps, want_weights, want_grids = wanted
        d_floats: Any = tuple(None for _ in floats)
        level = _key_level(key, n_cls, n_levels)
        d_flats: Any = (None,) * n_levels
        d_wy = d_wx = None
        k = batch.shape[0]
        if not _is_zero(g):
            if want_maps:
                zero = jnp.zeros((k,), jnp.int32)
                d_flats = tuple(
                    pairs[lv][1](
                        g,
                        wy * (level == lv).astype(wy.dtype)[:, None, None],
                        wx,
                        batch,
                        zero,
                        jnp.full((k,), widths[lv], jnp.int32),
                        iy,
                        ix,
                    )
                    for lv in range(n_levels)
                )
            if want_weights:
                # Each box from its own level's map (no concatenation of the
                # levels), through its own class's window.
                ints = (
                    batch,
                    jnp.zeros((k,), jnp.int32),
                    by_level(np.asarray(widths), level, jnp.int32),
                )
                row_bytes = wy.shape[1] * wx.shape[1] * g.shape[-1] * np.dtype(dtype).itemsize
                plan = _windowed_plan(key, n_levels * n_cls, row_bytes)  # as the forward's
                windows = list(zip(*ladder, strict=True))
                branches = [(lv, ty, tx) for lv in range(n_levels) for ty, tx in windows]
                d_wy, d_wx = weights_grads_by_class(
                    layout, dtype, flats, wy, wx, (*ints, iy, ix), g, plan, branches
                )
            if dense is not None and (want_maps or want_grids):
                d_maps = d_flats if want_maps else ()
                args = (flats, floats, grid_ints, batch, key, g, d_maps, want_maps, want_grids)
                d_maps, d_fl = dense_grads(*args)
                if want_maps:
                    d_flats = d_maps
                if want_grids:
                    d_floats = d_fl
        ints_none = tuple(None for _ in grid_ints)
        return (d_flats, d_wy, d_wx, None, None, None, None, d_floats, ints_none)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op
