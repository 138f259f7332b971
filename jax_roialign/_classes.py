"""Boxes read by window class: each box through the smallest window it fits.

Shapes are static, so a read whose window is decided for the whole call makes
every box pay for the call's largest bin (and one box larger than the map sent
every box to the dense weights). Here each box gets its own *class*: the index
of the smallest window tier (:meth:`jax_roialign._tuning.Tuning.window_tiers`)
that every bin of it fits, or the dense class past the last tier. The boxes
are sorted by class (stably) and read in chunks, each chunk through its class's
static window (one ``lax.switch`` branch per class), and written back at their
own rows, as the FPN read sorts its boxes by level
(:func:`jax_roialign._contract.contract_levels`).

A box's numbers depend on its own class only: its taps are the first rows and
columns of the widest tier's (zero weight past what it needs), summed in the
order of the old call-level read of that window. The feature gradient is the
row-window transpose over every box in box order, as before (the zero taps add
nothing, so it is the same sum whatever the window), plus the dense boxes'
transpose. The weights' gradient is read class by class as the forward is,
each box through its own window (past it, a tap's weight is zero with zero
derivative, so the box gradient is the one through any larger window); zero
for dense boxes, whose box gradient goes to their grids instead.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _sampling, _shard
from ._contract import (
    _batched_rows_transpose,
    _is_zero,
    _levels_chunk,
    _row_reader,
    contract_taps_with,
    dense_chunk,
    flat_view,
    join_leaves,
    put_rows,
    sorted_chunks,
    split_leaves,
    weights_grads_by_class,
)
from ._tuning import TUNING
from ._validation import DataFormat

Array = jax.Array


def read(
    features: Array,
    layout: DataFormat,
    batch: Array,
    cls: Array,
    taps: tuple[tuple[Array, Array], tuple[Array, Array]],
    windows: tuple[tuple[int, ...], tuple[int, ...]],
    grids: Any,
    dtype: Any,
    *,
    choice: Array,
    grad_windows: tuple[tuple[int, ...], tuple[int, ...]],
) -> Array:
    """``[K, PH, PW, C]``: box ``k`` read through window ``windows[cls[k]]`` of the
    widest tier's ``taps`` (``((iy, wy), (ix, wx))``, ``[K, P, T]``), or, for
    ``cls[k] == len(windows[0])``, with dense weights made from ``grids`` (a
    pytree of ``[K, ...]`` arrays, ``weights(grids)`` of :func:`dense_weights`).
    Differentiable in ``features``, the tap weights and the float leaves of
    ``grids`` (reverse mode, first order). The feature gradient of the boxes
    read through windows is taken through ``grad_windows[choice]`` (a window
    every one of them fits), the call-level read's, so it is its numbers; their
    tap weights' gradient through each box's own window."""
    (iy, wy), (ix, wx) = taps
    floats, ints, treedef, inexact = split_leaves(grids)
    op = _class_op(
        layout,
        np.dtype(dtype),
        tuple(features.shape),
        np.dtype(features.dtype),
        windows,
        grad_windows,
        treedef,
        inexact,
    )
    choice = jnp.reshape(choice, (1,)).astype(jnp.int32)
    return op(features, wy, wx, floats, batch, cls, choice, iy, ix, ints)


def dense_weights(grids: Any) -> tuple[Array, Array]:
    """The dense weights ``(wy * ok, wx)`` of ``grids = (gy, gx, ok)``."""
    gy, gx, ok = grids
    wy, wx = _sampling.both_dense(gy, gx)
    return wy * ok, wx


def _channels(features_shape, layout):
    return features_shape[3 if layout is DataFormat.NHWC else 1]


@functools.lru_cache(maxsize=64)
def _class_op(
    layout: DataFormat,
    dtype: Any,
    shape: tuple,
    map_dtype: Any,
    windows: tuple[tuple[int, ...], tuple[int, ...]],
    grad_windows: tuple[tuple[int, ...], tuple[int, ...]],
    treedef: Any,
    inexact: tuple[bool, ...],
):
    """The ``custom_vjp`` op of :func:`read`:
    ``op(features, wy, wx, floats, batch, cls, choice, iy, ix, ints)``."""
    n_taps = len(windows[0])
    width = shape[2] if layout is DataFormat.NHWC else shape[3]
    chunk_cols = min(TUNING.row_chunk, width)

    def grids_of(floats, ints):
        return join_leaves(treedef, inexact, floats, ints)

    def class_chunks(cls, k, ph, pw):
        """``(chunk, *sorted_chunks(cls, ...))``: the boxes sorted by class in
        chunks, as :func:`jax_roialign._contract._levels_forward` reads levels."""
        row_bytes = ph * pw * _channels(shape, layout) * np.dtype(dtype).itemsize
        chunk = _levels_chunk(k, row_bytes)
        return (chunk, *sorted_chunks(cls, n_taps + 1, chunk))

    def dense_read(f, batch_c, grids_c):
        wy_c, wx_c = dense_weights(grids_c)
        return dense_chunk(f, layout, batch_c, wy_c, wx_c, dtype)

    def forward(features, wy, wx, floats, batch, cls, choice, iy, ix, ints):
        grids = grids_of(floats, ints)
        k, ph = wy.shape[:2]
        pw = ix.shape[1]
        channels = _channels(shape, layout)
        chunk, _, total, at = class_chunks(cls, k, ph, pw)
        flat, _ = flat_view(features, layout)

        def taps_branch(ty: int, tx: int):
            def fn(box, _):
                b = batch[box]
                zero = jnp.zeros_like(b)
                reader = _row_reader(layout, dtype, flat, b, zero, zero + width, True)
                return contract_taps_with(
                    reader,
                    iy[box][..., :ty],
                    wy[box][..., :ty],
                    ix[box][..., :tx],
                    wx[box][..., :tx],
                    dtype,
                )

            return fn

        def dense_branch(box, valid):
            # Only the chunk's own boxes (not its repeats of the last one), a few
            # at a time: a dense read costs a whole map's contraction per box.
            piece = TUNING.dense_chunk
            box = jnp.concatenate([box, jnp.full((-chunk % piece,), box[-1])])
            f = features.astype(dtype)

            def one(j, out):
                b = jax.lax.dynamic_slice_in_dim(box, j * piece, piece)
                part = dense_read(f, batch[b], jax.tree.map(lambda x: x[b], grids))
                return jax.lax.dynamic_update_slice_in_dim(out, part, j * piece, 0)

            out = jnp.zeros((box.shape[0], ph, pw, channels), dtype)
            out = _shard.varying(out, features, wy)
            out = jax.lax.fori_loop(0, (valid + piece - 1) // piece, one, out)
            # The repeats of the last box take its value.
            return out[jnp.minimum(jnp.arange(chunk), valid - 1)]

        branches = [taps_branch(ty, tx) for ty, tx in zip(*windows, strict=True)]
        branches.append(dense_branch)

        def step(j, out):
            c, box, valid = at(j)  # a repeated box is written twice, the same value
            return put_rows(out, box, jax.lax.switch(c, branches, box, valid))

        init = jnp.zeros((k, ph, pw, channels), dtype)
        init = _shard.varying(init, features, wy, wx, iy)
        return jax.lax.fori_loop(0, total, step, init)

    def dense_grads(features, floats, ints, batch, cls, g, want_map, want_grids):
        """The dense boxes' share of the gradients: their chunks' VJPs, in order."""
        chunk = TUNING.dense_chunk
        f = features.astype(dtype)
        order, starts, ends = _sampling.groups(cls, n_taps + 1)
        first, end = starts[n_taps], ends[n_taps]
        lanes = jnp.arange(chunk, dtype=jnp.int32)

        def step(j, carry):
            d_f, d_floats = carry
            pos = first + j * chunk + lanes
            box = order[jnp.minimum(pos, end - 1)]
            # Lanes past the last dense box repeat it with a zero cotangent.
            g_c = jnp.where((pos < end)[:, None, None, None], g[box], 0).astype(dtype)
            floats_c = tuple(x[box] for x in floats)
            ints_c = tuple(x[box] for x in ints)

            def fn(f, floats_c):
                return dense_read(f, batch[box], grids_of(floats_c, ints_c))

            _, vjp = jax.vjp(fn, f, floats_c)
            df_c, dfl_c = vjp(g_c)
            if want_map:
                d_f = d_f + df_c
            if want_grids:
                d_floats = tuple(
                    put_rows(acc, box, d, add=True) for acc, d in zip(d_floats, dfl_c, strict=True)
                )
            return d_f, d_floats

        init = (jnp.zeros(f.shape, dtype), tuple(jnp.zeros_like(x) for x in floats))
        init = _shard.varying(init, features, g)
        steps = (end - first + chunk - 1) // chunk
        return jax.lax.fori_loop(0, steps, step, init)

    def map_grad(wy, wx, batch, cls, choice, iy, ix, g):
        """The windowed boxes' feature gradient: the row-window transpose through
        ``grad_windows[choice]`` (every windowed box fits it), dense boxes'
        weights zeroed."""
        k = batch.shape[0]
        zero = jnp.zeros((k,), jnp.int32)
        ints5 = (batch, zero, zero + width)
        n, a, b, c = shape  # NHWC: [N, H*W, C]; NCHW: [N, C, H*W]
        flat_shape = (n, a * b, c) if layout is DataFormat.NHWC else (n, a, b * c)
        transpose = _batched_rows_transpose(layout, dtype, chunk_cols, flat_shape)
        wy_tap = wy * (cls < n_taps)[:, None, None].astype(wy.dtype)

        def through(ty: int, tx: int):
            def fn():
                cut = (iy[..., :ty], ix[..., :tx])
                return transpose(g, wy_tap[..., :ty], wx[..., :tx], *ints5, *cut)

            return fn

        branches = [through(ty, tx) for ty, tx in zip(*grad_windows, strict=True)]
        return jax.lax.switch(jnp.max(choice), branches)

    def weights_grads(features, wy, wx, batch, cls, iy, ix, g):
        """``(d_wy, d_wx)``: each windowed box's through its own class's window (a
        tap past it has zero weight and, outside every sample's reach, zero
        derivative, so the box gradient is the same); zero for dense boxes."""
        k, ph = wy.shape[:2]
        chunk, first_chunk, _, at = class_chunks(cls, k, ph, wx.shape[1])
        flat, _ = flat_view(features, layout)
        zero = jnp.zeros((k,), jnp.int32)
        ints = (batch, zero, zero + width, iy, ix)
        # The dense class sorts last: its chunks are not visited.
        plan = (chunk, first_chunk[n_taps], at)
        branches = [(0, ty, tx) for ty, tx in zip(*windows, strict=True)]
        return weights_grads_by_class(layout, dtype, (flat,), wy, wx, ints, g, plan, branches)

    @jax.custom_batching.custom_vmap
    def batched_forward(features, wy, wx, floats, batch, cls, choice, iy, ix, ints):
        return forward(features, wy, wx, floats, batch, cls, choice, iy, ix, ints)

    @batched_forward.def_vmap
    def forward_rule(axis_size, in_batched, features, *rest):
        # B calls on N images each are one call on B * N images.
        args = (features, *rest)
        full = jax.tree.map(
            lambda a, b: a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a)),
            args,
            tuple(in_batched),
        )
        features, wy, wx, floats, batch, cls, choice, iy, ix, ints = full
        n = shape[0]
        batch = batch + n * jnp.arange(axis_size, dtype=batch.dtype)[:, None]

        def merge(a):
            return a.reshape((-1,) + a.shape[2:])

        inner = _class_op(
            layout,
            dtype,
            (axis_size * n,) + shape[1:],
            map_dtype,
            windows,
            grad_windows,
            treedef,
            inexact,
        )
        merged = jax.tree.map(merge, (features, wy, wx, floats, batch, cls, choice, iy, ix, ints))
        out = inner(*merged)
        return out.reshape((axis_size, -1) + out.shape[1:]), True

    @jax.custom_vjp
    def op(features, wy, wx, floats, batch, cls, choice, iy, ix, ints):
        return batched_forward(features, wy, wx, floats, batch, cls, choice, iy, ix, ints)

    def fwd(features, wy, wx, floats, batch, cls, choice, iy, ix, ints):
        want_map = features.perturbed
        want_weights = wy.perturbed or wx.perturbed
        want_grids = any(f.perturbed for f in floats)
        values = jax.tree.map(
            lambda a: a.value,
            (features, wy, wx, floats, batch, cls, choice, iy, ix, ints),
            is_leaf=lambda a: isinstance(a, jax.custom_derivatives.CustomVJPPrimal),
        )
        out = op(*values)
        return out, (values, (want_map, want_weights, want_grids))

    def bwd(res, g):
        (features, wy, wx, floats, batch, cls, choice, iy, ix, ints), wanted = res
        want_map, want_weights, want_grids = wanted
        d_map = d_wy = d_wx = None
        d_floats: Any = tuple(None for _ in floats)
        ints_none = tuple(None for _ in ints)
        if _is_zero(g):
            return (d_map, d_wy, d_wx, d_floats, None, None, None, None, None, ints_none)
        if want_map:
            d_map = map_grad(wy, wx, batch, cls, choice, iy, ix, g)
        if want_weights:
            d_wy, d_wx = weights_grads(features, wy, wx, batch, cls, iy, ix, g)
        if want_map or want_grids:
            d_f, d_fl = dense_grads(features, floats, ints, batch, cls, g, want_map, want_grids)
            if want_map:
                d_map = (d_map.reshape(shape) + d_f).astype(map_dtype)
            if want_grids:
                d_floats = d_fl
        return (d_map, d_wy, d_wx, d_floats, None, None, None, None, None, ints_none)

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    return op
