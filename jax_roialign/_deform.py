"""Deformable RoI Align (Dai et al. 2017; mmcv ``DeformRoIPool`` / ``ModulatedDeformRoIPool``).

Each bin of an aligned RoI Align grid is moved by its own learned offset,
``gamma * offset * roi size``. The bin's samples stay an axis-aligned regular
grid, so the average still factorises per bin: the y and x sample grids are
:class:`_sampling.AxisGrid` s whose ``P`` axis is the flattened ``PH * PW`` bins
(the y start of a bin depends on ``pw`` through the offset, and the x start on
``ph``). Everything else is the core's machinery: two taps per sample for fixed
grids, exact closed-form per-row weights in a static window for adaptive grids,
and the dense (matmul) path when a bin needs more rows than the window. On TPU
(:func:`window_per_bin`) every bin is a point of the box-local window reader.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _contract, _dispatch, _sampling
from ._dispatch import Implementation
from ._max import inside
from ._recipe import BoxRecipe
from ._tuning import TUNING
from ._validation import DataFormat, prepare, sampling_ratio_int

Array = jax.Array


def deform_roi_align(
    features: Array,
    boxes: Array,
    offsets: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    mask: Array | None = None,
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
) -> Array:
    """Deformable RoI Align: RoI Align whose bins are shifted by per-bin offsets.

    A box ``(x1, y1, x2, y2)`` is mapped onto the map as ``x * spatial_scale - 0.5``
    (aligned, no size clamp) and split into ``output_size`` bins of size
    ``roi_w / PW`` by ``roi_h / PH``. Bin ``(ph, pw)`` is moved by
    ``(gamma * roi_w * dx, gamma * roi_h * dy)`` with ``(dx, dy) =
    offsets[k, ph, pw]``, then sampled and averaged exactly as in ``roi_align``
    (``sampling_ratio`` points per axis, adaptive ``ceil(bin size)`` when ``<= 0``;
    samples beyond ``[-1, H] x [-1, W]`` read 0 but count). With ``mask`` the
    bin's value is multiplied by ``mask[k, ph, pw]`` (the modulated variant).
    Zero offsets give ``roi_align(..., aligned=True)`` exactly.

    For example, with an 800 x 1344 image and the stride-16 map (50 x 84),
    ``spatial_scale=0.0625`` maps the box ``(160, 96, 480, 320)`` to
    ``(9.5, 5.5, 29.5, 19.5)`` on the map (20 x 14 cells); with ``gamma=0.1`` an
    offset ``(0.5, 0)`` moves a bin right by ``0.1 * 20 * 0.5 = 1`` cell.

    Same numbers as mmcv's ``DeformRoIPool(output_size, spatial_scale,
    sampling_ratio, gamma)(input, rois, offset)`` with NCHW features, ``[K, 5]``
    rois and ``offset`` ``[K, 2, PH, PW]`` = ``jnp.moveaxis(offsets, -1, 1)``.
    mmcv's ``ModulatedDeformRoIPoolPack`` applies a sigmoid to its mask before
    multiplying; here ``mask`` is used as given.

    On TPU each bin is read box-locally (the window reader: one window per box
    holding all its moved bins, no gather or scatter, forward or backward; with
    adaptive sampling each box's weights are made in the loop, and reverse mode
    goes to first order); per-image boxes on batch-sharded features pool per device.

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point.
      boxes: image coordinates ``(x1, y1, x2, y2)``: ``[K, 5]`` rows
        ``(batch_index, x1, y1, x2, y2)``, ``[K, 4]`` with ``box_indices``, or
        per image ``[N, R, 4]``.
      offsets: ``[K, PH, PW, 2]`` per-bin ``(dx, dy)`` in units of the RoI's width
        and height (times ``gamma``); ``[N, R, PH, PW, 2]`` with per-image boxes.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride).
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive
        ``ceil(roi_size / output_size)`` (exact for any box size and offset).
      gamma: the offsets' scale (mmcv's default 0.1).
      mask: optional ``[K, PH, PW]`` (``[N, R, PH, PW]`` with per-image boxes)
        factor of each bin's value.
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default) or ``"NCHW"``.
      implementation: which reader runs; both give the same numbers. ``None``
        (default) chooses by platform; or ``"scatter"`` (per-bin taps, autodiff's
        gradient) or ``"window"`` (others raise ``ValueError``).

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype (computed in float32 or wider).

    Differentiable with respect to the features, the boxes, the offsets and the
    mask. Boxes that are not finite or whose batch index is outside ``[0, N)``
    give zeros, as do bins whose offset is not finite.

    Examples:
      On the ramp ``8 * h + w``, the box ``(1, 1, 5, 5)`` is 4 cells wide; with
      ``gamma=0.5`` the offset ``dx = 0.5`` moves every bin right by
      ``0.5 * 4 * 0.5 = 1`` cell, which adds 1 to each bin of ``roi_align``'s
      ``[[13.5, 15.5], [29.5, 31.5]]``:

      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> offsets = jnp.zeros((1, 2, 2, 2)).at[..., 0].set(0.5)  # [K, PH, PW, (dx, dy)]
      >>> out = jr.deform_roi_align(
      ...     features, boxes, offsets, output_size=2, sampling_ratio=2, gamma=0.5
      ... )
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[14.5, 16.5], [30.5, 32.5]]
    """
    impl = _dispatch.parse_implementation(implementation)
    ratio = sampling_ratio_int(sampling_ratio)
    gamma = _finite_number(gamma, "gamma")
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
    )
    rois, (ph, pw) = call.rois, call.pooled
    lead = rois.lead_shape
    offsets = _per_bin(offsets, "offsets", lead + (ph, pw, 2), jnp.shape(boxes))
    if mask is not None:
        mask = _per_bin(mask, "mask", lead + (ph, pw), jnp.shape(boxes))
    settings = BoxRecipe.settings(call)
    settings["dtype"] = np.dtype(jnp.result_type(call.dtype, offsets.dtype))
    recipe = DeformAlign(**settings, sampling_ratio=ratio, gamma=gamma)
    k = rois.coords.shape[0]

    def body() -> Array:
        offs = offsets.reshape(k, ph, pw, 2)
        args = (rois.coords, rois.batch, rois.ok, offs)
        out = _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]
        if mask is not None:
            out = out * mask.reshape(k, ph, pw, 1).astype(recipe.dtype)
        return out

    return call.output(body)


@dataclasses.dataclass(frozen=True)
class DeformAlign(BoxRecipe):
    """``deform_roi_align`` on ``(features, coords [K, 4], batch [K], ok [K],
    offsets [K, PH, PW, 2])``: per-bin taps (``SCATTER``: autodiff's gradient) or
    the window reader's points (``WINDOW``)."""

    name = "deform_roi_align"
    supports = frozenset({Implementation.SCATTER, Implementation.WINDOW})
    fallback = Implementation.SCATTER
    unsupported_reason = "each bin has its own offset, read per bin"
    sampling_ratio: int = 0
    gamma: float = 0.1

    def forward(self, impl):
        read = window_per_bin if impl is Implementation.WINDOW else aggregate_avg_per_bin

        def fn(features, coords, batch, ok, offsets):
            offs = offsets.astype(self.dtype)
            bin_ok = ok[:, None, None] & jnp.all(jnp.isfinite(offs), axis=-1)
            offs = jnp.where(bin_ok[..., None], offs, 0.0)
            gy, gx = deform_grids(
                coords,
                ok,
                offs,
                self.size,
                spatial_scale=self.spatial_scale,
                sampling_ratio=self.sampling_ratio,
                gamma=self.gamma,
                dtype=self.dtype,
            )
            okb = bin_ok.astype(self.dtype)
            b = self.batch(features, batch)
            return [read(features, self.layout, b, okb, gy, gx, self.pooled, self.dtype)]

        return fn


def _finite_number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a Python number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _per_bin(x: Any, name: str, expected: tuple[int, ...], box_shape) -> Array:
    shape = jnp.shape(x)
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{name} must be floating point, got dtype {dtype}")
    if tuple(shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)} for boxes of shape {tuple(box_shape)} "
            f"and this output_size, got {tuple(shape)}"
        )
    return jnp.asarray(x)


def deform_grids(
    coords: Array,
    ok: Array,
    offsets: Array,
    size: tuple[int, int],
    *,
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    dtype: Any,
) -> tuple[_sampling.AxisGrid, _sampling.AxisGrid]:
    """Per-bin sample grids ``first [K, PH * PW]`` (bins flattened row-major), mmcv's arithmetic."""
    k, ph, pw, _ = offsets.shape
    coords = jnp.where(ok[:, None], coords.astype(dtype), 0.0)
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))

    def grid(lo, hi, pooled, length, shift, p):
        start = lo * spatial_scale - 0.5
        size = (hi * spatial_scale - 0.5) - start
        bin_size = size / pooled
        if sampling_ratio > 0:
            count = jnp.full_like(size, float(sampling_ratio))
            static: int | None = sampling_ratio
        else:
            count = jnp.maximum(jnp.ceil(size / pooled), 0.0)
            static = None
        moved = start[:, None] + (gamma * size)[:, None] * shift.reshape(k, ph * pw)
        first = moved + p[None, :] * bin_size[:, None]
        return _sampling.AxisGrid(first, bin_size[:, None], count[:, None], static, length)

    p_y = jnp.repeat(jnp.arange(ph, dtype=dtype), pw)
    p_x = jnp.tile(jnp.arange(pw, dtype=dtype), ph)
    gy = grid(y1, y2, ph, size[0], offsets[..., 1], p_y)
    gx = grid(x1, x2, pw, size[1], offsets[..., 0], p_x)
    return gy, gx


def aggregate_avg_per_bin(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    pooled: tuple[int, int],
    dtype: Any,
) -> Array:
    """The per-bin separable average ``[K, PH, PW, C]`` for grids over flattened bins.

    ``ok`` ``[K, PH, PW]`` (0 or 1) zeroes bins. The per-bin counterpart of
    :func:`jax_roialign._separable.average`: fixed grids use two taps per sample,
    adaptive grids a static window of exact per-row weights, and a
    ``lax.cond`` takes the dense path when any bin needs more rows.
    """
    k = gy.first.shape[0]
    ph, pw = pooled

    def per_bin(a: Array) -> Array:
        return a.reshape((k, ph, pw) + a.shape[2:])

    okw = ok[..., None]

    def dense(_):
        wy, wx = _sampling.both_dense(gy, gx)
        wy, wx = per_bin(wy) * okw, per_bin(wx)
        return _contract.contract_dense(features, layout, batch, wy, wx, dtype)

    if gy.static_count is not None and gx.static_count is not None:
        iy, wy = _sampling.sample_taps(gy)
        ix, wx = _sampling.sample_taps(gx)
        return _contract.contract_taps(
            features, layout, batch, per_bin(iy), per_bin(wy) * okw, per_bin(ix), per_bin(wx), dtype
        )

    ty = TUNING.half_map_window(gy.length, ph)
    tx = TUNING.half_map_window(gx.length, pw)

    def fast(_):
        (iy, wy), (ix, wx) = _sampling.both_taps(gy, gx, (ty, tx))
        return _contract.contract_taps(
            features, layout, batch, per_bin(iy), per_bin(wy) * okw, per_bin(ix), per_bin(wx), dtype
        )

    live = ok.reshape(k, ph * pw) > 0
    index = jnp.maximum(
        _sampling.window_choice(gy, (ty,), live), _sampling.window_choice(gx, (tx,), live)
    )
    return jax.lax.switch(index, [fast, dense], None)


def window_per_bin(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    pooled: tuple[int, int],
    dtype: Any,
) -> Array:
    """:func:`aggregate_avg_per_bin` through the box-local window reader (the TPU
    path: no gather or scatter, forward or backward).

    Each bin is a point of :func:`._window.contract_points`: its separable weights
    (the y and x average of its own grid) over the rows and columns its samples
    touch, read from one window per box that holds every bin (the tiles of the
    box's span when larger). A fixed grid passes its two taps per sample (made
    dense inside each window); an adaptive grid its exact dense per-row weights
    (:func:`_sampling.dense_weights`, any bin size), made box by box inside the
    reader's loop (:func:`._window.contract_points_boxwise`; first order).
    """
    from . import _window

    k = gy.first.shape[0]
    ph, pw = pooled
    okp = ok.reshape(k, ph * pw)
    if gy.static_count is not None and gx.static_count is not None:

        def taps(grid: _sampling.AxisGrid):
            idx, w = _sampling.sample_taps(grid)  # [K, P, 2 s]: low taps, then high
            y = _sampling.sample_positions(grid, jnp.arange(grid.static_count, dtype=dtype))
            valid = inside(y, grid.length)
            live = jnp.concatenate([valid, valid], axis=-1) & (okp[..., None] > 0)
            return idx, w * okp[..., None], live

        out = _window.read_point_taps([features], layout, batch, taps(gy), taps(gx), dtype)
    else:
        gy, gx = _sampling.with_geometry(gy, gx)
        live = jnp.any(okp > 0, axis=1)
        (lo_y, need_y), (lo_x, need_x) = _sampling.tap_span(gy, live), _sampling.tap_span(gx, live)
        # Each box's exact per-row weights made in the reader's loop (no [K, S, H]
        # tables, nor their closed form's intermediates, for all boxes at once).
        params = (gy.first, gy.bin, gx.first, gx.bin)
        stop = jax.lax.stop_gradient
        aux = (jax.tree.map(stop, gy), jax.tree.map(stop, gx), stop(okp))
        out = _window.contract_points_boxwise(
            [features],
            layout,
            _box_rows,
            params,
            aux,
            lo_y,
            need_y,
            lo_x,
            need_x,
            dtype,
            batch=batch,
        )
    return out.reshape(k, ph, pw, -1)


def _box_rows(params, aux) -> tuple[Array, Array]:
    """One box's dense per-bin weights ``[PH * PW, H]``, ``[PH * PW, W]`` (adaptive
    grids): :func:`_sampling.dense_weights` of its rows of the grids, differentiable
    in their ``first`` and ``bin``, the y weights masked by the bins' ``ok``."""
    fy, by, fx, bx = params
    gy, gx, okp = aux

    def one(grid, first, bin_size):
        grid = jax.tree.map(lambda a: a[None], grid)
        grid = dataclasses.replace(grid, first=first[None], bin=bin_size[None])
        return _sampling.dense_weights(grid)[0]

    return one(gy, fy, by) * okp[:, None], one(gx, fx, bx)
