"""Float64 NumPy loop references for roi_pool, ps_roi_align and precise_roi_pool.

Written from the published formulas (../shared/semantics.md), one bin and one
cell at a time, the way the C++/CUDA kernels read. Features are ``[N, H, W, C]``.
"""

from __future__ import annotations

import math

import numpy as np
from reference import bilinear


def round_half_away(v: float) -> int:
    """C's ``round``: halves go away from zero (numpy's ``round`` goes to even)."""
    r = math.trunc(v)
    if abs(v - r) >= 0.5:  # v - trunc(v) is exact
        r += 1 if v > 0 else -1
    return int(r)


def roi_pool_ref(features, boxes, batch, output_size, spatial_scale, dtype=np.float64):
    """Fast R-CNN max pooling; returns ``out [K, PH, PW, C]`` and ``argmax [K, PH, PW, C]``
    (flat ``h * W + w`` index of the first maximum in scan order, -1 for an empty bin).

    ``dtype`` is the arithmetic of the box geometry (torchvision computes it in the
    input's type: in float32, ``5 * (3 / 5)`` is just above 3, and its ceil is 4).
    """
    ph_n, pw_n = output_size
    _, h, w, c = features.shape
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, c))
    arg = np.full((k, ph_n, pw_n, c), -1, np.int64)
    t = dtype
    for i in range(k):
        fmap = features[batch[i]]
        x1, y1, x2, y2 = (round_half_away(float(t(v) * t(spatial_scale))) for v in boxes[i])
        rh = max(y2 - y1 + 1, 1)
        rw = max(x2 - x1 + 1, 1)
        bh, bw = t(rh) / t(ph_n), t(rw) / t(pw_n)
        for ph in range(ph_n):
            hs = min(max(math.floor(t(ph) * bh) + y1, 0), h)
            he = min(max(math.ceil(t(ph + 1) * bh) + y1, 0), h)
            for pw in range(pw_n):
                ws = min(max(math.floor(t(pw) * bw) + x1, 0), w)
                we = min(max(math.ceil(t(pw + 1) * bw) + x1, 0), w)
                if he <= hs or we <= ws:
                    continue
                for ch in range(c):
                    best, where = -np.finfo(np.float32).max, -1
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            if fmap[yy, xx, ch] > best:
                                best, where = fmap[yy, xx, ch], yy * w + xx
                    out[i, ph, pw, ch] = best
                    arg[i, ph, pw, ch] = where
    return out, arg


def roi_pool_grad_ref(features, batch, argmax, cotangent):
    """Gradient of ``sum(out * cotangent)`` w.r.t. features: each bin's cotangent goes to
    its argmax."""
    n, h, w, c = features.shape
    grad = np.zeros((n, h * w, c))
    k, ph_n, pw_n, _ = argmax.shape
    for i in range(k):
        for ph in range(ph_n):
            for pw in range(pw_n):
                for ch in range(c):
                    a = argmax[i, ph, pw, ch]
                    if a >= 0:
                        grad[batch[i], a, ch] += cotangent[i, ph, pw, ch]
    return grad.reshape(n, h, w, c)


def ps_roi_align_ref(features, boxes, batch, output_size, spatial_scale, sampling_ratio):
    """torchvision's position-sensitive RoI Align; ``[K, PH, PW, C_out]``.

    An empty adaptive grid gives 0 here (torchvision: 0 / 0 = NaN).
    """
    ph_n, pw_n = output_size
    c_out = features.shape[-1] // (ph_n * pw_n)
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, c_out))
    for i in range(k):
        fmap = features[batch[i]]
        x1, y1, x2, y2 = (float(v) * spatial_scale - 0.5 for v in boxes[i])
        rh, rw = y2 - y1, x2 - x1
        bh, bw = rh / ph_n, rw / pw_n
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / ph_n)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / pw_n)
        for ph in range(ph_n):
            for pw in range(pw_n):
                chans = [(co * ph_n + ph) * pw_n + pw for co in range(c_out)]
                total = np.zeros(c_out)
                for iy in range(max(gh, 0)):
                    y = ph * bh + y1 + (iy + 0.5) * bh / gh
                    for ix in range(max(gw, 0)):
                        x = pw * bw + x1 + (ix + 0.5) * bw / gw
                        total += bilinear(fmap, y, x)[chans]
                count = gh * gw
                out[i, ph, pw] = total / count if count != 0 else 0.0
    return out


def _cell_weight(a: float, b: float) -> float:
    """Integral of ``1 - t`` over ``[a, b]`` (local coordinate inside one unit cell)."""
    return (b - 0.5 * b * b) - (a - 0.5 * a * a)


def precise_roi_pool_ref(features, boxes, batch, output_size, spatial_scale):
    """PrRoIPool, literally: per bin, per unit cell the bin overlaps, the exact integral
    of the cell's bilinear patch (corner values 0 outside the map), over the bin area."""
    ph_n, pw_n = output_size
    n, h, w, c = features.shape
    k = boxes.shape[0]
    out = np.zeros((k, ph_n, pw_n, c))

    def value(fmap, yy, xx):
        if 0 <= yy < h and 0 <= xx < w:
            return fmap[yy, xx]
        return np.zeros(c)

    for i in range(k):
        fmap = features[batch[i]]
        x1, y1, x2, y2 = (float(v) * spatial_scale for v in boxes[i])
        rw, rh = max(x2 - x1, 0.0), max(y2 - y1, 0.0)
        bh, bw = rh / ph_n, rw / pw_n
        area = max(bh * bw, 0.0)
        if area == 0:
            continue
        for ph in range(ph_n):
            ya = y1 + bh * ph
            yb = ya + bh
            for pw in range(pw_n):
                xa = x1 + bw * pw
                xb = xa + bw
                total = np.zeros(c)
                for cy in range(math.floor(ya), math.ceil(yb)):
                    lo_y, hi_y = max(ya, cy) - cy, min(yb, cy + 1) - cy
                    for cx in range(math.floor(xa), math.ceil(xb)):
                        lo_x, hi_x = max(xa, cx) - cx, min(xb, cx + 1) - cx
                        # corner (cy, cx) weighs (1 - dy)(1 - dx); the far corners mirror it
                        wy0 = _cell_weight(lo_y, hi_y)
                        wy1 = _cell_weight(1 - hi_y, 1 - lo_y)
                        wx0 = _cell_weight(lo_x, hi_x)
                        wx1 = _cell_weight(1 - hi_x, 1 - lo_x)
                        total = total + (
                            wy0 * wx0 * value(fmap, cy, cx)
                            + wy0 * wx1 * value(fmap, cy, cx + 1)
                            + wy1 * wx0 * value(fmap, cy + 1, cx)
                            + wy1 * wx1 * value(fmap, cy + 1, cx + 1)
                        )
                out[i, ph, pw] = total / area
    return out


def bilinear_surface(fmap: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The PrRoIPool surface at points ``y, x`` ``[M]``: bilinear between grid points,
    grid values 0 outside the map. Returns ``[M, C]``."""
    h, w, c = fmap.shape
    padded = np.zeros((h + 4, w + 4, c))
    padded[2 : h + 2, 2 : w + 2] = fmap
    y = np.clip(y, -2.0, h + 1.0)
    x = np.clip(x, -2.0, w + 1.0)
    y0 = np.floor(y).astype(int)
    x0 = np.floor(x).astype(int)
    dy = (y - y0)[:, None]
    dx = (x - x0)[:, None]

    def at(yy, xx):
        return padded[yy + 2, xx + 2]

    return (
        (1 - dy) * (1 - dx) * at(y0, x0)
        + (1 - dy) * dx * at(y0, np.minimum(x0 + 1, w + 1))
        + dy * (1 - dx) * at(np.minimum(y0 + 1, h + 1), x0)
        + dy * dx * at(np.minimum(y0 + 1, h + 1), np.minimum(x0 + 1, w + 1))
    )


def precise_quadrature_ref(features, boxes, batch, output_size, spatial_scale, points=3):
    """Independent check of PrRoIPool: Gauss-Legendre quadrature of the bilinear surface,
    the bin split at every integer line so each piece is one bilinear patch (on which
    a 2-point or finer rule is exact). Returns ``[K, PH, PW, C]``."""
    nodes, weights = np.polynomial.legendre.leggauss(points)
    ph_n, pw_n = output_size
    k = boxes.shape[0]
    c = features.shape[-1]
    out = np.zeros((k, ph_n, pw_n, c))

    def pieces(a, b):
        cuts = [a] + [float(t) for t in range(math.floor(a) + 1, math.ceil(b))] + [b]
        pts, wts = [], []
        for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
            half = (hi - lo) / 2
            pts.append(lo + half * (nodes + 1))
            wts.append(half * weights)
        return np.concatenate(pts), np.concatenate(wts)

    for i in range(k):
        fmap = features[batch[i]]
        x1, y1, x2, y2 = (float(v) * spatial_scale for v in boxes[i])
        bh, bw = max(y2 - y1, 0.0) / ph_n, max(x2 - x1, 0.0) / pw_n
        if bh * bw == 0:
            continue
        for ph in range(ph_n):
            ys, wys = pieces(y1 + bh * ph, y1 + bh * (ph + 1))
            for pw in range(pw_n):
                xs, wxs = pieces(x1 + bw * pw, x1 + bw * (pw + 1))
                yy, xx = np.meshgrid(ys, xs, indexing="ij")
                vals = bilinear_surface(fmap, yy.ravel(), xx.ravel())
                wgt = (wys[:, None] * wxs[None, :]).ravel()
                out[i, ph, pw] = (wgt[:, None] * vals).sum(0) / (bh * bw)
    return out


GOLDEN = __import__("pathlib").Path(__file__).resolve().parent / "golden"


def load_golden(name: str) -> tuple[dict, list[dict]]:
    """A golden file written by tools/make_golden.py: ``(arrays, configs)``.

    Each config dict gets its arrays as ``rois``, ``output``, ``grad_output``,
    ``grad_input`` (NCHW, as torchvision wrote them).
    """
    import json

    with np.load(GOLDEN / name) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(str(arrays.pop("configs")))
    configs = []
    for i, cfg in enumerate(meta["configs"]):
        cfg = dict(cfg)
        for key in ("rois", "output", "grad_output", "grad_input"):
            cfg[key] = arrays[f"c{i}_{key}"]
        configs.append(cfg)
    return arrays, configs
