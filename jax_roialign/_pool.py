"""RoI Pool (Fast R-CNN): quantized max pooling, torchvision's numbers.

Each bin is a rectangle of whole cells, ``[hstart, hend) x [wstart, wend)``,
from rounded box corners. Its maximum is found by a running max over a static
window of cells per bin: the window is picked at run time from a short ladder
of sizes (5, 10, 20, ... cells, up to the whole map) by ``jax.lax.switch``, as
the smallest one that holds every bin, so any box is exact and common boxes
read only a few cells. The running max records the flat index of the first
maximum in scan order (torchvision's ``argmax``), and the output is one gather
at that index, so the gradient goes to exactly the cell torchvision picks.

On TPU (the default there) a gather-free path (:func:`window_pool`) reads the cells of
every bin through the box-local window reader in blocks, each box's block
reduced to its first maximum as it is read, and takes the gradient to the same
cell through the reader's transpose: the same numbers, no gather or scatter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _dispatch, _shard
from ._contract import read
from ._dispatch import Implementation
from ._recipe import BoxRecipe
from ._sampling import exact_divide
from ._tuning import TUNING
from ._validation import DataFormat, prepare
from ._window import _row, _set_row, add_transpose_taps, fold_taps

Array = jax.Array

# torchvision starts every non-empty bin's max at -FLT_MAX (in the input dtype).
FLT_MAX = float(np.finfo(np.float32).max)
# Rounded box corners are clipped to +-2**29 cells so that int32 sums cannot overflow
# (torchvision's own int arithmetic overflows long before that matters).
_COORD_LIMIT = float(2**29)


def roi_pool(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
    checks: bool = False,
) -> Array:
    """RoI Pool (Fast R-CNN): max over whole cells in each bin of a rounded box.

    A box ``(x1, y1, x2, y2)`` in image coordinates is mapped onto the map as
    ``round(x * spatial_scale)`` (C rounding: halves away from zero), so it covers
    the cells ``x1' .. x2'`` inclusive (at least one cell). It is split into
    ``output_size`` bins of ``size / output_size`` cells; bin ``p`` spans the cells
    ``[floor(p * bin), ceil((p + 1) * bin))`` from the box's first cell, clipped to
    the map, and its value is the largest feature in it (0 for a bin left empty
    by the clipping). The gradient goes to the first maximum in row-major order,
    as torchvision's ``argmax``; there is none with respect to the boxes.

    For example, on the stride-16 map of a 600 x 1000 image (38 x 63 cells),
    ``spatial_scale=0.0625`` maps the box ``(100, 40, 212, 96)`` to
    ``(6.25, 2.5, 13.25, 6.0)``, rounded to the cells ``x in [6, 13]``,
    ``y in [3, 6]`` (2.5 rounds up to 3); with ``output_size=2`` the bins are the
    rows ``[3, 5)``, ``[5, 7)`` and the columns ``[6, 10)``, ``[10, 14)``.

    Same numbers as ``torchvision.ops.roi_pool(input, boxes, output_size,
    spatial_scale)`` (NCHW features, ``[K, 5]`` boxes) and mmcv's ``RoIPool``.

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point.
      boxes: image coordinates ``(x1, y1, x2, y2)``: ``[K, 5]`` rows
        ``(batch_index, x1, y1, x2, y2)``, ``[K, 4]`` with ``box_indices``, or
        per image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.0625 for stride 16.
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default) or ``"NCHW"`` (as torchvision).
      implementation: which reader runs; both give the same numbers. ``None``
        (default) chooses by platform; or ``"gather"`` (a search by gathers) or
        ``"window"`` (others raise ``ValueError``).
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype.

    Boxes with a non-finite coordinate or a batch index outside ``[0, N)`` give
    zeros. As in torchvision, a non-empty bin whose values are all NaN or below
    ``-FLT_MAX`` gives ``-FLT_MAX`` (NaN never wins the max).

    Examples:
      On the ramp ``8 * h + w``, the box ``(1, 1, 5, 5)`` covers the cells 1 to 5
      on each axis; with ``output_size=2`` the bins are the cells ``[1, 4)`` and
      ``[3, 6)`` (2.5 cells each, widened to whole cells), and each takes the
      largest value, at its bottom-right cell:

      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> out = jr.roi_pool(features, boxes, output_size=2)
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[27.0, 29.0], [43.0, 45.0]]
    """
    impl = _dispatch.parse_implementation(implementation)
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    recipe = Pool(**Pool.settings(call))

    def body():
        args = (call.rois.coords, call.rois.batch, call.rois.ok)
        return _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]

    return call.output(body)


def round_half_away(v: Array) -> Array:
    """C's ``round``: halves go away from zero (``jnp.round`` goes to even)."""
    r = jnp.trunc(v)
    return r + jnp.where(jnp.abs(v - r) >= 0.5, jnp.sign(v), 0.0)  # v - trunc(v) is exact


def pool_bins(
    lo: Array, hi: Array, *, pooled: int, length: int, spatial_scale: float
) -> tuple[Array, Array]:
    """Cell ranges ``[start, end)`` ``[K, P]`` int32 of each bin along one axis, clipped to
    ``[0, length]``, from box edges ``lo, hi`` ``[K]`` in image coordinates."""
    dtype = lo.dtype
    first = round_half_away(jnp.clip(lo * spatial_scale, -_COORD_LIMIT, _COORD_LIMIT))
    last = round_half_away(jnp.clip(hi * spatial_scale, -_COORD_LIMIT, _COORD_LIMIT))
    first = first.astype(jnp.int32)
    size = jnp.maximum(last.astype(jnp.int32) - first + 1, 1)
    bin_size = exact_divide(size.astype(dtype), pooled)
    p = jnp.arange(pooled + 1, dtype=dtype)
    edges = p[None, :] * bin_size[:, None]  # [K, P + 1]
    start = jnp.floor(edges[:, :-1]).astype(jnp.int32) + first[:, None]
    end = jnp.ceil(edges[:, 1:]).astype(jnp.int32) + first[:, None]
    return jnp.clip(start, 0, length), jnp.clip(end, 0, length)


def window_ladder(
    h: int, w: int, smallest: int = TUNING.pool_smallest_window
) -> list[tuple[int, int]]:
    """Window sizes ``(rows, cols)``: ``smallest`` cells, doubling, up to the whole map.

    Five cells hold any bin of up to four cells, the common case (a box of 14-28
    cells on its FPN level, 7 x 7 bins).
    """
    ladder = []
    t = smallest
    while True:
        ladder.append((min(h, t), min(w, t)))
        if t >= h and t >= w:
            return ladder
        t *= 2


def window_argmax(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ys: Array,
    ye: Array,
    xs: Array,
    xe: Array,
    window: tuple[int, int],
    dtype: Any,
) -> tuple[Array, Array]:
    """First maximum in row-major order over each bin's cells, scanning a static window.

    ``ys, ye`` ``[K, PH]`` and ``xs, xe`` ``[K, PW]``: each bin's cell ranges, which must
    fit in ``window``. Returns the maximum ``[K, PH, PW, C]`` (``-FLT_MAX`` if no value
    beats it, as torchvision) and its flat index ``h * W + w`` (``-1`` then).
    """
    ty, tx = window
    width = features.shape[2] if layout is DataFormat.NHWC else features.shape[3]
    height = features.shape[1] if layout is DataFormat.NHWC else features.shape[2]
    c = features.shape[-1] if layout is DataFormat.NHWC else features.shape[1]
    k, ph = ys.shape
    pw = xs.shape[1]
    b = batch[:, None, None]

    def body(i, carry):
        best, where = carry
        a, t = i // tx, i % tx
        rows = (ys + a)[:, :, None]
        cols = (xs + t)[:, None, :]
        inside = (rows < ye[:, :, None]) & (cols < xe[:, None, :])
        v = read(features, layout, b, jnp.minimum(rows, height - 1), jnp.minimum(cols, width - 1))
        v = v.astype(dtype)
        take = inside[..., None] & (v > best)
        flat = jnp.broadcast_to((rows * width + cols)[..., None], take.shape)
        return jnp.where(take, v, best), jnp.where(take, flat, where)

    init = (
        jnp.full((k, ph, pw, c), -FLT_MAX, dtype),
        jnp.full((k, ph, pw, c), -1, jnp.int32),
    )
    init = _shard.varying(init, features, ys, xs, ye, xe, batch)
    steps = ty * tx
    return jax.lax.fori_loop(0, steps, body, init, unroll=steps if steps <= 16 else 1)


def gather_flat(features: Array, layout: DataFormat, batch: Array, flat: Array) -> Array:
    """``features[batch[k], flat // W, flat % W, c]`` for ``flat`` ``[K, PH, PW, C]``."""
    n = features.shape[0]
    c = flat.shape[-1]
    b = batch[:, None, None, None]
    ch = jnp.arange(c, dtype=jnp.int32)
    if layout is DataFormat.NHWC:
        return features.reshape(n, -1, c)[b, flat, ch]
    return features.reshape(n, c, -1)[b, ch, flat]


@dataclasses.dataclass(frozen=True)
class Pool(BoxRecipe):
    """``roi_pool`` on ``(features, coords [K, 4], batch [K], ok [K])``: the running
    max over a window ladder and a gather at the arg-max (``GATHER``), or the
    window reader's blocks (``WINDOW``)."""

    name = "roi_pool"
    supports = frozenset({Implementation.GATHER, Implementation.WINDOW})
    unsupported_reason = "the max over cells is read by a search or by windows"

    def forward(self, impl):
        read = window_pool if impl is Implementation.WINDOW else _scan_pool

        def fn(features, coords, batch, ok):
            coords = jax.lax.stop_gradient(jnp.where(ok[:, None], coords.astype(self.dtype), 0.0))
            x1, y1, x2, y2 = (coords[:, i] for i in range(4))
            (ph, pw), (h, w), scale = self.pooled, self.size, self.spatial_scale
            ys, ye = pool_bins(y1, y2, pooled=ph, length=h, spatial_scale=scale)
            xs, xe = pool_bins(x1, x2, pooled=pw, length=w, spatial_scale=scale)
            b = self.batch(features, batch)
            return [read(features, self.layout, b, ok, ys, ye, xs, xe, self.dtype)]

        return fn

    def differentiable(self, impl):
        return self.forward(Implementation.GATHER)


def _scan_pool(features, layout, batch, ok, ys, ye, xs, xe, dtype) -> Array:
    """The running max over a window ladder and one gather at the argmax (CPU, GPU)."""
    height = features.shape[1] if layout is DataFormat.NHWC else features.shape[2]
    width = features.shape[2] if layout is DataFormat.NHWC else features.shape[3]
    live = ok[:, None]
    # Invalid boxes must not force a large window.
    need_y = jnp.max(jnp.where(live, ye - ys, 0))
    need_x = jnp.max(jnp.where(live, xe - xs, 0))
    ladder = window_ladder(height, width)
    level = sum(((need_y > ty) | (need_x > tx)).astype(jnp.int32) for ty, tx in ladder[:-1])
    frozen = jax.lax.stop_gradient(features)
    branches = [
        lambda win=win: window_argmax(frozen, layout, batch, ys, ye, xs, xe, win, dtype)[1]
        for win in ladder
    ]
    flat = branches[0]() if len(branches) == 1 else jax.lax.switch(level, branches)
    empty = (ye <= ys)[:, :, None] | (xe <= xs)[:, None, :]
    value = gather_flat(features, layout, batch, jnp.maximum(flat, 0)).astype(dtype)
    out = jnp.where(flat >= 0, value, -FLT_MAX)
    keep = ok[:, None, None, None] & ~empty[..., None]
    return jnp.where(keep, out, 0.0)


def _encode(v: Array) -> Array:
    """The search's window prep: a finite code of every value, in the same order as
    torchvision's comparisons. A window is read by contracting it with one-hot
    weights, where one infinity (or NaN) would make every read of its box NaN
    (``0 * inf``); so NaN and ``-inf`` (which never win) become ``-top``, ``+inf``
    becomes ``top``, and finite values are divided by 4 (exact but for subnormals),
    which leaves every finite value below ``top`` and above ``-top``."""
    top = 2.0 ** (jnp.finfo(v.dtype).maxexp - 2)
    lose = jnp.isnan(v) | (v == -jnp.inf)
    return jnp.where(lose, -top, jnp.where(v == jnp.inf, top, v * 0.25))


def _decode(code: Array) -> Array:
    top = 2.0 ** (jnp.finfo(code.dtype).maxexp - 2)
    return jnp.where(code == top, jnp.inf, code * 4.0)


class _Blocks:
    """The cells of every bin in blocks of ``ty x tx`` cells (``TUNING.pool_block``), as one-tap
    samples for the window reader (:func:`._window.fold_taps`): block ``(i, j)``
    holds the cells ``ys + i * ty + [0, ty)`` by ``xs + j * tx + [0, tx)`` of each
    bin (those past the bin's end are not live: weight 0, outside the box's span).
    There are as many blocks as the largest bin of a valid box needs (a run-time
    count: one for bins of up to ``ty x tx`` cells)."""

    def __init__(self, shape, layout: DataFormat, aux, dtype):
        self.batch, self.ok, self.ys, self.ye, self.xs, self.xe = aux[:6]
        self.layout = layout
        nhwc = layout is DataFormat.NHWC
        self.height, self.width = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
        self.channels = shape[3] if nhwc else shape[1]
        self.dtype = dtype
        self.ty = max(1, TUNING.pool_block // self.ys.shape[1])
        self.tx = max(1, TUNING.pool_block // self.xs.shape[1])
        live = self.ok[:, None]
        need_y = jnp.max(jnp.where(live, self.ye - self.ys, 0), initial=0)
        need_x = jnp.max(jnp.where(live, self.xe - self.xs, 0), initial=0)
        self.across = (need_x + self.tx - 1) // self.tx
        self.count = ((need_y + self.ty - 1) // self.ty) * self.across

    def _axis(self, start, end, offset, t: int, length: int):
        k, p = start.shape
        cell = start[:, :, None] + offset + jnp.arange(t, dtype=start.dtype)  # [K, P, t]
        live = (cell < end[:, :, None]) & self.ok[:, None, None]
        idx = jnp.clip(cell, 0, length - 1).reshape(k, p * t, 1)
        taps = (idx, live.astype(self.dtype).reshape(k, p * t, 1), live.reshape(k, p * t))
        return taps, cell, live

    def block(self, i):
        """``(taps_y, taps_x, cells)`` of block ``i``; ``cells(k)``: box ``k``'s flat
        index ``h * W + w`` of each cell and whether it is in its bin, ``[PH, ty, PW,
        tx, 1]`` each."""
        a0 = (i // self.across) * self.ty
        t0 = (i % self.across) * self.tx
        taps_y, rows, live_y = self._axis(self.ys, self.ye, a0, self.ty, self.height)
        taps_x, cols, live_x = self._axis(self.xs, self.xe, t0, self.tx, self.width)

        def cells(k):
            r, c = _row(rows, k), _row(cols, k)
            flat = r[:, :, None, None] * self.width + c[None, None, :, :]
            live = _row(live_y, k)[:, :, None, None] & _row(live_x, k)[None, None, :, :]
            return flat[..., None], live[..., None]

        return taps_y, taps_x, cells

    def fold(self, body, init, *refs):
        """``carry = body(block(i), carry)`` for every block (a while loop)."""
        init = _shard.varying(init, self.batch, self.ys, self.xs, *refs)
        return jax.lax.fori_loop(0, self.count, lambda i, c: body(self.block(i), c), init)

    def split(self, v: Array) -> Array:
        """A box's read ``[PH * ty, PW * tx, C]`` as ``[PH, ty, PW, tx, C]``."""
        py, px, c = v.shape
        return v.reshape(py // self.ty, self.ty, px // self.tx, self.tx, c)


def window_pool(features, layout, batch, ok, ys, ye, xs, xe, dtype) -> Array:
    """roi_pool through the box-local window reader (the TPU path: no gather or scatter).

    The cells of every bin are read in blocks (:class:`_Blocks`), each cell a
    one-tap sample of weight 1 (:func:`._window.fold_taps`, on finite codes of the
    values: :func:`_encode`), and each box's block is folded at once into a running
    max that keeps the first maximum in row-major order (on equal values the
    smaller flat index), so any bin of any box is exact. The gradient goes to that
    cell alone: the feature gradient is the transpose of the same reads with the
    cotangent kept at each bin's winning cell (:func:`_argmax_ops`).
    """
    k, ph = ys.shape
    pw = xs.shape[1]
    aux = (batch.astype(jnp.int32), ok, ys, ye, xs, xe)
    blocks = _Blocks(features.shape, layout, aux, dtype)
    c = blocks.channels
    frozen = jax.lax.stop_gradient(features)
    floor = jnp.asarray(-FLT_MAX * 0.25, dtype)  # torchvision's start, encoded
    none = jnp.iinfo(jnp.int32).max

    def body(blk, carry):
        taps_y, taps_x, cells = blk

        def emit(i, code, carry):
            best, where = carry
            flat, live = cells(i)
            code = jnp.where(live, blocks.split(code), -jnp.inf)
            top = jnp.max(code, axis=(1, 3))  # the block's largest per bin, [PH, PW, C]
            first = jnp.min(jnp.where(live & (code == top[:, None, :, None]), flat, none), (1, 3))
            b, w = _row(best, i), _row(where, i)
            better = (top > b) | ((top == b) & (first < w))
            return _set_row(best, i, jnp.where(better, top, b)), _set_row(
                where, i, jnp.where(better, first, w)
            )

        return fold_taps(
            [frozen], layout, blocks.batch, taps_y, taps_x, dtype, emit, carry, prep=_encode
        )

    init = (jnp.full((k, ph, pw, c), floor, dtype), jnp.full((k, ph, pw, c), -1, jnp.int32))
    best, argmax = blocks.fold(body, init, frozen)
    value = jnp.where(argmax >= 0, _decode(best), -FLT_MAX)
    value = _argmax_ops(layout, features.shape, features.dtype, np.dtype(dtype))(
        features, value, aux + (argmax,)
    )
    empty = (ye <= ys)[:, :, None] | (xe <= xs)[:, None, :]
    keep = ok[:, None, None, None] & ~empty[..., None]
    return jnp.where(keep, value, 0.0)


def _argmax_ops(layout: DataFormat, shape, map_dtype, dtype):
    """``value(features, v, aux)``: ``v`` (the search's maximum), whose VJP takes the
    cotangent to each bin's winning cell ``argmax`` ``[K, PH, PW, C]`` (the last of
    ``aux``; a flat index, ``-1`` for none).

    That VJP is ``pick_t``, the transpose of reading the map at the winning
    cells: it adds each block's cotangent, kept at the winning cells, into the
    map through the reads' transpose (first order; higher orders differentiate
    the gather search, :mod:`jax_roialign._dispatch`).
    """

    def no_aux(aux):
        return jax.tree.map(lambda _: None, aux)

    def kept(cells, i, argmax):
        flat, live = cells(i)
        return live & (flat == _row(argmax, i)[:, None, :, None, :])

    def pick_t(g, aux):
        blocks = _Blocks(shape, layout, aux, dtype)
        argmax = aux[-1]
        g = g.astype(dtype)
        ph, pw, c = g.shape[1:]

        def body(blk, acc):
            taps_y, taps_x, cells = blk

            def cot(i):  # box i's cotangent of the block's cells
                gi = _row(g, i)[:, None, :, None, :]
                out = jnp.where(kept(cells, i, argmax), gi, 0.0)
                return out.reshape(ph * blocks.ty, pw * blocks.tx, c)

            (acc,) = add_transpose_taps([acc], cot, layout, blocks.batch, taps_y, taps_x)
            return acc

        return blocks.fold(body, jnp.zeros(shape, dtype), g, argmax).astype(map_dtype)

    @jax.custom_vjp
    def value(features, v, aux):
        return v

    value.defvjp(lambda f, v, aux: (v, aux), lambda aux, g: (pick_t(g, aux), None, no_aux(aux)))
    return value
