"""Float64 NumPy loop references for rotated and deformable RoI Align (see ../shared/semantics.md).

Written from the published kernels' formulas (detectron2 ``ROIAlignRotated``,
mmcv ``RoIAlignRotated`` and ``DeformRoIPool``), one sample at a time. The
bilinear read is the one of :mod:`reference` (torchvision's rule).
"""

from __future__ import annotations

import math

import numpy as np
from reference import bilinear


def roi_align_rotated_ref(
    features: np.ndarray,
    boxes: np.ndarray,
    batch: np.ndarray,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    clockwise: bool = False,
    degrees: bool = True,
) -> np.ndarray:
    """features ``[N, H, W, C]``, boxes ``[K, 5]`` (cx, cy, w, h, angle) -> ``[K, PH, PW, C]``.

    Defaults are detectron2's (always -0.5, angle in degrees, counter-clockwise);
    ``degrees=False`` with ``aligned``/``clockwise`` is mmcv's.
    """
    ph_n, pw_n = output_size
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, features.shape[-1]), np.float64)
    off = 0.5 if aligned else 0.0
    for i in range(k):
        fmap = features[batch[i]].astype(np.float64)
        cx, cy, w, h, a = (float(v) for v in boxes[i])
        ccx = cx * spatial_scale - off
        ccy = cy * spatial_scale - off
        rw = w * spatial_scale
        rh = h * spatial_scale
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        theta = a * math.pi / 180.0 if degrees else a
        if clockwise:
            theta = -theta
        ct, st = math.cos(theta), math.sin(theta)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        sy, sx = -rh / 2.0, -rw / 2.0
        count = max(gh * gw, 1) if gh > 0 and gw > 0 else 1
        for ph in range(ph_n):
            for pw in range(pw_n):
                total = np.zeros(features.shape[-1])
                for iy in range(max(gh, 0)):
                    yy = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        xx = sx + pw * bw + (ix + 0.5) * bw / gw
                        y = yy * ct - xx * st + ccy
                        x = yy * st + xx * ct + ccx
                        total = total + bilinear(fmap, y, x)
                out[i, ph, pw] = total / count
    return out


def deform_roi_align_ref(
    features: np.ndarray,
    boxes: np.ndarray,
    batch: np.ndarray,
    offsets: np.ndarray,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    gamma: float,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """mmcv ``DeformRoIPool``: features ``[N, H, W, C]``, boxes ``[K, 4]``, offsets
    ``[K, PH, PW, 2]`` as (dx, dy), optional mask ``[K, PH, PW]`` -> ``[K, PH, PW, C]``."""
    ph_n, pw_n = output_size
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, features.shape[-1]), np.float64)
    for i in range(k):
        fmap = features[batch[i]].astype(np.float64)
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        sx = x1 * spatial_scale - 0.5
        sy = y1 * spatial_scale - 0.5
        rw = (x2 * spatial_scale - 0.5) - sx
        rh = (y2 * spatial_scale - 0.5) - sy
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        count = max(gh * gw, 1)
        for ph in range(ph_n):
            for pw in range(pw_n):
                dx, dy = (float(v) for v in offsets[i, ph, pw])
                bx = sx + gamma * rw * dx
                by = sy + gamma * rh * dy
                total = np.zeros(features.shape[-1])
                for iy in range(max(gh, 0)):
                    y = by + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        x = bx + pw * bw + (ix + 0.5) * bw / gw
                        total = total + bilinear(fmap, y, x)
                val = total / count
                if mask is not None:
                    val = val * float(mask[i, ph, pw])
                out[i, ph, pw] = val
    return out
