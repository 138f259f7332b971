"""Held-out metrics in NumPy: box and mask AP at IoU 0.5, and mean mask IoU.

* **AP@0.5** (boxes or masks): per class, the detections of all images sorted
  by score are matched greedily to unmatched ground truth of their class and
  image at IoU >= 0.5; AP is the area under the precision envelope (all
  points, as VOC 2010+ and COCO's per-threshold AP); the mean over the classes.
* **Mask IoU**: for every ground-truth object, the mask IoU of the detection
  that the box AP matched to it (0 when none did), averaged over objects: it
  counts a missed object as 0, so it measures detection and segmentation together.
"""

from __future__ import annotations

import numpy as np

from .data import CLASSES, Scenes


def paste_mask(mask: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """A ``[28, 28]`` probability map inside ``box`` as an ``[S, S]`` boolean image mask
    (bilinear, edge-clamped, thresholded at 0.5)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    m = mask.shape[0]
    centres = np.arange(size) + 0.5
    u = (centres - x1) / max(x2 - x1, 1e-6) * m - 0.5
    v = (centres - y1) / max(y2 - y1, 1e-6) * m - 0.5

    def taps(t):
        t = np.clip(t, 0, m - 1)
        lo = np.floor(t).astype(int)
        hi = np.minimum(lo + 1, m - 1)
        return lo, hi, t - lo

    (ulo, uhi, fu), (vlo, vhi, fv) = taps(u), taps(v)
    top = mask[vlo][:, ulo] * (1 - fu) + mask[vlo][:, uhi] * fu
    bottom = mask[vhi][:, ulo] * (1 - fu) + mask[vhi][:, uhi] * fu
    values = top * (1 - fv)[:, None] + bottom * fv[:, None]
    inside = ((centres >= y1) & (centres < y2))[:, None] & ((centres >= x1) & (centres < x2))
    return (values >= 0.5) & inside


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo = np.maximum(a[:, None, :2], b[None, :, :2])
    hi = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def _mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def average_precision(tp: np.ndarray, scores: np.ndarray, num_gt: int) -> float:
    """All-point interpolated AP of detections (``tp`` flags, ``scores``) against ``num_gt``."""
    if num_gt == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(tp[order])
    recall = np.concatenate([[0.0], hits / num_gt])
    precision = np.concatenate([[1.0], hits / np.arange(1, len(order) + 1)])
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(recall) * envelope[1:]))


def _match(det_iou: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Greedy matching of detections (in ``order``) to ground truth: each detection's
    ground-truth index or -1."""
    taken = np.zeros(det_iou.shape[1], bool)
    match = np.full(det_iou.shape[0], -1)
    for d in order:
        if det_iou.shape[1] == 0:
            break
        cand = np.where(taken, -1.0, det_iou[d])
        g = int(np.argmax(cand))
        if cand[g] >= 0.5:
            taken[g] = True
            match[d] = g
    return match


def evaluate(det: dict[str, np.ndarray], scenes: Scenes) -> dict[str, float]:
    """``box_ap50``, ``mask_ap50`` and ``mask_iou`` of detections on ``scenes``.

    ``det``: NumPy arrays ``boxes`` ``[N, D, 4]``, ``scores``, ``classes``,
    ``valid`` ``[N, D]`` and ``masks`` ``[N, D, 28, 28]``.
    """
    size = scenes.images.shape[1]
    per_class: dict[int, dict[str, list]] = {
        k: {"scores": [], "box_tp": [], "mask_tp": []} for k in range(1, len(CLASSES) + 1)
    }
    num_gt = {k: 0 for k in per_class}
    object_ious = []
    for n in range(scenes.images.shape[0]):
        ok = det["valid"][n]
        boxes, scores, classes = det["boxes"][n][ok], det["scores"][n][ok], det["classes"][n][ok]
        pasted = [paste_mask(m, b, size) for m, b in zip(det["masks"][n][ok], boxes, strict=True)]
        for k in per_class:
            gts = np.nonzero(scenes.classes[n] == k)[0]
            num_gt[k] += len(gts)
            mine = np.nonzero(classes == k)[0]
            order = mine[np.argsort(-scores[mine], kind="stable")]
            gt_masks = scenes.masks[n, gts].astype(bool)
            box_iou = np.zeros((len(classes), len(gts)))
            mask_iou = np.zeros((len(classes), len(gts)))
            for d in mine:
                box_iou[d] = _box_iou(boxes[d : d + 1], scenes.boxes[n, gts])[0]
                mask_iou[d] = [_mask_iou(pasted[d], g) for g in gt_masks]
            box_match, mask_match = _match(box_iou, order), _match(mask_iou, order)
            per_class[k]["scores"] += list(scores[mine])
            per_class[k]["box_tp"] += list(box_match[mine] >= 0)
            per_class[k]["mask_tp"] += list(mask_match[mine] >= 0)
            for g in range(len(gts)):
                hit = np.nonzero(box_match == g)[0]
                object_ious.append(mask_iou[hit[0], g] if len(hit) else 0.0)
    aps = {"box_ap50": [], "mask_ap50": []}
    for k, rec in per_class.items():
        scores = np.asarray(rec["scores"], np.float64)
        for name, tp in (("box_ap50", rec["box_tp"]), ("mask_ap50", rec["mask_tp"])):
            ap = average_precision(np.asarray(tp, np.float64), scores, num_gt[k])
            if not np.isnan(ap):
                aps[name].append(ap)
    return {
        "box_ap50": float(np.mean(aps["box_ap50"])) if aps["box_ap50"] else 0.0,
        "mask_ap50": float(np.mean(aps["mask_ap50"])) if aps["mask_ap50"] else 0.0,
        "mask_iou": float(np.mean(object_ious)) if object_ious else 0.0,
    }
