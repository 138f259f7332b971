"""How to read, as Pallas TPU kernels: the window reader's forward and transpose, box by box.

The same contraction as :func:`jax_roialign._window.contract_window` (and the
same inputs: the dense weights ``wy [K, PH, H]``, ``wx [K, PW, W]`` of
:mod:`jax_roialign._sampling` and each box's span of rows and columns), written
as a kernel instead of an XLA loop. One grid step per box:

- The box's first window (``h = min(16, H)`` rows and ``w = min(16, W)``
  columns at the box's first row and column, moved inside the map; copied as
  ``w + 8`` columns from an aligned column, see :class:`Sides`) is a block of
  the map with element offsets (``pl.Element``) read from the box table in SMEM
  (scalar prefetch), so Pallas copies the next box's window while this one is
  contracted. A box that spans more than one window reads the rest of its span
  in further windows, each copied by a DMA of its own while the one before is
  contracted (the rows and columns a window shares with the one before it
  count once), so no box is truncated.
- The window's x-weights are taken from the box's dense row of weights by a
  one-hot matrix product (exact at HIGHEST precision), and each row of the
  window is contracted with them on the MXU (``[PW, w] . [w, C]``).
- The y-weights, in SMEM, scale and add those rows into the output block
  ``[PH, PW, C]`` on the VPU.

Several maps (FPN levels): the boxes are visited level by level (a stable
sort), each level's windows being blocks of its own map; a level's window stays
where its last box left it while other levels' boxes go by, so nothing is
copied twice. Off TPU the kernel runs in Pallas' interpreter (the same
program, evaluated by XLA: slow, for tests).

The feature gradient is a kernel too (:func:`transpose`): one box per grid
step, in the table's order, each of its windows of the gradient copied into
VMEM, added to (``wy^T . g . wx``) and copied back before the next, so boxes
that share cells add in turn and the sum is the same on every run. The
weights' gradient (the box gradient) is the window reader's own
(:mod:`jax_roialign._window`), so ``implementation="pallas"`` has every gradient the
window path has, with no gather or scatter.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import _sampling
from ._tuning import TUNING

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST

# Block indices are int32 (a Python 0 would be int64 under x64, which Mosaic refuses).
_ZERO = np.int32(0)


def supported(plan, ph: int) -> bool:
    """Whether the kernel takes a read of ``plan`` with ``ph`` output rows: NHWC maps
    (the TPU's layout for convolutions; in NCHW a window's columns would be lanes,
    whose copies must start at multiples of 128), at most ``TUNING.pallas_max_rows`` rows, and
    whole-row strips (:class:`Sides`) of at most ``TUNING.pallas_max_strip`` bytes."""
    if plan.points or plan.taps or plan.group != 1 or plan.prep is not None:  # plain reads only
        return False
    if not plan.nhwc or ph > TUNING.pallas_max_rows or plan.dtype == np.dtype(np.float16):
        return False
    return all(
        not side.strip or side.h * width * plan.channels * dt.itemsize <= TUNING.pallas_max_strip
        for side, width, dt in zip(_sides(plan), plan.widths, plan.map_dtypes, strict=True)
    )


def _sublanes(dtype) -> int:
    """Rows of a TPU memory tile for ``dtype``: a copy's column offset must be a
    multiple of it (8 for 32-bit, 16 for 16-bit, 32 for 8-bit types)."""
    return 8 * max(1, 4 // np.dtype(dtype).itemsize)


class Sides(NamedTuple):
    """How one map's windows are copied.

    A window covers ``h`` rows at any row and ``w`` columns at any column. TPU
    copies of a map's columns must start at a multiple of ``align`` and span a
    multiple of 8 columns (or the whole width), so a window is copied as
    ``block`` columns (``w + align``) from the multiple of ``align`` at or
    before its first column. Where the map's width is not a multiple of
    ``align`` (``strip``), no such copy reaches its last columns; a window
    there is copied as the ``h`` whole rows.
    """

    h: int
    w: int
    block: int
    align: int
    strip: bool


def _sides(plan) -> list[Sides]:
    out = []
    for height, width, dt in zip(plan.heights, plan.widths, plan.map_dtypes, strict=True):
        a = _sublanes(dt)
        h, w = min(TUNING.pallas_window, height), min(TUNING.pallas_window, width)
        block = min(w + a, width)
        out.append(Sides(h, w, block, a, block < width and width % a != 0))
    return out


def _select(level: Array, values: list[int]) -> Array | int:
    """``values[level]`` per box (a plain int when every level has the same)."""
    if len(set(values)) == 1:
        return values[0]
    return _sampling.by_level(values, level, jnp.int32)


def _first_col(x0, width: int, cols: int, align: int):
    """The first column of a copy of ``cols`` columns holding column ``x0`` on: a
    multiple of ``align``, the copy inside the map (it may end before ``x0 + w``
    when ``W - cols`` is not a multiple of ``align``)."""
    if cols >= width:
        return jnp.zeros_like(x0)
    # x0 >= 0: a truncating division (a floor would lower through sign(), which
    # Mosaic resolves by asking for the device).
    last = (width - cols) // align * align
    return jnp.minimum(jax.lax.div(x0, jnp.int32(align)) * align, last)


def forward(plan, maps, wy: Array, wx: Array, batch, level, span_y, span_x) -> Array:
    """``out[k] = wy[k] . F[batch[k]] . wx[k]^T`` over box ``k``'s span: ``[K, PH, PW, C]``.

    As :func:`jax_roialign._window._forward` (flat tables), by a Pallas kernel;
    interpreted off TPU.
    """
    kernel = functools.partial(_call, plan, interpret=False)
    interpreted = functools.partial(_call, plan, interpret=True)
    args = (tuple(maps), wy, wx, batch, level, span_y, span_x)
    return jax.lax.platform_dependent(*args, tpu=kernel, default=interpreted)


def _table(plan, batch, level, span_y, span_x) -> tuple[Array, ...]:
    """The box table the kernels read from SMEM (scalar prefetch), ``[K]`` each
    unless said: the order boxes are visited in (by level), each box's image,
    level, first row and column in its map and windows down and across, and
    each level's first and last position in the order (``[L]``)."""
    nmaps, sides = len(plan.shapes), _sides(plan)
    order, starts, ends = _sampling.groups(level, nmaps)
    # Per box: its first row and column in its own map, and how many windows it reads.
    heights = _select(level, list(plan.heights))
    widths = _select(level, list(plan.widths))
    side_y = _select(level, [s[0] for s in sides])
    side_x = _select(level, [s[1] for s in sides])
    lo_y = jnp.clip(span_y[:, 0], 0, heights - 1).astype(jnp.int32)
    lo_x = jnp.clip(span_x[:, 0], 0, widths - 1).astype(jnp.int32)
    max_y = (heights + side_y - 1) // side_y
    max_x = (widths + side_x - 1) // side_x
    down = jnp.clip((span_y[:, 1] + side_y - 1) // side_y, 1, max_y).astype(jnp.int32)
    across = jnp.clip((span_x[:, 1] + side_x - 1) // side_x, 1, max_x).astype(jnp.int32)
    return (order, batch.astype(jnp.int32), level, lo_y, lo_x, down, across, starts, ends)


def _call(plan, maps, wy, wx, batch, level, span_y, span_x, *, interpret: bool) -> Array:
    k_boxes, ph, hm = wy.shape
    pw, wm = wx.shape[1], wx.shape[2]
    c = plan.channels
    nmaps = len(maps)
    sides = _sides(plan)
    table = _table(plan, batch, level, span_y, span_x)

    def window_map(lv):
        height, width = plan.heights[lv], plan.widths[lv]
        h, w, block, align, _ = sides[lv]

        def index(j, order, batch, level, lo_y, lo_x, down, across, starts, ends):
            # Boxes of other levels leave this level's window where it was (or
            # where its first box will want it), so it is copied once per box.
            last = jnp.maximum(ends[lv] - 1, starts[lv])
            k = order[jnp.clip(j, starts[lv], jnp.minimum(last, k_boxes - 1))]
            y0 = jnp.minimum(lo_y[k], height - h)
            x0 = _first_col(jnp.minimum(lo_x[k], width - w), width, block, align)
            return batch[k], y0, pl.multiple_of(x0, align), _ZERO

        # Element offsets on every axis (Mosaic takes all or none): [1, h, block, C].
        shape = (pl.Element(1), pl.Element(h), pl.Element(block), pl.Element(c))
        return pl.BlockSpec(shape, index)

    box_block = _box_block
    in_specs = [
        pl.BlockSpec((None, ph, hm), box_block(ph, hm), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, pw, wm), box_block(pw, wm)),
    ]
    in_specs += [window_map(lv) for lv in range(nmaps)]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in range(nmaps)]
    # Per map: two buffers for the further windows of large boxes (the next is
    # copied while this one is contracted) and, where needed, a whole-row strip.
    scratch: list = [
        pltpu.VMEM((2, side.h, side.block, c), dt)
        for side, dt in zip(sides, plan.map_dtypes, strict=True)
    ]
    scratch += _strips(plan, sides, plan.map_dtypes)
    scratch.append(pltpu.SemaphoreType.DMA((3,)))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(table),
        grid=(k_boxes,),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, ph, pw, c), box_block(ph, pw, c)),
        scratch_shapes=scratch,
    )
    body = functools.partial(_kernel, plan, sides, ph)
    return pl.pallas_call(
        body,
        grid_spec=spec,
        out_shape=jax.ShapeDtypeStruct((k_boxes, ph, pw, c), plan.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(*table, wy, wx, *maps, *maps)


def _strips(plan, sides: list[Sides], dtypes) -> list:
    """Per map, the VMEM buffer of a whole-row strip (a stand-in of 8 columns where
    the map needs none)."""
    return [
        pltpu.VMEM((side.h, width if side.strip else 8, plan.channels), dt)
        for side, width, dt in zip(sides, plan.widths, dtypes, strict=True)
    ]


def _box_block(*shape):
    """Index map of a per-box block: box ``order[j]`` at grid step ``j``."""
    return lambda j, order, *_: (order[j],) + (_ZERO,) * len(shape)


def _x_weights(wx_ref, x0, cols: int, from_x, w: int, dtype, *, transposed: bool) -> Array:
    """The x-weights of a copy of ``cols`` columns from ``x0``, ``[PW, cols]`` (or
    ``[cols, PW]``), counting columns ``from_x .. from_x + w`` only: the box's
    dense row times a one-hot matrix (exact at HIGHEST)."""
    wm = wx_ref.shape[-1]
    at = x0 + jax.lax.broadcasted_iota(jnp.int32, (cols, wm), 0)
    pick = jax.lax.broadcasted_iota(jnp.int32, (cols, wm), 1) == at
    pick = (pick & (at >= from_x) & (at < from_x + w)).astype(dtype)
    pair = (pick, wx_ref[...].astype(dtype)) if transposed else (wx_ref[...].astype(dtype), pick)
    return jax.lax.dot_general(
        *pair, (((1,), (1,)), ((), ())), precision=_HIGHEST, preferred_element_type=dtype
    )


class _Box:
    """Box ``k``'s windows in map ``lv`` (inside a kernel): window ``t`` of its
    span, row-major, ``down x across`` of them."""

    def __init__(self, plan, side: Sides, lv: int, k, lo_y, lo_x, down, across):
        self.side, self.height, self.width = side, plan.heights[lv], plan.widths[lv]
        self.first_y, self.first_x, self.across = lo_y[k], lo_x[k], across[k]
        self.count = down[k] * self.across

    def at(self, t) -> tuple[Array, Array, Array, Array, Array]:
        """The first row and column window ``t`` owns, where its copy starts, and
        whether the copy of ``block`` columns holds it. ``t >= 0``: truncating
        division and remainder (as in _first_col)."""
        h, w, block, align = self.side.h, self.side.w, self.side.block, self.side.align
        from_y = self.first_y + jax.lax.div(t, self.across) * h
        from_x = self.first_x + jax.lax.rem(t, self.across) * w
        y0 = jnp.minimum(from_y, self.height - h)
        x0 = _first_col(jnp.minimum(from_x, self.width - w), self.width, block, align)
        held = x0 + block >= jnp.minimum(from_x + w, self.width)
        return from_y, from_x, y0, pl.multiple_of(x0, align), held


def _kernel(plan, sides, ph, *refs):
    nmaps = len(sides)
    order, batch, level, lo_y, lo_x, down, across, _, _ = refs[:9]
    wy_ref, wx_ref = refs[9:11]
    windows = refs[11 : 11 + nmaps]
    whole = refs[11 + nmaps : 11 + 2 * nmaps]
    out_ref = refs[11 + 2 * nmaps]
    extra = refs[12 + 2 * nmaps : 12 + 3 * nmaps]
    strips = refs[12 + 3 * nmaps : 12 + 4 * nmaps]
    sem = refs[12 + 4 * nmaps]
    dtype = plan.dtype
    k = order[pl.program_id(0)]
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    def add(win, h, w, y0, x0, from_y, from_x):
        """``out += wy[:, y0 : y0 + h] . win . wx[:, x0 : x0 + cols]^T``, counting
        rows from ``from_y`` on and columns ``from_x .. from_x + w`` only (the
        window's share of the box's span; other windows count the rest)."""
        wxw = _x_weights(wx_ref, x0, win.shape[1], from_x, w, dtype, transposed=False)
        for r in range(h):
            part = jnp.dot(
                wxw, win[r].astype(dtype), precision=_HIGHEST, preferred_element_type=dtype
            )  # [PW, C]
            for p in range(ph):
                weight = jnp.where(y0 + r >= from_y, wy_ref[p, y0 + r], 0.0)
                out_ref[p] += weight.astype(dtype) * part

    for lv in range(nmaps):
        side = sides[lv]

        @pl.when(level[k] == lv)
        def _(lv=lv, side=side):
            h, w, block = side.h, side.w, side.block
            box = _Box(plan, side, lv, k, lo_y, lo_x, down, across)
            window_at, n = box.at, box.count
            one = jnp.int32(1)

            def copy(t, slot):
                _, _, y0, x0, _ = window_at(t)
                src = whole[lv].at[batch[k], pl.ds(y0, h), pl.ds(x0, block), :]
                return pltpu.make_async_copy(src, extra[lv].at[slot], sem.at[slot])

            def prefetch(t, slot):
                if side.strip:

                    @pl.when(window_at(t)[4])
                    def _():
                        copy(t, slot).start()

                else:
                    copy(t, slot).start()

            def read_strip(t):
                """Window ``t`` from a copy of its whole rows (a ragged far edge)."""
                from_y, from_x, y0, _, _ = window_at(t)
                src = whole[lv].at[batch[k], pl.ds(y0, h)]
                strip = pltpu.make_async_copy(src, strips[lv], sem.at[np.int32(2)])
                strip.start()
                strip.wait()
                add(strips[lv], h, w, y0, jnp.int32(0), from_y, from_x)

            @pl.when(n > 1)
            def _():
                prefetch(one, one)

            # The first window: the pipeline's block.
            from_y, from_x, y0, x0, held = window_at(jnp.int32(0))

            @pl.when(held)
            def _first_block():
                add(windows[lv].at[0], h, w, y0, x0, from_y, from_x)

            if side.strip:

                @pl.when(~held)
                def _first_strip():
                    read_strip(jnp.int32(0))

            @pl.loop(1, n)
            def _(t):
                slot = jax.lax.rem(t, jnp.int32(2))

                @pl.when(t + 1 < n)
                def _():
                    prefetch(t + one, one - slot)

                from_y, from_x, y0, x0, held = window_at(t)

                @pl.when(held)
                def _():
                    copy(t, slot).wait()
                    add(extra[lv].at[slot], h, w, y0, x0, from_y, from_x)

                if side.strip:

                    @pl.when(~held)
                    def _():
                        read_strip(t)


def transpose(plan, g, wy, wx, batch, level, span_y, span_x, images: int | None = None):
    """The feature gradient, as :func:`jax_roialign._window._transpose` (flat
    tables), by a Pallas kernel: ``wy[k]^T . g[k] . wx[k]`` added into each box's
    windows of its map. Interpreted off TPU. Returns one array per map, in the
    compute dtype."""
    kernel = functools.partial(_transpose_call, plan, images=images, interpret=False)
    interpreted = functools.partial(_transpose_call, plan, images=images, interpret=True)
    args = (g, wy, wx, batch, level, span_y, span_x)
    return jax.lax.platform_dependent(*args, tpu=kernel, default=interpreted)


def _transpose_call(plan, g, wy, wx, batch, level, span_y, span_x, *, images, interpret: bool):
    k_boxes, ph, hm = wy.shape
    pw, wm = wx.shape[1], wx.shape[2]
    c, nmaps, sides = plan.channels, len(plan.shapes), _sides(plan)
    shapes = [s if images is None else (images,) + s[1:] for s in plan.shapes]
    table = _table(plan, batch, level, span_y, span_x)
    in_specs = [
        pl.BlockSpec((None, ph, pw, c), _box_block(ph, pw, c)),
        pl.BlockSpec((None, ph, hm), _box_block(ph, hm), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, pw, wm), _box_block(pw, wm)),
    ]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in range(nmaps)]
    # Per map: one window of the gradient (read, added to, written back) and,
    # where needed, a whole-row strip.
    scratch: list = [pltpu.VMEM((side.h, side.block, c), plan.dtype) for side in sides]
    scratch += _strips(plan, sides, [plan.dtype] * nmaps)
    scratch.append(pltpu.SemaphoreType.DMA((2,)))
    spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(table),
        grid=(k_boxes,),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec(memory_space=pl.ANY) for _ in range(nmaps)],
        scratch_shapes=scratch,
    )
    zeros = [jnp.zeros(s, plan.dtype) for s in shapes]
    first = len(table) + 3  # the zero maps, updated in place
    return pl.pallas_call(
        functools.partial(_transpose_kernel, plan, sides, ph),
        grid_spec=spec,
        out_shape=[jax.ShapeDtypeStruct(s, plan.dtype) for s in shapes],
        input_output_aliases={first + lv: lv for lv in range(nmaps)},
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        interpret=interpret,
    )(*table, g, wy, wx, *zeros)


def _transpose_kernel(plan, sides, ph, *refs):
    """One box per grid step, in the table's order (so the sum is the same on
    every run): each of its windows of the gradient is copied in, added to and
    copied back before the next, so boxes sharing cells add in turn."""
    nmaps = len(sides)
    order, batch, level, lo_y, lo_x, down, across, _, _ = refs[:9]
    g_ref, wy_ref, wx_ref = refs[9:12]
    grads = refs[12 + nmaps : 12 + 2 * nmaps]
    bufs = refs[12 + 2 * nmaps : 12 + 3 * nmaps]
    strips = refs[12 + 3 * nmaps : 12 + 4 * nmaps]
    sem = refs[12 + 4 * nmaps]
    dtype = plan.dtype
    k = order[pl.program_id(0)]

    def spread(win, h, w, y0, x0, from_y, from_x):
        """``win += (wy[:, y0 : y0 + h]^T . g . wx[:, x0 : x0 + cols])``, rows from
        ``from_y`` on and columns ``from_x .. from_x + w`` only."""
        wxt = _x_weights(wx_ref, x0, win.shape[1], from_x, w, dtype, transposed=True)
        for r in range(h):
            row = None
            for p in range(ph):
                weight = jnp.where(y0 + r >= from_y, wy_ref[p, y0 + r], 0.0)
                term = weight.astype(dtype) * g_ref[p].astype(dtype)  # [PW, C]
                row = term if row is None else row + term
            win[r] += jnp.dot(wxt, row, precision=_HIGHEST, preferred_element_type=dtype)

    def add_into(target, scratch, box, t, x0, h, w):
        from_y, from_x, y0, _, _ = box.at(t)
        if scratch.shape[1] == target.shape[2]:  # whole rows
            src = target.at[batch[k], pl.ds(y0, h)]
        else:
            src = target.at[batch[k], pl.ds(y0, h), pl.ds(x0, scratch.shape[1]), :]
        read = pltpu.make_async_copy(src, scratch, sem.at[np.int32(0)])
        read.start()
        read.wait()
        spread(scratch, h, w, y0, x0, from_y, from_x)
        write = pltpu.make_async_copy(scratch, src, sem.at[np.int32(1)])
        write.start()
        write.wait()

    for lv in range(nmaps):
        side = sides[lv]

        @pl.when(level[k] == lv)
        def _(lv=lv, side=side):
            box = _Box(plan, side, lv, k, lo_y, lo_x, down, across)

            @pl.loop(0, box.count)
            def _(t):
                _, _, _, x0, held = box.at(t)

                @pl.when(held)
                def _():
                    add_into(grads[lv], bufs[lv], box, t, x0, side.h, side.w)

                if side.strip:

                    @pl.when(~held)
                    def _():
                        add_into(grads[lv], strips[lv], box, t, jnp.int32(0), side.h, side.w)
