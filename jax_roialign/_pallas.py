"""How to read, as one Pallas TPU kernel: the window reader's forward, box by box.

The same contraction as :func:`jax_roialign._window.contract_window` (and the
same inputs: the dense weights ``wy [K, PH, H]``, ``wx [K, PW, W]`` of
:mod:`jax_roialign._sampling` and each box's span of rows and columns), written
as a kernel instead of an XLA loop. One grid step per box:

- The box's first window ``[h, w, C]`` (``h = min(16, H)``, ``w`` likewise, at
  the box's first row and column, moved inside the map) is a block of the map
  with element offsets (``pl.Element``) read from the box table in SMEM (scalar
  prefetch), so Pallas copies the next box's window while this one is
  contracted. A box that spans more than one window reads the rest of its span
  in further windows, each copied by a DMA of its own (the rows and columns a
  window shares with the one before it count once), so no box is truncated.
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

Only the forward is a kernel: the feature and weight gradients are the window
reader's own transposes (:mod:`jax_roialign._window`), so ``method="pallas"``
has every gradient the window path has, with no gather or scatter.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST

# Block indices are int32 (a Python 0 would be int64 under x64, which Mosaic refuses).
_ZERO = np.int32(0)

# The side of a window a box's span is cut into (clipped to the map). A box
# spanning more reads more windows.
WINDOW = 16
# Largest output side the kernel takes (its y-weights live in SMEM and its rows are
# added one scalar weight at a time); wider outputs use the XLA window reader.
MAX_ROWS = 32


def supported(plan, ph: int) -> bool:
    """Whether the kernel takes a read of ``plan`` with ``ph`` output rows: NHWC maps
    (the TPU's layout for convolutions; in NCHW a window's columns would be lanes,
    whose copies must start at multiples of 128), at most ``MAX_ROWS`` rows."""
    return plan.nhwc and ph <= MAX_ROWS and plan.dtype != np.dtype(np.float16)


def _sublanes(dtype) -> int:
    """Rows of a TPU memory tile for ``dtype``: a copy's column offset must be a
    multiple of it (8 for 32-bit, 16 for 16-bit, 32 for 8-bit types)."""
    return 8 * max(1, 4 // np.dtype(dtype).itemsize)


def _sides(plan) -> list[tuple[int, int, int, int]]:
    """Per map: ``(h, w, cols, align)``. A window covers ``h`` rows at any row and
    ``w`` columns at any column; it is copied as ``cols`` columns from a multiple
    of ``align``, ``cols`` chosen so that the last such start still ends at the
    map's edge (``W - cols`` a multiple of ``align``)."""
    out = []
    for height, width, dt in zip(plan.heights, plan.widths, plan.map_dtypes, strict=True):
        a = _sublanes(dt)
        h, w = min(WINDOW, height), min(WINDOW, width)
        cols = w + a + (width - w) % a
        out.append((h, w, width if cols >= width else cols, a))
    return out


def _levels(plan, branch: Array) -> Array:
    """The map of each box, from its branch (:func:`jax_roialign._window.branch_index`)."""
    level = jnp.zeros_like(branch)
    for lv, offset in enumerate(plan.branch_offset[1:], start=1):
        level = jnp.where(branch >= offset, lv, level)
    return level


def _select(level: Array, values: list[int]) -> Array | int:
    """``values[level]`` per box, by selects (a table lookup would be a gather)."""
    if len(set(values)) == 1:
        return values[0]
    out = jnp.full(level.shape, values[0], jnp.int32)
    for lv, v in enumerate(values[1:], start=1):
        out = jnp.where(level == lv, v, out)
    return out


def _first_col(x0, width: int, cols: int, align: int):
    """The aligned first column of the copy that holds columns ``x0 .. x0 + w``."""
    if cols >= width:
        return jnp.zeros_like(x0)
    # x0 >= 0: a truncating division (a floor would lower through sign(), which
    # Mosaic resolves by asking for the device).
    return jnp.minimum(jax.lax.div(x0, jnp.int32(align)) * align, width - cols)


def forward(plan, maps, wy: Array, wx: Array, batch, branch, span_y, span_x) -> Array:
    """``out[k] = wy[k] . F[batch[k]] . wx[k]^T`` over box ``k``'s span: ``[K, PH, PW, C]``.

    As :func:`jax_roialign._window._forward` (flat tables), by a Pallas kernel;
    interpreted off TPU.
    """
    kernel = functools.partial(_call, plan, interpret=False)
    interpreted = functools.partial(_call, plan, interpret=True)
    args = (tuple(maps), wy, wx, batch, branch, span_y, span_x)
    return jax.lax.platform_dependent(*args, tpu=kernel, default=interpreted)


def _call(plan, maps, wy, wx, batch, branch, span_y, span_x, *, interpret: bool) -> Array:
    k_boxes, ph, hm = wy.shape
    pw, wm = wx.shape[1], wx.shape[2]
    c = plan.channels
    nmaps = len(maps)
    sides = _sides(plan)
    level = _levels(plan, branch).astype(jnp.int32)
    if nmaps == 1:
        order = jnp.arange(k_boxes, dtype=jnp.int32)
    else:
        order = jnp.argsort(level, stable=True).astype(jnp.int32)
    counts = jnp.sum(level[None, :] == jnp.arange(nmaps, dtype=jnp.int32)[:, None], axis=1)
    ends = jnp.cumsum(counts).astype(jnp.int32)
    starts = ends - counts.astype(jnp.int32)
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
    table = (order, batch.astype(jnp.int32), level, lo_y, lo_x, down, across, starts, ends)

    def window_map(lv):
        height, width = plan.heights[lv], plan.widths[lv]
        h, w, cols, align = sides[lv]

        def index(j, order, batch, level, lo_y, lo_x, down, across, starts, ends):
            # Boxes of other levels leave this level's window where it was (or
            # where its first box will want it), so it is copied once per box.
            last = jnp.maximum(ends[lv] - 1, starts[lv])
            k = order[jnp.clip(j, starts[lv], jnp.minimum(last, k_boxes - 1))]
            y0 = jnp.minimum(lo_y[k], height - h)
            x0 = _first_col(jnp.minimum(lo_x[k], width - w), width, cols, align)
            return batch[k], y0, pl.multiple_of(x0, align), _ZERO

        # Element offsets on every axis (Mosaic takes all or none): [1, h, cols, C].
        block = (pl.Element(1), pl.Element(h), pl.Element(cols), pl.Element(c))
        return pl.BlockSpec(block, index)

    def box_block(*shape):
        return lambda j, order, *_: (order[j],) + (_ZERO,) * len(shape)

    in_specs = [
        pl.BlockSpec((None, ph, hm), box_block(ph, hm), memory_space=pltpu.SMEM),
        pl.BlockSpec((None, pw, wm), box_block(pw, wm)),
    ]
    in_specs += [window_map(lv) for lv in range(nmaps)]
    in_specs += [pl.BlockSpec(memory_space=pl.ANY) for _ in range(nmaps)]
    scratch: list = [
        pltpu.VMEM((h, cols, c), plan.map_dtypes[lv]) for lv, (h, _, cols, _) in enumerate(sides)
    ]
    scratch.append(pltpu.SemaphoreType.DMA(()))
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


def _kernel(plan, sides, ph, *refs):
    nmaps = len(sides)
    order, batch, level, lo_y, lo_x, down, across, _, _ = refs[:9]
    wy_ref, wx_ref = refs[9:11]
    windows = refs[11 : 11 + nmaps]
    whole = refs[11 + nmaps : 11 + 2 * nmaps]
    out_ref = refs[11 + 2 * nmaps]
    extra = refs[12 + 2 * nmaps : 12 + 3 * nmaps]
    sem = refs[12 + 3 * nmaps]
    dtype = plan.dtype
    k = order[pl.program_id(0)]
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)

    def add(win, h, w, y0, x0, from_y, from_x):
        """``out += wy[:, y0 : y0 + h] . win . wx[:, x0 : x0 + cols]^T``, counting
        rows from ``from_y`` on and columns ``from_x .. from_x + w`` only (the
        window's share of the box's span; other windows count the rest)."""
        cols, wm = win.shape[1], wx_ref.shape[-1]
        at = x0 + jax.lax.broadcasted_iota(jnp.int32, (cols, wm), 0)
        pick = jax.lax.broadcasted_iota(jnp.int32, (cols, wm), 1) == at
        pick = pick & (at >= from_x) & (at < from_x + w)
        # The window's x-weights [PW, cols]: a one-hot product, exact at HIGHEST.
        wxw = jax.lax.dot_general(
            wx_ref[...].astype(dtype),
            pick.astype(dtype),
            (((1,), (1,)), ((), ())),
            precision=_HIGHEST,
            preferred_element_type=dtype,
        )
        for r in range(h):
            part = jnp.dot(
                wxw, win[r].astype(dtype), precision=_HIGHEST, preferred_element_type=dtype
            )  # [PW, C]
            for p in range(ph):
                weight = jnp.where(y0 + r >= from_y, wy_ref[p, y0 + r], 0.0)
                out_ref[p] += weight.astype(dtype) * part

    for lv in range(nmaps):
        height, width = plan.heights[lv], plan.widths[lv]
        h, w, cols, align = sides[lv]

        @pl.when(level[k] == lv)
        def _(lv=lv, height=height, width=width, h=h, w=w, cols=cols, align=align):
            first_y, first_x = lo_y[k], lo_x[k]

            def start(from_y, from_x):
                y0 = jnp.minimum(from_y, height - h)
                x0 = _first_col(jnp.minimum(from_x, width - w), width, cols, align)
                return y0, pl.multiple_of(x0, align)

            y0, x0 = start(first_y, first_x)
            add(windows[lv].at[0], h, w, y0, x0, first_y, first_x)
            n_across = across[k]

            @pl.loop(1, down[k] * n_across)
            def _(t):
                # Non-negative: truncating division, as in _first_col.
                from_y = first_y + jax.lax.div(t, n_across) * h
                from_x = first_x + jax.lax.rem(t, n_across) * w
                y0, x0 = start(from_y, from_x)
                src = whole[lv].at[batch[k], pl.ds(y0, h), pl.ds(x0, cols), :]
                copy = pltpu.make_async_copy(src, extra[lv], sem)
                copy.start()
                copy.wait()
                add(extra[lv], h, w, y0, x0, from_y, from_x)
