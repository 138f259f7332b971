"""RoI Align: the public function and its core."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _contract, _sampling, _shard
from ._validation import (  # noqa: F401 - finish_output, runtime_checks: re-exported
    Call,
    DataFormat,
    Method,
    Mode,
    Rois,
    check_bool,
    finish_output,
    prepare,
    runtime_checks,
    sampling_ratio_int,
)

Array = jax.Array


def roi_align(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    mode: str = "avg",
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    method: str = "auto",
    checks: bool = False,
) -> Array:
    """RoI Align (Mask R-CNN): bilinear samples on a regular grid in each bin, averaged.

    A box ``(x1, y1, x2, y2)`` in image coordinates is mapped onto the feature map
    as ``x * spatial_scale`` (minus 0.5 when ``aligned``) and never rounded. It is
    split into ``output_size`` bins; each bin is sampled on a regular grid of
    ``sampling_ratio`` points per axis (adaptive ``ceil(bin size)`` when
    ``sampling_ratio <= 0``) at sub-cell centres, every sample is read by bilinear
    interpolation of its four neighbours, and the bin's value is the mean of its
    samples. Samples beyond ``[-1, H] x [-1, W]`` read 0 but still count.

    For example, with an 800 x 1344 image and the stride-4 map P2 (200 x 336),
    ``spatial_scale=0.25`` maps the box ``(100, 40, 212, 96)`` to ``(25, 10, 53, 24)``
    on the map (``aligned=True`` then shifts it by -0.5 cell).

    Same numbers as ``torchvision.ops.roi_align(input, boxes, output_size,
    spatial_scale, sampling_ratio, aligned)`` (with NCHW features and ``[K, 5]``
    boxes) and detectron2's ``ROIAlign`` / ``ROIAlignV2`` (``aligned=True``); also
    ONNX ``RoiAlign`` (opset 16, ``half_pixel`` = aligned).

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point (float32, bfloat16, float16; float64 with x64).
      boxes: image coordinates ``(x1, y1, x2, y2)``, in one of three forms:
        ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` as torchvision;
        ``[K, 4]`` with ``box_indices``; or per image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.25 for stride 4.
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive
        ``ceil(roi_size / output_size)`` per box and per axis (exact for any box size).
      aligned: shift boxes by -0.5 cell (pixel centres at +0.5). When False, RoI
        sizes are clamped to at least 1 cell, as in torchvision.
      mode: ``"avg"`` (the mean of the samples) or ``"max"`` (the largest
        interpolated sample; an empty grid gives 0).
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default, as Flax) or ``"NCHW"`` (as torchvision).
      method: ``"auto"`` (chosen for the platform the program is lowered for:
        ``"window"`` on TPU, ``"scatter"`` on GPU, else ``"gather"``), ``"gather"``
        (per-tap reads; the feature gradient is added box by box into row
        windows, deterministic, reverse-mode autodiff only), ``"scatter"`` (the
        same reads, gradient by autodiff's scatter-add of every tap: slower, but
        forward-mode ``jax.jvp``/``jacfwd`` work), ``"window"`` (one window of the
        map per box by ``dynamic_slice``, contracted with the box's weights: no
        gather or scatter, box-local work; reverse-mode autodiff), ``"pallas"``
        (``"window"``'s forward and feature gradient as Pallas TPU kernels that
        copy each box's window while the previous box is contracted; off TPU
        they run in Pallas' interpreter, slowly; experimental, not yet timed on
        a TPU) or
        ``"matmul"`` (dense interpolation matrices over the whole map, no gather
        or scatter; any autodiff). All give the same numbers. With
        ``mode="max"``, ``"window"`` and ``"pallas"`` (so ``auto`` on TPU) read
        the samples box-locally in blocks, folded into each bin's running
        maximum (no Pallas kernel; first-order gradients; a non-finite value in
        a box's window makes its bins NaN), and the others take the max search.
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype (computed in float32 or wider).

    Boxes whose coordinates are not finite, or whose batch index is outside
    ``[0, N)``, give zeros (and zero gradients) rather than reading another image;
    an index out of range that is known at trace time is a ``ValueError``.

    Examples:
      On a map whose cell ``(h, w)`` holds ``8 * h + w`` (a linear ramp), each bin's
      average is the ramp's value at the bin's centre. With ``aligned=True`` the box
      ``(1, 1, 5, 5)`` covers ``(0.5, 0.5, 4.5, 4.5)``, so the four 2 x 2 bins are
      centred at rows and columns 1.5 and 3.5:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # [N, H, W, C]
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])  # (batch_index, x1, y1, x2, y2)
      >>> out = jr.roi_align(features, boxes, output_size=2, sampling_ratio=2)
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]

      ``torchvision.ops.roi_align(x, boxes, 2, 1.0, 2, True)`` with
      ``x = features.transpose(0, 3, 1, 2)`` gives the same numbers. The gradient
      with respect to the box (none flows to the batch index): moving ``x1`` by one
      pixel moves the two bin centres of a row by 3/4 and 1/4 of a cell, adding 1
      per row of bins to the sum (2 rows: 2); along y the ramp rises 8 per cell.

      >>> loss = lambda b: jr.roi_align(features, b, output_size=2, sampling_ratio=2).sum()
      >>> jax.grad(loss)(boxes).tolist()
      [[0.0, 2.0, 16.0, 2.0, 16.0]]
    """
    agg = Mode.parse(mode)
    how = Method.parse(method)
    ratio = sampling_ratio_int(sampling_ratio)
    aligned = check_bool(aligned, "aligned")
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    return call.output(
        lambda: _roi_align_nhwc_out(
            call, sampling_ratio=ratio, aligned=aligned, mode=agg, method=how
        )
    )


def box_grids(
    rois: Rois,
    pooled: tuple[int, int],
    size: tuple[int, int],
    *,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype: Any,
) -> tuple[_sampling.AxisGrid, _sampling.AxisGrid]:
    """The y and x sample grids of axis-aligned boxes (non-finite boxes made harmless)."""
    coords = jnp.where(rois.ok[:, None], rois.coords.astype(dtype), 0.0)
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))
    common: dict[str, Any] = dict(
        spatial_scale=spatial_scale,
        offset=0.5 if aligned else 0.0,
        min_size=None if aligned else 1.0,
        sampling_ratio=sampling_ratio,
    )
    gy = _sampling.axis_grid(y1, y2, pooled=pooled[0], length=size[0], **common)
    gx = _sampling.axis_grid(x1, x2, pooled=pooled[1], length=size[1], **common)
    return gy, gx


def fast_window(length: int, pooled: int) -> int:
    """Rows per bin read by the smallest gather window under adaptive sampling.

    Covers every box up to about half the map; larger bins take a wider window
    (:func:`windows`) or the dense path.
    """
    return min(length, max(4, math.ceil(length / (2 * pooled)) + 2))


# The longest side, in cells, of a box on its own FPN level: level assignment
# (canonical 224 px at level 4) gives 14-28 cells of sqrt(area), and anchors'
# aspect ratios of 0.5-2 stretch the long side to 28 * sqrt(2).
TYPICAL_SIDE = 40


def windows(length: int, pooled: int) -> tuple[int, ...]:
    """The gather windows tried in turn under adaptive sampling, ascending.

    A bin of ``s`` cells touches at most ``ceil(s) + 1`` rows. The first window
    fits a box of ``TYPICAL_SIDE`` cells, the next a box of half the map
    (:func:`fast_window`), the last any box that lies within the map (a bin of
    at most ``(L + 1) / P`` cells). Sizes repeat where one covers the next.
    """
    whole = min(length, math.ceil((length + 1) / pooled) + 1)
    typical = min(whole, math.ceil(TYPICAL_SIDE / pooled) + 1)
    half = min(whole, max(typical, fast_window(length, pooled)))
    return (typical, half, whole)


# A narrower window is a branch of its own only if it reads under this share of
# the next one's tap pairs (each branch is compiled, forward and backward).
WINDOW_SAVING = 0.5


def window_tiers(
    length_y: int, length_x: int, pooled: tuple[int, int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(rows, cols)``: the windows of :func:`windows` on both axes, ascending,
    a tier kept only where it reads under ``WINDOW_SAVING`` of the next kept
    tier's tap pairs."""
    tiers = list(zip(windows(length_y, pooled[0]), windows(length_x, pooled[1]), strict=True))
    kept = [tiers[-1]]
    for ty, tx in reversed(tiers[:-1]):
        ny, nx = kept[0]
        if ty * tx < WINDOW_SAVING * ny * nx:
            kept.insert(0, (ty, tx))
    return tuple(t[0] for t in kept), tuple(t[1] for t in kept)


def _roi_align_nhwc_out(
    call: Call, *, sampling_ratio: int, aligned: bool, mode: Mode, method: Method
) -> Array:
    features, layout, rois, dtype = call.features, call.layout, call.rois, call.dtype
    gy, gx = box_grids(
        rois,
        call.pooled,
        call.size,
        spatial_scale=call.spatial_scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        dtype=dtype,
    )
    ok = rois.ok.astype(dtype)[:, None, None]
    if mode is Mode.MAX:
        return _max_any(features, layout, rois.batch, ok, gy, gx, method, dtype, rois)
    return aggregate_avg(
        features, layout, rois.batch, ok, gy, gx, method, dtype, per_image=len(rois.lead_shape) == 2
    )


def _max_any(features, layout, batch, ok, gy, gx, method: Method, dtype, rois: Rois) -> Array:
    """Max mode: the window reader (:func:`._max.window_max`) where ``method`` says
    ``"window"`` or ``"pallas"`` (``auto`` on TPU; the fold has no Pallas kernel),
    else the search and re-read of :func:`._max.aggregate_max`. Per-image boxes
    run per device under batch sharding, with this device's image indices."""
    from ._max import aggregate_max, window_max

    per_image = len(rois.lead_shape) == 2

    def build(how: Method):
        def pool(f, b, ok, gy, gx):
            if how.windowed:
                return window_max(f, layout, b, ok, gy, gx, dtype)
            return aggregate_max(f, layout, b, ok, gy, gx, dtype)

        if per_image:
            return lambda: _shard.per_image_pool(pool, features, batch, ok, gy, gx)
        return lambda: pool(features, batch, ok, gy, gx)

    return method.run(build)


def aggregate_avg(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    method: Method,
    dtype: Any,
    *,
    per_image: bool = False,
) -> Array:
    """The separable average for any pair of axis grids (fixed or adaptive).

    ``per_image``: the boxes are ``N`` equal groups, group ``n`` reading image
    ``n`` (the ``[N, R, 4]`` form). The work is then vmapped over images, so a
    batch-sharded map and batch-sharded boxes need no data from other devices.
    """
    if per_image:
        # Boxes image-major: on batch-sharded features each device pools its own.
        return _shard.by_image(
            lambda f, b, ok, gy, gx: _aggregate_avg_any(
                f, layout, b, ok, gy, gx, method, dtype, True
            ),
            features,
            batch,
            ok,
            gy,
            gx,
        )
    return _aggregate_avg_any(features, layout, batch, ok, gy, gx, method, dtype, False)


class _Shared:
    """What every reading path derives from the grids, computed once before the
    platform's choice (``platform_dependent`` traces, and autodiff linearizes,
    each platform's branch: geometry inside them was built two or three times).
    Only the parts that ``method`` can use are computed; the rest are ``None``."""

    def __init__(self, gy, gx, ok, method: Method):
        gy, gx = _sampling.with_geometry(gy, gx)
        self.gy, self.gx = gy, gx
        self.static = gy.static_count is not None and gx.static_count is not None
        self.live = live = ok[:, 0, 0] > 0
        self.dense: tuple[Array, Array] | None = None
        # The window reader's dense weights (``dense`` unless ``auto`` computes
        # them apart for the TPU branch).
        self.window_dense: tuple[Array, Array] | None = None
        self.span: tuple[Any, Any] | None = None
        self.taps: tuple[Any, Any] | None = None
        self.choice: Array | None = None
        self.windows: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        if method in (Method.AUTO, Method.WINDOW, Method.PALLAS):
            self.span = (_sampling.tap_span(gy, live), _sampling.tap_span(gx, live))
        reads_taps = method in (Method.AUTO, Method.GATHER, Method.SCATTER)
        if self.static:
            # Dense weights only where the window path may read them: under
            # ``auto`` their copy outside the branches would be differentiated
            # on every platform (box gradients on CPU: 1.8x the output in
            # temporaries instead of 1.1x).
            if method in (Method.WINDOW, Method.PALLAS, Method.MATMUL):
                wy, wx = _sampling.both_dense(gy, gx)
                self.dense = self.window_dense = (wy * ok, wx)
            if reads_taps:
                iy, wy = _sampling.sample_taps(gy)
                self.taps = ((iy, wy * ok), _sampling.sample_taps(gx))
            return
        # Adaptive: the smallest window that every bin fits, else the dense path.
        # The taps of the widest window (narrower windows take their first rows)
        # and the dense weights come from one closed form. The window reader
        # (TPU) reads the dense weights only: under ``auto`` it gets its own
        # copy, so that the TPU program does not compute the CPU's taps.
        if reads_taps:
            self.windows = window_tiers(
                gy.length, gx.length, (gy.first.shape[1], gx.first.shape[1])
            )
            self.choice = jnp.maximum(
                _sampling.window_choice(gy, self.windows[0], live[:, None]),
                _sampling.window_choice(gx, self.windows[1], live[:, None]),
            )
            widest = (self.windows[0][-1], self.windows[1][-1])
            taps, dense = _sampling.closed_form((gy, gx), taps=widest, dense=True)
            assert taps is not None and dense is not None
            (iy, wy), tx = taps
            self.taps = ((iy, wy * ok), tx)
            self.dense = (dense[0] * ok, dense[1])
        if not reads_taps or method is Method.AUTO:
            wy, wx = _sampling.both_dense(gy, gx)
            self.window_dense = (wy * ok, wx)
            if not reads_taps:
                self.dense = self.window_dense


def _aggregate_avg_any(features, layout, batch, ok, gy, gx, method, dtype, per_image):
    shared = _Shared(gy, gx, ok, method)
    return method.run(
        lambda how: functools.partial(
            _aggregate_avg, features, layout, batch, ok, shared, how, dtype, per_image
        )
    )


def window_read(
    maps: list[Array],
    layout: DataFormat,
    batch: Array,
    level: Array,
    live: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    ok: Array,
    dtype: Any,
    *,
    per_image: bool,
    dense: tuple[Array, Array] | None = None,
    span: tuple[Any, Any] | None = None,
    pallas: bool = False,
    ps: bool = False,
) -> Array:
    """The box-local gather-free read (:mod:`._window`) of separable grids, ``[K, PH, PW, C]``
    in ``dtype``.

    Dense weights (the matmul path's, one source of numbers), each box's tap span
    per axis, and one window per box. ``per_image``: boxes are ``N`` equal groups,
    group ``n`` reading image ``n`` (partitioned over a batch-sharded mesh).
    ``dense`` and ``span``: those weights and spans when already computed.
    ``pallas``: the forward and feature gradient by the Pallas kernels (:mod:`._pallas`).
    ``ps``: each bin keeps its own channel group (position-sensitive, ``[K, PH, PW, C_out]``).
    The reader rounds each box to the maps' dtype as it writes it and only the
    cast to ``dtype`` follows (the same bits), so the backward gets a cotangent
    in the maps' dtype and widens it box by box (``contract_window``'s
    ``out_dtype``), not as a whole.
    """
    from . import _window

    if dense is None:
        wy, wx = _sampling.both_dense(gy, gx)
        dense = (wy * ok, wx)
    wy, wx = dense
    if span is None:
        span = (_sampling.tap_span(gy, live), _sampling.tap_span(gx, live))
    (lo_y, need_y), (lo_x, need_x) = span
    out_dtype = jnp.result_type(*maps)
    if not per_image:
        out = _window.contract_window(
            maps,
            layout,
            wy,
            wx,
            level,
            lo_y,
            need_y,
            lo_x,
            need_x,
            dtype,
            batch=batch,
            pallas=pallas,
            ps=ps,
            out_dtype=out_dtype,
        )
        return out.astype(dtype)
    n = maps[0].shape[0]

    def g(t: Array) -> Array:
        return t.reshape((n, -1) + t.shape[1:])

    out = _window.contract_window(
        maps,
        layout,
        g(wy),
        g(wx),
        g(level),
        g(lo_y),
        g(need_y),
        g(lo_x),
        g(need_x),
        dtype,
        pallas=pallas,
        ps=ps,
        out_dtype=out_dtype,
    )
    return out.reshape((-1,) + out.shape[2:]).astype(dtype)


def _aggregate_avg(features, layout, batch, ok, shared: _Shared, method, dtype, per_image):
    gy, gx = shared.gy, shared.gx
    if method.windowed:
        level = jnp.zeros(batch.shape, jnp.int32)
        return window_read(
            [features],
            layout,
            batch,
            level,
            shared.live,
            gy,
            gx,
            ok,
            dtype,
            per_image=per_image,
            dense=shared.window_dense,
            span=shared.span,
            pallas=method is Method.PALLAS,
        )
    row_vjp = method is Method.GATHER

    def dense(f, b, wy, wx):
        return _contract.contract_dense(f, layout, b, wy, wx, dtype)

    def gather(ty: int, tx: int):
        def fn(f, b, taps_y, taps_x):
            # The first rows of the widest window's taps (the same first row).
            (iy, wy), (ix, wx) = taps_y, taps_x
            if not shared.static:
                iy, wy, ix, wx = iy[..., :ty], wy[..., :ty], ix[..., :tx], wx[..., :tx]
            return _contract.contract_taps(f, layout, b, iy, wy, ix, wx, dtype, row_vjp=row_vjp)

        return fn

    def run(fn, *args):
        """``fn(features, batch, *args)`` for all boxes, or vmapped over images."""
        if not per_image:
            return fn(features, batch, *args)
        n = features.shape[0]
        grouped = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), args)
        local = jnp.zeros((jax.tree.leaves(grouped)[0].shape[1],), jnp.int32)
        out = jax.vmap(lambda f, *a: fn(f, local, *a))(features[:, None], *grouped)
        return out.reshape((-1,) + out.shape[2:])

    if method is Method.MATMUL:
        assert shared.dense is not None
        return run(dense, *shared.dense)
    assert shared.taps is not None
    if shared.static:
        return run(gather(0, 0), *shared.taps)
    assert shared.dense is not None and shared.windows is not None
    branches: list[Callable[[], Array]] = [
        functools.partial(run, gather(ty, tx), *shared.taps)
        for ty, tx in zip(*shared.windows, strict=True)
    ]
    branches.append(functools.partial(run, dense, *shared.dense))
    return jax.lax.switch(shared.choice, branches)
