"""The naive JAX baseline: a straightforward port of torchvision's kernel.

Every bilinear tap of every sample is gathered: for a fixed grid ``s x s``
samples per bin, four ``jnp`` gathers of ``[K, PH, PW, s, s, C]`` each; for
adaptive sampling (``sampling_ratio <= 0``) a static cap per axis (the largest
grid over the benchmark's boxes, computed on the host by :func:`grid_caps`) with
the samples beyond each box's own grid masked out. This is what a port through
advanced indexing looks like (pytorch/xla#8288), and the yardstick the library
is measured against. The multi-level version runs every box on every level and
keeps the one its FPN level picks (static shapes leave no other simple way).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def grid_caps(
    rois: np.ndarray,
    output_size: int,
    spatial_scale: float,
    aligned: bool,
) -> tuple[int, int]:
    """Largest adaptive grid ``ceil(roi_size / P)`` over ``[K, 5]`` boxes, per axis (y, x).

    Computed in float32 with the kernel's arithmetic, so it is the exact maximum.
    """
    r = np.asarray(rois, np.float32)
    off = np.float32(0.5 if aligned else 0.0)
    s = np.float32(spatial_scale)
    roi_w = (r[:, 3] * s - off) - (r[:, 1] * s - off)
    roi_h = (r[:, 4] * s - off) - (r[:, 2] * s - off)
    if not aligned:
        roi_w, roi_h = np.maximum(roi_w, 1.0), np.maximum(roi_h, 1.0)
    p = np.float32(output_size)
    gy = np.ceil(roi_h / p).max(initial=1.0)
    gx = np.ceil(roi_w / p).max(initial=1.0)
    return max(int(gy), 1), max(int(gx), 1)


def naive_roi_align(
    features: Array,
    rois: Array,
    *,
    output_size: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    grid_cap: tuple[int, int] | None = None,
) -> Array:
    """RoI Align of NHWC ``features`` at ``[K, 5]`` ``rois``; returns ``[K, P, P, C]``.

    ``grid_cap`` (static) is required for adaptive sampling: the number of
    samples gathered per bin per axis; it must be at least every box's grid.
    """
    n, height, width, _ = features.shape
    p = output_size
    f32 = jnp.float32
    rois = rois.astype(f32)
    b = jnp.clip(rois[:, 0].astype(jnp.int32), 0, n - 1)
    off = 0.5 if aligned else 0.0
    x1 = rois[:, 1] * spatial_scale - off
    y1 = rois[:, 2] * spatial_scale - off
    x2 = rois[:, 3] * spatial_scale - off
    y2 = rois[:, 4] * spatial_scale - off
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / p, roi_w / p
    if sampling_ratio > 0:
        sy = sx = sampling_ratio
        gh = jnp.full_like(roi_h, float(sampling_ratio))
        gw = jnp.full_like(roi_w, float(sampling_ratio))
    else:
        if grid_cap is None:
            raise ValueError("adaptive sampling needs a static grid_cap (see grid_caps)")
        sy, sx = grid_cap
        gh, gw = jnp.ceil(roi_h / p), jnp.ceil(roi_w / p)

    def positions(start, bin_size, grid, samples):
        # [K, P, S] sample positions with torchvision's operation order, and the mask.
        ph = jnp.arange(p, dtype=f32)[None, :, None]
        i = jnp.arange(samples, dtype=f32)[None, None, :]
        bs, g = bin_size[:, None, None], grid[:, None, None]
        pos = start[:, None, None] + ph * bs + (i + 0.5) * bs / jnp.maximum(g, 1.0)
        return pos, i < g

    y, my = positions(y1, bin_h, gh, sy)
    x, mx = positions(x1, bin_w, gw, sx)
    # Every sample of every bin: [K, PH, PW, SY, SX].
    y = y[:, :, None, :, None]
    x = x[:, None, :, None, :]
    mask = my[:, :, None, :, None] & mx[:, None, :, None, :]
    inside = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width) & mask
    y = jnp.maximum(jnp.where(inside, y, 0.0), 0.0)
    x = jnp.maximum(jnp.where(inside, x, 0.0), 0.0)
    y_low = jnp.floor(y).astype(jnp.int32)
    x_low = jnp.floor(x).astype(jnp.int32)
    y_end = y_low >= height - 1
    x_end = x_low >= width - 1
    y_low = jnp.where(y_end, height - 1, y_low)
    x_low = jnp.where(x_end, width - 1, x_low)
    y = jnp.where(y_end, y_low.astype(f32), y)
    x = jnp.where(x_end, x_low.astype(f32), x)
    y_high = jnp.where(y_end, y_low, y_low + 1)
    x_high = jnp.where(x_end, x_low, x_low + 1)
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    bb = b[:, None, None, None, None]

    def tap(iy, ix, w):
        # [K, PH, PW, SY, SX, C]: one gather per tap, every sample materialised.
        return w[..., None] * features[bb, iy, ix].astype(f32)

    val = (
        tap(y_low, x_low, hy * hx)
        + tap(y_low, x_high, hy * lx)
        + tap(y_high, x_low, ly * hx)
        + tap(y_high, x_high, ly * lx)
    )
    val = jnp.where(inside[..., None], val, 0.0)
    count = jnp.maximum(gh * gw, 1.0)[:, None, None, None]
    out = jnp.sum(val, axis=(3, 4)) / count
    return out.astype(features.dtype)


def torchvision_levels(rois: Array, scales: Sequence[float]) -> Array:
    """torchvision's ``LevelMapper``: index into ``scales`` of each ``[K, 5]`` box."""
    k_min = -math.log2(scales[0])
    k_max = -math.log2(scales[-1])
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    k = jnp.floor(4.0 + jnp.log2(jnp.sqrt(area) / 224.0) + 1e-6)
    return (jnp.clip(k, k_min, k_max) - k_min).astype(jnp.int32)


def naive_multiscale_roi_align(
    features_list: Sequence[Array],
    rois: Array,
    *,
    output_size: int,
    spatial_scales: Sequence[float],
    sampling_ratio: int,
    aligned: bool,
    grid_caps: Sequence[tuple[int, int]] | None = None,
) -> Array:
    """torchvision ``MultiScaleRoIAlign`` the naive way: every box on every level, then select."""
    level = torchvision_levels(rois.astype(jnp.float32), spatial_scales)
    out = None
    for i, (f, s) in enumerate(zip(features_list, spatial_scales, strict=True)):
        cap = None if grid_caps is None else grid_caps[i]
        o = naive_roi_align(
            f,
            rois,
            output_size=output_size,
            spatial_scale=s,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            grid_cap=cap,
        )
        sel = (level == i)[:, None, None, None]
        out = o if out is None else jnp.where(sel, o, out)
    assert out is not None
    return out
