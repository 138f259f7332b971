"""RoI Align for rotated boxes (detectron2 ``ROIAlignRotated``, mmcv ``RoIAlignRotated``).

The sample grid is built in box coordinates with the shared axis machinery
(:class:`_sampling.AxisGrid`, :func:`_sampling.sample_positions`): per box axis,
``yy = -h/2 + ph * bin_h + (iy + 0.5) * bin_h / gh``, and likewise ``xx``. Each
sample is then rotated about the box centre, ``y = yy cos t - xx sin t + cy``,
``x = yy sin t + xx cos t + cx``, and read with torchvision's bilinear rule
(:func:`_max.point_taps`). Rotation mixes the axes, so the average does not
factorise: samples are read one by one (four taps each) and summed.

Adaptive grids have a traced, unbounded number of samples per bin. Samples that
fall outside ``[-1, H] x [-1, W]`` read 0, so only those whose box coordinate
lies within the projection of that rectangle onto the box axis can contribute;
per bin and axis they form an index range (found with half a sample of slack and
then tested exactly). Adaptive samples are more than half a cell apart, so the
range is at most about twice the map's diagonal long. The boxes are sorted by
how many samples their bins need and read in chunks
(:func:`._contract.rows_by_cost`); for each chunk a ``lax.switch`` picks a
``lax.scan`` over the needed samples with the smallest of a few geometrically
growing static lengths, so a box's cost follows its own size (not the call's
largest box, nor the worst case), and every box is exact. On TPU a fixed grid takes
:func:`window_rotated` (each sample a point of the box-local window reader), an
adaptive one :func:`window_rotated_adaptive` (the same ranges read in blocks).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from . import _dispatch, _sampling, _shard
from ._contract import rows_by_cost
from ._dispatch import Implementation
from ._max import bilinear_2d, block_counts, inside, point_tap_table, point_taps
from ._recipe import BoxRecipe
from ._tuning import TUNING
from ._validation import DataFormat, check_bool, prepare, sampling_ratio_int

Array = jax.Array


class AngleUnit(enum.Enum):
    DEGREES = "degrees"
    RADIANS = "radians"

    @classmethod
    def parse(cls, value: Any) -> AngleUnit:
        if isinstance(value, AngleUnit):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() == member.value:
                    return member
        raise ValueError(f"angle_unit must be 'degrees' or 'radians', got {value!r}")


def roi_align_rotated(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    clockwise: bool = False,
    angle_unit: str = "degrees",
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
) -> Array:
    """RoI Align for rotated boxes: bilinear samples on a rotated regular grid, averaged.

    A box ``(cx, cy, w, h, angle)`` in image coordinates is mapped onto the map as
    centre ``c * spatial_scale`` (minus 0.5 when ``aligned``) and size
    ``w * spatial_scale``, ``h * spatial_scale``. It is split into
    ``output_size`` bins along its own axes; each bin is sampled on a regular
    grid of ``sampling_ratio`` points per axis (adaptive ``ceil(bin size)`` when
    ``sampling_ratio <= 0``), every sample is rotated by ``angle`` about the
    centre (counter-clockwise positive in image coordinates, x right and y
    down, unless ``clockwise``) and read by bilinear interpolation, and the bin's
    value is the mean of its samples. Samples beyond ``[-1, H] x [-1, W]`` read 0
    but still count. At ``angle = 0`` the result is ``roi_align`` of the box
    ``(cx - w/2, cy - h/2, cx + w/2, cy + h/2)``.

    For example, with an 800 x 1344 image and the stride-8 map P3 (100 x 168),
    ``spatial_scale=0.125`` maps the box ``(400, 240, 96, 48, 30)`` to centre
    ``(50, 30)`` (``aligned=True`` then shifts it to ``(49.5, 29.5)``), size
    ``12 x 6`` cells, turned by 30 degrees.

    Same numbers as detectron2's ``ROIAlignRotated(output_size, spatial_scale,
    sampling_ratio)`` with the defaults (angle in degrees, counter-clockwise,
    ``aligned=True``); mmcv's ``RoIAlignRotated(output_size, spatial_scale,
    sampling_ratio, aligned, clockwise)`` with ``angle_unit="radians"``.

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point.
      boxes: image coordinates ``(cx, cy, w, h, angle)``, in one of three forms:
        ``[K, 6]`` rows ``(batch_index, cx, cy, w, h, angle)`` as detectron2;
        ``[K, 5]`` with ``box_indices``; or per image ``[N, R, 5]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.125 for stride 8.
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive
        ``ceil(roi_size / output_size)`` per box and per axis (exact for any box size).
      aligned: shift the centre by -0.5 cell (detectron2 always does; mmcv's
        ``aligned``). When False, the centre is not shifted and the box size is
        clamped to at least 1 cell (mmcv's ``aligned=False``).
      clockwise: the angle turns clockwise (mmcv's ``clockwise=True`` negates it).
      angle_unit: ``"degrees"`` (detectron2) or ``"radians"`` (mmcv).
      box_indices: ``[K]`` integer image index of each box, with ``[K, 5]`` boxes.
      data_format: ``"NHWC"`` (default, as Flax) or ``"NCHW"`` (as detectron2).

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype (computed in float32 or wider).

    On TPU the samples are read box-locally (the window reader: every sample
    from one window per box, no gather or scatter, forward or backward; an
    adaptive grid in blocks of samples, first-order gradients); per-image boxes
    on batch-sharded features pool per device.

    Differentiable with respect to the features and the boxes (centre, size and
    angle). Boxes whose parameters are not finite, or whose batch index is
    outside ``[0, N)``, give zeros. Negative sizes follow the formula
    (detectron2 and mmcv reject them): an adaptive grid is then empty and gives 0.

    Examples:
      The square of side 4 centred at ``(3, 3)``, unrotated and turned by 90
      degrees, on the ramp ``8 * h + w``. Unrotated it equals ``roi_align`` of the
      corner box ``(1, 1, 5, 5)``; turned, the same four bin values move round:

      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
      >>> boxes = jnp.array([[0, 3.0, 3.0, 4.0, 4.0, 0.0],  # (batch_index, cx, cy, w, h, angle)
      ...                    [0, 3.0, 3.0, 4.0, 4.0, 90.0]])
      >>> out = jr.roi_align_rotated(features, boxes, output_size=2, sampling_ratio=2)
      >>> out.shape
      (2, 2, 2, 1)
      >>> out[..., 0].round(4).tolist()  # float32: cos(90 degrees) is not exactly 0
      [[[13.5, 15.5], [29.5, 31.5]], [[29.5, 13.5], [31.5, 15.5]]]
    """
    impl = _dispatch.parse_implementation(implementation)
    ratio = sampling_ratio_int(sampling_ratio)
    aligned = check_bool(aligned, "aligned")
    clockwise = check_bool(clockwise, "clockwise")
    unit = AngleUnit.parse(angle_unit)
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        width=5,
        what="(cx, cy, w, h, angle)",
    )
    recipe = RotatedAlign(
        **RotatedAlign.settings(call),
        sampling_ratio=ratio,
        aligned=aligned,
        clockwise=clockwise,
        unit=unit,
    )

    def body() -> Array:
        args = (call.rois.coords, call.rois.batch, call.rois.ok)
        return _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]

    return call.output(body)


@dataclasses.dataclass(frozen=True)
class RotatedAlign(BoxRecipe):
    """``roi_align_rotated`` on ``(features, coords [K, 5], batch [K], ok [K])``:
    rotated samples read by gathers (``SCATTER``: autodiff's gradient) or through
    the window reader (``WINDOW``)."""

    name = "roi_align_rotated"
    supports = frozenset({Implementation.SCATTER, Implementation.WINDOW})
    fallback = Implementation.SCATTER
    unsupported_reason = "rotated samples are not separable"
    sampling_ratio: int = 0
    aligned: bool = True
    clockwise: bool = False
    unit: AngleUnit = AngleUnit.DEGREES

    def forward(self, impl):
        def fn(features, coords, batch, ok):
            geo = rotated_geometry(
                coords,
                ok,
                self.pooled,
                self.size,
                spatial_scale=self.spatial_scale,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
                clockwise=self.clockwise,
                unit=self.unit,
                dtype=self.dtype,
            )
            okf = ok.astype(self.dtype)[:, None, None]
            b = self.batch(features, batch)
            if impl is Implementation.SCATTER:
                read = aggregate_rotated
            elif self.sampling_ratio > 0:
                read = window_rotated
            else:
                read = window_rotated_adaptive
            return [read(features, self.layout, b, okf, geo, self.dtype)]

        return fn


class RotatedGeometry:
    """Per-axis sample grids in box coordinates plus the rotation and the centre.

    ``gy``/``gx``: :class:`_sampling.AxisGrid` along the box's height / width
    (``first`` ``[K, PH]`` / ``[K, PW]``), with ``length`` the map's H / W.
    ``cy, cx, cos, sin``: ``[K]``.
    """

    def __init__(self, gy, gx, cy, cx, cos, sin):
        self.gy, self.gx, self.cy, self.cx, self.cos, self.sin = gy, gx, cy, cx, cos, sin


def rotated_geometry(
    coords: Array,
    ok: Array,
    pooled: tuple[int, int],
    size: tuple[int, int],
    *,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    clockwise: bool,
    unit: AngleUnit,
    dtype: Any,
) -> RotatedGeometry:
    """Box parameters ``[K, 5]`` -> sample grids, in the kernels' operation order."""
    coords = jnp.where(ok[:, None], coords.astype(dtype), 0.0)
    cx, cy, bw, bh, angle = (coords[:, i] for i in range(5))
    offset = 0.5 if aligned else 0.0
    ccx = cx * spatial_scale - offset
    ccy = cy * spatial_scale - offset
    rw = bw * spatial_scale
    rh = bh * spatial_scale
    if not aligned:
        rw = jnp.maximum(rw, 1.0)
        rh = jnp.maximum(rh, 1.0)
    theta = angle * math.pi / 180.0 if unit is AngleUnit.DEGREES else angle
    if clockwise:
        theta = -theta
    gy = _centred_grid(rh, pooled[0], size[0], sampling_ratio)
    gx = _centred_grid(rw, pooled[1], size[1], sampling_ratio)
    return RotatedGeometry(gy, gx, ccy, ccx, jnp.cos(theta), jnp.sin(theta))


def _centred_grid(extent: Array, pooled: int, length: int, sampling_ratio: int):
    """The grid of one box axis from ``-extent / 2``, as :func:`_sampling.axis_grid` lays it out."""
    start = -extent / 2.0
    bin_size = extent / pooled
    if sampling_ratio > 0:
        count = jnp.full_like(extent, float(sampling_ratio))
        static: int | None = sampling_ratio
    else:
        count = jnp.maximum(jnp.ceil(extent / pooled), 0.0)
        static = None
    p = jnp.arange(pooled, dtype=extent.dtype)
    first = start[:, None] + p[None, :] * bin_size[:, None]
    return _sampling.AxisGrid(first, bin_size[:, None], count[:, None], static, length)


def aggregate_rotated(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    geo: RotatedGeometry,
    dtype: Any,
) -> Array:
    """Mean of each bin's rotated samples, ``[K, PH, PW, C]``; ``ok`` ``[K, 1, 1]`` masks boxes."""
    gy, gx = geo.gy, geo.gx
    k, ph = gy.first.shape
    pw = gx.first.shape[1]
    c = features.shape[-1] if layout is DataFormat.NHWC else features.shape[1]
    h, w = gy.length, gx.length
    b = batch[:, None, None]
    cos = geo.cos[:, None, None]
    sin = geo.sin[:, None, None]
    cy = geo.cy[:, None, None]
    cx = geo.cx[:, None, None]
    count = jnp.maximum(gy.count[:, :, None] * gx.count[:, None, :], 1.0)[..., None]  # [K,1,1,1]
    zeros = jnp.zeros((k, ph, pw, c), dtype)
    zeros = _shard.varying(zeros, features, batch, ok, gy, gx, geo.cy, geo.cx, geo.cos, geo.sin)

    every = (b, cos, sin, cy, cx)

    def sample(at, yy: Array, xx: Array, weight: Array | None) -> Array:
        """The bilinear value at box coordinates ``yy [K,PH,1]``, ``xx [K,1,PW]``
        of boxes whose batch index, rotation and centre are ``at``."""
        b_, cos_, sin_, cy_, cx_ = at
        y = yy * cos_ - xx * sin_ + cy_
        x = yy * sin_ + xx * cos_ + cx_
        ty = point_taps(y, h)
        tx = point_taps(x, w)
        if weight is not None:
            ty = ty[:2] + (ty[2] * weight, ty[3] * weight)
        return bilinear_2d(features, layout, b_, ty, tx, dtype)

    def positions(grid: _sampling.AxisGrid, idx: Array) -> Array:
        return _sampling.sample_positions(grid, idx[..., None])[..., 0]

    def positions_at(grids, a: Array, bb: Array, lo_y, lo_x):
        yy = positions(grids[0], lo_y + a)[:, :, None]
        xx = positions(grids[1], lo_x + bb)[:, None, :]
        return yy, xx

    if gy.static_count is not None and gx.static_count is not None:
        sy, sx = gy.static_count, gx.static_count
        zero_y = jnp.zeros(gy.first.shape, dtype)
        zero_x = jnp.zeros(gx.first.shape, dtype)
        if sy * sx <= TUNING.rotated_unroll:
            acc = zeros
            for i in range(sy):
                for j in range(sx):
                    yy, xx = positions_at(
                        (gy, gx), jnp.asarray(i, dtype), jnp.asarray(j, dtype), zero_y, zero_x
                    )
                    acc = acc + sample(every, yy, xx, None)
        else:

            @jax.checkpoint
            def static_body(acc, s):
                a = jnp.floor(s / sx)
                yy, xx = positions_at((gy, gx), a, s - a * sx, zero_y, zero_x)
                return acc + sample(every, yy, xx, None), None

            acc, _ = jax.lax.scan(static_body, zeros, jnp.arange(sy * sx, dtype=dtype))
        return acc * ok[..., None] / count

    # Adaptive: per bin and axis, the index range that can hold valid samples.
    lo_y, n_y = _window(gy, geo, axis=0)
    lo_x, n_x = _window(gx, geo, axis=1)
    # Boxes not ``ok`` have all-zero parameters (a count of 1 at most).
    need_y = jnp.max(n_y, axis=1)  # [K]
    need_x = jnp.maximum(jnp.max(n_x, axis=1), 1.0)

    def read(box):
        """The sums of boxes ``box``, their samples in order: sample ``(lo_y + a,
        lo_x + bb)`` of every bin step ``a * max_x + bb`` of a scan as long as
        the chunk's costliest box needs (0 where beyond the bin's range)."""
        max_x = jnp.max(need_x[box])
        lo_y_c, lo_x_c, n_y_c, n_x_c = (v[box] for v in (lo_y, lo_x, n_y, n_x))
        grids = jax.tree.map(lambda v: v[box], (gy, gx))
        at = tuple(v[box] for v in every)

        @jax.checkpoint
        def body(acc, s):
            a = jnp.floor(s / max_x)
            bb = s - a * max_x
            yy, xx = positions_at(grids, a, bb, lo_y_c, lo_x_c)
            inside = ((a < n_y_c)[:, :, None] & (bb < n_x_c)[:, None, :]).astype(dtype)
            return acc + sample(at, yy, xx, inside), None

        def branch(length: int):
            def run(acc):
                return jax.lax.scan(body, acc, jnp.arange(length, dtype=dtype))[0]

            return run

        total = jnp.max(need_y[box]) * max_x
        tier = sum(((total > t).astype(jnp.int32) for t in lengths[:-1]), jnp.int32(0))
        return jax.lax.switch(tier, [branch(n) for n in lengths], zeros[box])

    bound = _max_window(h, w)
    lengths = []
    t = TUNING.rotated_first_tier
    while t < bound * bound:
        lengths.append(t)
        t *= 4
    lengths.append(bound * bound)
    row_bytes = ph * pw * c * jnp.dtype(dtype).itemsize
    # Rematerialized in the backward: the chunk loop then keeps only each
    # chunk's boxes, and its transpose compiles in about 1 s less.
    acc = rows_by_cost(need_y * need_x, row_bytes, jax.checkpoint(read), zeros)
    return acc * ok[..., None] / count


def window_rotated(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    geo: RotatedGeometry,
    dtype: Any,
) -> Array:
    """:func:`aggregate_rotated` for fixed grids through the box-local window reader
    (the TPU path: no gather or scatter, forward or backward).

    Every sample is a point of :func:`._window.read_point_taps`: its two taps per
    map axis (:func:`._max.point_taps`, the same rule), read from one window per
    box holding the rotated box's samples (the tiles of its span when larger,
    so any box is exact). Each bin's samples are summed inside the reader.
    """
    from ._window import read_point_taps

    gy, gx = geo.gy, geo.gx
    sy, sx = gy.static_count, gx.static_count
    assert sy is not None and sx is not None
    k, ph = gy.first.shape
    pw = gx.first.shape[1]

    def positions(grid: _sampling.AxisGrid, s: int) -> Array:
        return _sampling.sample_positions(grid, jnp.arange(s, dtype=dtype))  # [K, P, s]

    rotation = (geo.cos, geo.sin, geo.cy, geo.cx)
    lengths = (gy.length, gx.length)
    ty, tx = _rotated_taps(positions(gy, sy), positions(gx, sx), rotation, lengths, ok)
    out = read_point_taps([features], layout, batch, ty, tx, dtype, group=sy * sx)
    count = float(max(sy * sx, 1))
    return out.reshape(k, ph, pw, -1) * ok[..., None] / count


def _rotated_taps(yy, xx, rotation, lengths, ok, in_range=None):
    """Point tap tables ``(idx, w, live)`` per map axis of the samples at box
    coordinates ``yy [K, PH, s_y]``, ``xx [K, PW, s_x]``, rotated about the centre
    (``rotation = (cos, sin, cy, cx)``, each ``[K]``); samples ordered
    ``(ph, pw, iy, ix)``, so a bin's samples are consecutive. ``in_range``
    ``[K, PH, PW, s_y, s_x]``: the samples that count (the others weigh 0)."""
    cos, sin, cy, cx = (a[:, None, None, None, None] for a in rotation)
    h, w = lengths
    yy, xx = yy[:, :, None, :, None], xx[:, None, :, None, :]
    y = yy * cos - xx * sin + cy
    x = yy * sin + xx * cos + cx
    live = inside(y, h) & inside(x, w) & (ok[:, :, :, None, None] > 0)
    if in_range is not None:
        live = live & in_range
    ty, tx = point_tap_table(y, h, live), point_tap_table(x, w, live)
    if in_range is not None:
        iy, wy, lv = ty
        ty = (iy, wy * in_range.reshape(wy.shape[0], -1, 1).astype(wy.dtype), lv)
    return ty, tx


def window_rotated_adaptive(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    geo: RotatedGeometry,
    dtype: Any,
) -> Array:
    """:func:`aggregate_rotated` for adaptive grids through the box-local window reader.

    The same per-bin index ranges (:func:`_window`) read in blocks of
    ``BLOCK x TUNING.rotated_block`` samples of every bin, each block as
    :func:`window_rotated` reads a fixed grid (its samples points of the window
    reader, a bin's summed inside it; those past a bin's range weigh 0), as many
    blocks as the largest live range needs. The loop's trip count is data, so
    the sum has its own VJP (:func:`_blocked_sum`): the blocks read again
    as their transpose, the box gradient through each block's tap weights.
    First order.
    """
    gy, gx = geo.gy, geo.gx
    lo_y, n_y = _window(gy, geo, axis=0)
    lo_x, n_x = _window(gx, geo, axis=1)
    params = (gy.first, gy.bin, gx.first, gx.bin, geo.cy, geo.cx, geo.cos, geo.sin)
    stop = jax.lax.stop_gradient
    aux = (stop(batch), stop(ok), stop(gy.count), stop(gx.count), lo_y, n_y, lo_x, n_x)
    lengths = (gy.length, gx.length)
    total = _blocked_sum(layout, lengths, dtype)(features, params, aux)
    count = jnp.maximum(gy.count[:, :, None] * gx.count[:, None, :], 1.0)[..., None]
    return total * ok[..., None] / count


def _block_read(features, params, aux, u, v, layout, lengths, dtype) -> Array:
    """Block ``(u, v)`` of :func:`window_rotated_adaptive`: the sum of each bin's
    samples ``lo + u * B + [0, B)`` (by ``lo + v * B + ...`` across; ``B`` is
    ``TUNING.rotated_block``), ``[K, PH, PW, C]``, those past the bin's range
    weighing 0."""
    from ._window import read_point_taps

    fy, by, fx, bx, cy, cx, cos, sin = params
    batch, ok, count_y, count_x, lo_y, n_y, lo_x, n_x = aux
    h, w = lengths
    k, ph = fy.shape
    pw = fx.shape[1]

    def positions(first, bin_size, count, length, lo, n, o):
        grid = _sampling.AxisGrid(first, bin_size, count, None, length)
        i = o + jnp.arange(TUNING.rotated_block, dtype=first.dtype)
        return _sampling.sample_positions(grid, lo[..., None] + i), i < n[..., None]

    oy = (u * TUNING.rotated_block).astype(fy.dtype)
    ox = (v * TUNING.rotated_block).astype(fx.dtype)
    yy, in_y = positions(fy, by, count_y, h, lo_y, n_y, oy)  # [K, PH, TUNING.rotated_block]
    xx, in_x = positions(fx, bx, count_x, w, lo_x, n_x, ox)
    in_range = in_y[:, :, None, :, None] & in_x[:, None, :, None, :]
    ty, tx = _rotated_taps(yy, xx, (cos, sin, cy, cx), (h, w), ok, in_range)
    # Its VJP runs inside the blocks' loop: one pass over all images there.
    out = read_point_taps(
        [features],
        layout,
        batch,
        ty,
        tx,
        dtype,
        group=TUNING.rotated_block * TUNING.rotated_block,
        by_image=False,
    )
    return out.reshape(k, ph, pw, -1)


@functools.lru_cache(maxsize=32)
def _blocked_sum(layout: DataFormat, lengths: tuple[int, int], dtype):
    """``total(features, params, aux)``: the sum of :func:`_block_read` over the
    blocks the largest live range needs, with a VJP that loops over the same
    blocks (reverse mode cannot go through a loop whose trip count is data)."""

    def trips(aux):
        _, ok, _, _, _, n_y, _, n_x = aux
        return block_counts(n_y, n_x, ok[:, :, 0] > 0, TUNING.rotated_block, TUNING.rotated_block)

    def read(features, params, aux, t, m_x):
        return _block_read(features, params, aux, t // m_x, t % m_x, layout, lengths, dtype)

    @jax.custom_vjp
    def total(features, params, aux):
        m_y, m_x = trips(aux)
        k, ph = params[0].shape
        pw = params[2].shape[1]
        c = features.shape[-1] if layout is DataFormat.NHWC else features.shape[1]
        zeros = _shard.varying(jnp.zeros((k, ph, pw, c), dtype), features, params, aux)
        body = lambda t, acc: acc + read(features, params, aux, t, m_x)  # noqa: E731
        return jax.lax.fori_loop(0, m_y * m_x, body, zeros)

    def fwd(features, params, aux):
        return total(features, params, aux), (features, params, aux)

    def bwd(res, g):
        features, params, aux = res
        m_y, m_x = trips(aux)

        def body(t, carry):
            d_f, d_p = carry
            _, vjp = jax.vjp(lambda f, p: read(f, p, aux, t, m_x), features, params)
            df, dp = vjp(g.astype(dtype))
            d_p = jax.tree.map(lambda a, b: a + b.astype(a.dtype), d_p, dp)
            # Each block's feature gradient comes in the features' dtype (summed
            # in the compute dtype inside the reader); blocks add in that dtype
            # (one block, the usual case, is exactly the reader's).
            return d_f + df, d_p

        zeros = (jnp.zeros(features.shape, features.dtype), jax.tree.map(jnp.zeros_like, params))
        zeros = _shard.varying(zeros, features, params, aux, g)
        d_f, d_p = jax.lax.fori_loop(0, m_y * m_x, body, zeros)
        return d_f.astype(features.dtype), d_p, jax.tree.map(lambda _: None, aux)

    total.defvjp(fwd, bwd)
    return total


def _max_window(h: int, w: int) -> int:
    """A static bound on the samples per box axis that can land in ``[-1, H] x [-1, W]``.

    The projection of that rectangle onto any direction is at most its diagonal
    ``d``; adaptive samples are more than 0.5 apart (one sample when closer), and
    the range is widened by 0.05 and one sample at each end.
    """
    diag = math.hypot(h + 1.0, w + 1.0)
    return int(math.ceil(2.0 * (diag + 0.1))) + 4


_SLACK = 0.05


def _window(grid: _sampling.AxisGrid, geo: RotatedGeometry, axis: int) -> tuple[Array, Array]:
    """First index and length ``[K, P]`` of the samples along a box axis that can be valid.

    Along the box's height axis a map point ``(y, x)`` has box coordinate
    ``(y - cy) cos + (x - cx) sin``; along its width axis ``-(y - cy) sin +
    (x - cx) cos``. The extremes over the corners of ``[-1, H] x [-1, W]``
    bound the valid samples; the interval is widened by ``_SLACK`` (rounding of
    the rotation) and the index range by one sample.
    """
    h, w = geo.gy.length, geo.gx.length
    ys = jnp.array([-1.0, h, -1.0, h], grid.first.dtype)
    xs = jnp.array([-1.0, -1.0, w, w], grid.first.dtype)
    dy = ys[None, :] - geo.cy[:, None]
    dx = xs[None, :] - geo.cx[:, None]
    if axis == 0:
        proj = dy * geo.cos[:, None] + dx * geo.sin[:, None]
    else:
        proj = -dy * geo.sin[:, None] + dx * geo.cos[:, None]
    p_min = jax.lax.stop_gradient(jnp.min(proj, axis=1))[:, None] - _SLACK
    p_max = jax.lax.stop_gradient(jnp.max(proj, axis=1))[:, None] + _SLACK
    has = grid.count >= 1.0
    count = jnp.maximum(grid.count, 1.0)
    first = jax.lax.stop_gradient(grid.first)
    step = jnp.where(has, jax.lax.stop_gradient(grid.bin), 1.0) / count
    lo = jnp.floor((p_min - first) / step - 0.5) - 1.0
    hi = jnp.floor((p_max - first) / step - 0.5) + 2.0
    lo = jnp.clip(lo, 0.0, grid.count)
    hi = jnp.clip(hi, lo, grid.count)
    n = jnp.where(has, hi - lo, 0.0)
    n = jnp.minimum(n, float(_max_window(h, w)))
    return lo, n
