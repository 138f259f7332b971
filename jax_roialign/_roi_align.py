"""RoI Align: the public function and its core."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _contract, _sampling
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
      method: ``"auto"`` (``"matmul"`` on TPU, ``"scatter"`` on GPU, else
        ``"gather"``), ``"gather"`` (per-tap reads; the feature gradient is added
        box by box into row windows, deterministic, reverse-mode autodiff only), ``"scatter"`` (the
        same reads, gradient by autodiff's scatter-add of every tap: slower, but
        forward-mode ``jax.jvp``/``jacfwd`` work) or ``"matmul"`` (dense
        interpolation matrices, no gather or scatter; the TPU path; any autodiff).
        All give the same numbers.
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype (computed in float32 or wider).

    Boxes whose coordinates are not finite, or whose batch index is outside
    ``[0, N)``, give zeros (and zero gradients) rather than reading another image;
    an index out of range that is known at trace time is a ``ValueError``.
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


def windows(length: int, pooled: int) -> tuple[int, ...]:
    """The gather windows tried in turn under adaptive sampling, smallest first.

    The second covers any box that lies within the map (a bin of at most
    ``(L + 1) / P`` cells touches at most ``ceil((L + 1) / P) + 1`` rows).
    """
    small = fast_window(length, pooled)
    whole = min(length, math.ceil((length + 1) / pooled) + 1)
    return (small,) if whole <= small else (small, whole)


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
        try:
            from ._max import aggregate_max
        except ImportError as e:  # pragma: no cover - until the max module lands
            raise NotImplementedError("mode='max' is not implemented yet") from e
        return aggregate_max(features, layout, rois.batch, ok, gy, gx, dtype)
    return aggregate_avg(
        features, layout, rois.batch, ok, gy, gx, method, dtype, per_image=len(rois.lead_shape) == 2
    )


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
    method = method.resolve()
    row_vjp = method is Method.GATHER

    def dense(f, b, gy, gx, ok):
        wy = _sampling.dense_weights(gy) * ok
        wx = _sampling.dense_weights(gx)
        return _contract.contract_dense(f, layout, b, wy, wx, dtype)

    def gather(ty: int, tx: int, taps=None):
        def fn(f, b, gy, gx, ok):
            if taps is None:
                iy, wy = _sampling.axis_taps(gy, ty)
                ix, wx = _sampling.axis_taps(gx, tx)
            else:  # the first rows of the widest window's taps (same first row)
                (iy, wy), (ix, wx) = (
                    jax.tree.map(lambda a: a[..., :ty], taps[0]),
                    jax.tree.map(lambda a: a[..., :tx], taps[1]),
                )
            return _contract.contract_taps(
                f, layout, b, iy, wy * ok, ix, wx, dtype, row_vjp=row_vjp
            )

        return fn

    def run(fn):
        if not per_image:
            return fn(features, batch, gy, gx, ok)
        n = features.shape[0]
        grouped = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), (gy, gx, ok))
        local = jnp.zeros((grouped[2].shape[1],), jnp.int32)
        out = jax.vmap(lambda f, a, b, c: fn(f, local, a, b, c))(features[:, None], *grouped)
        return out.reshape((-1,) + out.shape[2:])

    if method is Method.MATMUL:
        return run(dense)
    if gy.static_count is not None and gx.static_count is not None:
        return run(gather(0, 0))

    # Adaptive: the smallest window that every bin fits, else the dense path.
    # Each bin's sample range once, for the taps, the choice and the dense weights.
    gy, gx = _sampling.with_valid_range(gy), _sampling.with_valid_range(gx)
    wys, wxs = windows(gy.length, gy.first.shape[1]), windows(gx.length, gx.first.shape[1])
    if wys[-1] * wxs[-1] <= 4 * _contract.UNROLL_LIMIT:
        # The window for any in-map box is small already (a small map): a second,
        # narrower branch would save little reading and cost a compile.
        wys, wxs = wys[-1:], wxs[-1:]
    count = max(len(wys), len(wxs))
    wys = wys + (wys[-1],) * (count - len(wys))
    wxs = wxs + (wxs[-1],) * (count - len(wxs))
    # Taps of the widest window once; narrower windows take their first rows.
    widest = None
    if not per_image:
        widest = (_sampling.axis_taps(gy, wys[-1]), _sampling.axis_taps(gx, wxs[-1]))
    branches: list[Callable[[], Array]] = [
        functools.partial(run, gather(ty, tx, widest)) for ty, tx in zip(wys, wxs, strict=True)
    ]
    branches.append(functools.partial(run, dense))
    live = ok[..., 0] > 0
    index = jnp.maximum(
        _sampling.window_choice(gy, wys, live), _sampling.window_choice(gx, wxs, live)
    )
    return jax.lax.switch(index, branches)
