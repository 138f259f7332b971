"""Float64 NumPy loop references, written from the published formulas (see ../shared/semantics.md).

Slow and literal on purpose: one sample at a time, the way the C++ kernels read.
"""

from __future__ import annotations

import math

import numpy as np


def bilinear(fmap: np.ndarray, y: float, x: float) -> np.ndarray:
    """torchvision's bilinear read of ``fmap [H, W, C]`` at (y, x); 0 outside [-1, H] x [-1, W]."""
    h, w = fmap.shape[:2]
    if not (y >= -1.0 and y <= h and x >= -1.0 and x <= w):
        return np.zeros(fmap.shape[2:], fmap.dtype)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= h - 1:
        y_low = y_high = h - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= w - 1:
        x_low = x_high = w - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (
        hy * hx * fmap[y_low, x_low]
        + hy * lx * fmap[y_low, x_high]
        + ly * hx * fmap[y_high, x_low]
        + ly * lx * fmap[y_high, x_high]
    )


def roi_align_ref(
    features: np.ndarray,
    boxes: np.ndarray,
    batch: np.ndarray,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    mode: str = "avg",
) -> np.ndarray:
    """features ``[N, H, W, C]``, boxes ``[K, 4]``, batch ``[K]`` -> ``[K, PH, PW, C]``."""
    ph_n, pw_n = output_size
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, features.shape[-1]), np.float64)
    off = 0.5 if aligned else 0.0
    for i in range(k):
        fmap = features[batch[i]].astype(np.float64)
        x1, y1, x2, y2 = (float(v) for v in boxes[i])
        sx, sy = x1 * spatial_scale - off, y1 * spatial_scale - off
        rw = x2 * spatial_scale - off - sx
        rh = y2 * spatial_scale - off - sy
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        for ph in range(ph_n):
            for pw in range(pw_n):
                vals = []
                for iy in range(max(gh, 0)):
                    y = sy + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        x = sx + pw * bw + (ix + 0.5) * bw / gw
                        vals.append(bilinear(fmap, y, x))
                if mode == "avg":
                    total = np.sum(vals, axis=0) if vals else 0.0
                    out[i, ph, pw] = total / max(gh * gw, 1)
                else:
                    out[i, ph, pw] = np.max(vals, axis=0) if vals else 0.0
    return out
