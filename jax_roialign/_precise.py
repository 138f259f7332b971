"""Precise RoI Pooling (PrRoIPool, Jiang et al., ECCV 2018): exact integrals, no sampling.

The map is read as a continuous surface: bilinear interpolation between cell
centres, with the grid values taken as 0 outside the map (so the surface falls
linearly to 0 over one cell beyond the border). A bin's value is the integral of
that surface over the bin divided by the bin's area. The surface is a sum of
``F[h, w] * tent(y - h) * tent(x - w)`` with ``tent(t) = max(0, 1 - |t|)``, so the
integral factorises per axis: the weight of row ``h`` in a bin ``[a, b]`` is
``T(b - h) - T(a - h)``, ``T`` the (piecewise quadratic) integral of the tent.
These weights are the per-axis taps, contracted with the map by the same
:func:`contract_taps` / :func:`contract_dense` as RoI Align. Every step is
differentiable in the box coordinates too.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import _dispatch, _window
from ._contract import contract_dense, contract_taps
from ._dispatch import Implementation
from ._recipe import BoxRecipe
from ._tuning import TUNING
from ._validation import prepare

Array = jax.Array


def precise_roi_pool(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
    checks: bool = False,
    method: str | None = None,
) -> Array:
    """Precise RoI Pooling: the exact average of the bilinear surface over each bin.

    A box ``(x1, y1, x2, y2)`` in image coordinates is mapped as
    ``x * spatial_scale`` (no half-pixel offset, no rounding; a negative size is
    taken as 0) and split into ``output_size`` bins. Each bin's value is the
    integral, over the bin, of the bilinear interpolation of the map (grid value
    ``F[h, w]`` at the point ``(h, w)``, 0 for points outside the map), divided by
    the bin's area; a bin of zero area gives 0. No sampling grid is involved, so
    the result is continuous and differentiable in the box coordinates as well as
    the features (PrRoIPool's gradient with respect to the box).

    For example, with the stride-16 map of a 600 x 1000 image, ``spatial_scale=0.0625``
    maps the box ``(100, 40, 212, 96)`` to ``(6.25, 2.5, 13.25, 6.0)``; with
    ``output_size=7`` each bin is 1 cell wide and 0.5 cell tall.

    Same numbers (in float64) as ``PrRoIPool2D(PH, PW, spatial_scale)(features, rois)``
    of the reference implementation (vacancy/PreciseRoIPooling, NCHW features,
    ``[K, 5]`` rois), as used by IoU-Net and the ATOM / DiMP trackers.

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point.
      boxes: image coordinates ``(x1, y1, x2, y2)``: ``[K, 5]`` rows
        ``(batch_index, x1, y1, x2, y2)``, ``[K, 4]`` with ``box_indices``, or
        per image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.0625 for stride 16.
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default) or ``"NCHW"``.
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by platform; or ``"gather"``, ``"scatter"``,
        ``"window"``, ``"pallas"``, ``"matmul"`` (as :func:`jax_roialign.roi_align`).
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.
      method: deprecated alias of ``implementation`` (``"auto"`` is ``None``).

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype.

    Boxes with a non-finite coordinate or a batch index outside ``[0, N)`` give
    zeros (and zero gradients).

    Examples:
      The average of a linear ramp (``8 * h + w``) over a bin is its value at the
      bin's centre. The box ``(1, 1, 5, 5)`` is not shifted, so the bins are
      centred at rows and columns 2 and 4; the box gets a gradient:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> out = jr.precise_roi_pool(features, boxes, output_size=2)
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[18.0, 20.0], [34.0, 36.0]]
      >>> loss = lambda b: jr.precise_roi_pool(features, b, output_size=2).sum()
      >>> jax.grad(loss)(boxes).tolist()
      [[0.0, 2.0, 16.0, 2.0, 16.0]]
    """
    impl = _dispatch.implementation_arg(implementation, method)
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    recipe = PrecisePool(**PrecisePool.settings(call))

    def body():
        args = (call.rois.coords, call.rois.batch, call.rois.ok)
        return _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]

    return call.output(body)


@dataclasses.dataclass(frozen=True)
class PrecisePool(BoxRecipe):
    """``precise_roi_pool`` on ``(features, coords [K, 4], batch [K], ok [K])``."""

    name = "precise_roi_pool"

    def forward(self, impl):
        def fn(features, coords, batch, ok):
            b = self.batch(features, batch)
            return [_precise_read(self, features, coords, b, ok, impl)]

        return fn


def tent_integral(u: Array) -> Array:
    """``T(u) = integral of max(0, 1 - |t|) over t < u``: 0, rising quadratically to 1."""
    u = jnp.clip(u, -1.0, 1.0)
    return jnp.where(u <= 0.0, 0.5 * (u + 1.0) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def bin_edges(lo: Array, hi: Array, *, pooled: int, spatial_scale: float) -> tuple[Array, Array]:
    """Each bin's start ``[K, P]`` and size ``[K, 1]`` along one axis, PrRoIPool's arithmetic."""
    start = lo * spatial_scale
    size = jnp.maximum(hi * spatial_scale - start, 0.0)
    bin_size = size / pooled
    p = jnp.arange(pooled, dtype=size.dtype)
    return start[:, None] + bin_size[:, None] * p[None, :], bin_size[:, None]


def integral_weights(first: Array, bin_size: Array, rows: Array, length: int) -> Array:
    """Weight of row ``rows [K, P, T]`` in the bin ``[first, first + bin]``, over the bin size.

    The integral of row ``r``'s tent over the bin, ``T(b - r) - T(a - r)``, divided by
    the bin size (0 for an empty bin); rows outside ``[0, length)`` weigh 0.
    """
    a = first[..., None]
    b = a + bin_size[..., None]
    r = rows.astype(first.dtype)
    w = tent_integral(b - r) - tent_integral(a - r)
    positive = bin_size > 0
    inv = jnp.where(positive, 1.0 / jnp.where(positive, bin_size, 1.0), 0.0)
    inside = (rows >= 0) & (rows < length)
    return jnp.where(inside, w * inv[..., None], 0.0)


def integral_window(first: Array, bin_size: Array, length: int) -> tuple[Array, Array]:
    """First row ``[K, P]`` with a nonzero weight (clamped into the map), and the rows needed.

    Rows ``floor(a) .. ceil(b)`` meet the bin ``[a, b]``'s tents.
    """
    top = length - 1
    r0 = jnp.clip(jnp.floor(first), 0, top)
    r1 = jnp.clip(jnp.ceil(first + bin_size), 0, top)
    return r0.astype(jnp.int32), (r1 - r0 + 1).astype(jnp.int32)


def _precise_read(
    call: PrecisePool, features: Array, coords: Array, batch: Array, ok_box: Array, method
) -> Array:
    layout = call.layout
    pooled, size, spatial_scale, dtype = call.pooled, call.size, call.spatial_scale, call.dtype
    coords = jnp.where(ok_box[:, None], coords.astype(dtype), 0.0)
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))
    fy, by = bin_edges(y1, y2, pooled=pooled[0], spatial_scale=spatial_scale)
    fx, bx = bin_edges(x1, x2, pooled=pooled[1], spatial_scale=spatial_scale)
    ok = ok_box.astype(dtype)[:, None, None]
    axes = ((fy, by, size[0]), (fx, bx, size[1]))
    # A bin of b cells meets at most ceil(b) + 2 rows.
    windows = [
        min(length, TUNING.half_map_window(length, p) + 1)
        for length, p in zip(size, pooled, strict=True)
    ]

    def fast():
        taps = []
        for (first, bin_size, length), t in zip(axes, windows, strict=True):
            r0, _ = integral_window(first, bin_size, length)
            rows = r0[..., None] + jnp.arange(t, dtype=jnp.int32)
            taps.append(
                (jnp.minimum(rows, length - 1), integral_weights(first, bin_size, rows, length))
            )
        (iy, wy), (ix, wx) = taps
        return contract_taps(
            features,
            layout,
            batch,
            iy,
            wy * ok,
            ix,
            wx,
            dtype,
            row_vjp=method is Implementation.GATHER,
        )

    def dense():
        weights = []
        for first, bin_size, length in axes:
            rows = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), first.shape + (length,))
            weights.append(integral_weights(first, bin_size, rows, length))
        wy, wx = weights
        return contract_dense(features, layout, batch, wy * ok, wx, dtype)

    def window():
        weights, spans = [], []
        for first, bin_size, length in axes:
            rows = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), first.shape + (length,))
            weights.append(integral_weights(first, bin_size, rows, length))
            r0, need = integral_window(first, bin_size, length)
            used = (need > 0) & (ok_box[:, None])
            lo = jnp.min(jnp.where(used, r0, length), axis=1)
            hi = jnp.max(jnp.where(used, r0 + need, 0), axis=1)
            spans.append((jnp.where(hi > lo, lo, 0), jnp.maximum(hi - lo, 0)))
        (wy, wx), ((ly, ny), (lx, nx)) = weights, spans
        level = jnp.zeros(batch.shape, jnp.int32)
        return _window.contract_window(
            [features],
            layout,
            wy * ok,
            wx,
            level,
            ly,
            ny,
            lx,
            nx,
            dtype,
            batch=batch,
            pallas=method is Implementation.PALLAS,
            out_dtype=features.dtype,  # only the final cast follows (same bits)
        ).astype(dtype)

    if method in (Implementation.WINDOW, Implementation.PALLAS):
        return window()

    fits = [
        jnp.all(jnp.where(ok[..., 0] > 0, integral_window(first, bin_size, length)[1], 0) <= t)
        for (first, bin_size, length), t in zip(axes, windows, strict=True)
        if t < length
    ]
    if method is Implementation.MATMUL:
        return dense()
    if not fits:
        return fast()
    return jax.lax.cond(jnp.all(jnp.stack(fits)), fast, dense)
