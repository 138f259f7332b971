"""Float64 NumPy loop references for TensorFlow's crops, written from the formulas
(crop_and_resize_op.cc; TF Model Garden's spatial_transform_ops.py, see
shared/semantics.md): one sample at a time, no vectorisation, so that they check
the vectorised code and the TensorFlow-ops reproduction independently."""

from __future__ import annotations

import math

import numpy as np


def crop_and_resize_ref(image, boxes, box_indices, crop_size, method="bilinear", extrap=0.0):
    """``tf.image.crop_and_resize`` in float64: ``[K, ch, cw, C]``."""
    image = np.asarray(image, np.float64)
    _, h, w, c = image.shape
    ch, cw = crop_size
    out = np.zeros((len(boxes), ch, cw, c))
    for k, (y1, x1, y2, x2) in enumerate(np.asarray(boxes, np.float64)):
        img = image[int(box_indices[k])]
        for i in range(ch):
            if ch > 1:
                y = y1 * (h - 1) + i * (y2 - y1) * (h - 1) / (ch - 1)
            else:
                y = 0.5 * (y1 + y2) * (h - 1)
            for j in range(cw):
                if cw > 1:
                    x = x1 * (w - 1) + j * (x2 - x1) * (w - 1) / (cw - 1)
                else:
                    x = 0.5 * (x1 + x2) * (w - 1)
                if not (0 <= y <= h - 1 and 0 <= x <= w - 1):
                    out[k, i, j] = extrap
                    continue
                if method == "nearest":
                    out[k, i, j] = img[int(math.floor(y + 0.5)), int(math.floor(x + 0.5))]
                    continue
                t, b = math.floor(y), math.ceil(y)
                left, r = math.floor(x), math.ceil(x)
                ly, lx = y - t, x - left
                top = img[t, left] + (img[t, r] - img[t, left]) * lx
                bot = img[b, left] + (img[b, r] - img[b, left]) * lx
                out[k, i, j] = top + (bot - top) * ly
    return out


def model_garden_level(box) -> float:
    """``floor(log(sqrt(h * w) / 224) / log 2) + 4`` (float64; -inf for no area)."""
    y1, x1, y2, x2 = box
    area = (y2 - y1) * (x2 - x1)
    if not area > 0:
        return -math.inf
    return math.floor(math.log(math.sqrt(area) / 224.0) / math.log(2.0)) + 4.0


def multilevel_crop_and_resize_ref(features: dict, boxes, output_size=7, sample_offset=0.5):
    """Model Garden's ``multilevel_crop_and_resize`` in float64: ``[B, N, P, P, C]``."""
    levels = sorted(int(k) for k in features)
    lo, hi = levels[0], levels[-1]
    maps = {int(k): np.asarray(v, np.float64) for k, v in features.items()}
    h_min, w_min = maps[lo].shape[1:3]
    boxes = np.asarray(boxes, np.float64)
    bsz, num = boxes.shape[:2]
    p = output_size
    out = np.zeros((bsz, num, p, p, maps[lo].shape[-1]))
    for bi in range(bsz):
        for n in range(num):
            box = boxes[bi, n]
            level = int(min(hi, max(lo, model_garden_level(box))))
            s = 2.0**level
            fmap = maps[level][bi]
            flat = fmap.reshape(-1, fmap.shape[-1])
            width = fmap.shape[1]
            y1, x1 = box[0] / s, box[1] / s
            bh, bw = (box[2] - box[0]) / s, (box[3] - box[1]) / s
            bound_y = h_min / 2.0 ** (level - lo) - 1
            bound_x = w_min / 2.0 ** (level - lo) - 1

            def taps(start, size, bound):
                res = []
                for i in range(p):
                    y = start + (i + sample_offset) * size / p
                    y0 = min(max(math.floor(y), 0.0), bound)
                    y1_ = min(y0 + 1.0, bound)
                    t = y - y0
                    res.append(((int(y0), 1.0 - t), (int(y1_), t)))
                return res

            ty, tx = taps(y1, bh, bound_y), taps(x1, bw, bound_x)
            for i in range(p):
                for j in range(p):
                    v = 0.0
                    for r, wr in ty[i]:
                        for cc, wc in tx[j]:
                            v = v + wr * wc * flat[r * width + cc]
                    out[bi, n, i, j] = v
    return out
