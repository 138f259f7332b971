"""RoI Pool (Fast R-CNN): quantized max pooling, torchvision's numbers.

Each bin is a rectangle of whole cells, ``[hstart, hend) x [wstart, wend)``,
from rounded box corners. Its maximum is found by a running max over a static
window of cells per bin: the window is picked at run time from a short ladder
of sizes (5, 10, 20, ... cells, up to the whole map) by ``jax.lax.switch``, as
the smallest one that holds every bin, so any box is exact and common boxes
read only a few cells. The running max records the flat index of the first
maximum in scan order (torchvision's ``argmax``), and the output is one gather
at that index, so the gradient goes to exactly the cell torchvision picks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _shard
from ._contract import read
from ._sampling import exact_divide
from ._validation import (
    Call,
    DataFormat,
    prepare,
)

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
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    return call.output(lambda: _roi_pool_nhwc_out(call))


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


def window_ladder(h: int, w: int, smallest: int = 5) -> list[tuple[int, int]]:
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


def _roi_pool_nhwc_out(call: Call) -> Array:
    features, layout, rois = call.features, call.layout, call.rois
    pooled, size, spatial_scale, dtype = call.pooled, call.size, call.spatial_scale, call.dtype
    coords = jax.lax.stop_gradient(jnp.where(rois.ok[:, None], rois.coords.astype(dtype), 0.0))
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))
    ys, ye = pool_bins(y1, y2, pooled=pooled[0], length=size[0], spatial_scale=spatial_scale)
    xs, xe = pool_bins(x1, x2, pooled=pooled[1], length=size[1], spatial_scale=spatial_scale)
    ok = rois.ok[:, None]
    # Invalid boxes must not force a large window.
    need_y = jnp.max(jnp.where(ok, ye - ys, 0))
    need_x = jnp.max(jnp.where(ok, xe - xs, 0))
    ladder = window_ladder(*size)
    level = sum(((need_y > ty) | (need_x > tx)).astype(jnp.int32) for ty, tx in ladder[:-1])
    frozen = jax.lax.stop_gradient(features)
    branches = [
        lambda win=win: window_argmax(frozen, layout, rois.batch, ys, ye, xs, xe, win, dtype)[1]
        for win in ladder
    ]
    flat = branches[0]() if len(branches) == 1 else jax.lax.switch(level, branches)
    empty = (ye <= ys)[:, :, None] | (xe <= xs)[:, None, :]
    value = gather_flat(features, layout, rois.batch, jnp.maximum(flat, 0)).astype(dtype)
    out = jnp.where(flat >= 0, value, -FLT_MAX)
    keep = rois.ok[:, None, None, None] & ~empty[..., None]
    return jnp.where(keep, out, 0.0)
