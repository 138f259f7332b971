"""Box arithmetic with static shapes: anchors, IoU, deltas, NMS and balanced sampling.

Everything here works on one image (``vmap`` it over the batch) and keeps its
shapes whatever the data: NMS returns a keep mask, sampling returns a fixed
number of slots with a mask of the ones that are real.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# detectron2's Box2BoxTransform weights for the box head; the RPN uses (1, 1, 1, 1).
HEAD_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
RPN_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
_MAX_LOG_SCALE = math.log(1000.0 / 16)


def anchors(
    image_size: int, strides: Sequence[int], sizes: Sequence[float], ratios: Sequence[float]
) -> np.ndarray:
    """``[A, 4]`` anchors, level by level, each level in ``(y, x, ratio)`` order.

    One size per level (``sizes[l]`` pixels, the square root of the area) and
    each aspect ratio (height / width), centred on the cells of a map of stride
    ``strides[l]``: the order of a head's ``[N, H, W, ratios]`` output raveled.
    """
    out = []
    for stride, size in zip(strides, sizes, strict=True):
        cells = image_size // stride
        centres = (np.arange(cells) + 0.5) * stride
        cy, cx = np.meshgrid(centres, centres, indexing="ij")
        shapes = []
        for ratio in ratios:
            w = size / math.sqrt(ratio)
            shapes.append((w, w * ratio))
        wh = np.array(shapes)  # [R, 2]
        ctr = np.stack([cx, cy], -1)[:, :, None, :]  # [H, W, 1, 2]
        out.append(np.concatenate([ctr - wh / 2, ctr + wh / 2], -1).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)


def top_k(x: Array, k: int) -> tuple[Array, Array]:
    """``jax.lax.top_k`` along the last axis, as a stable sort (ties: lower index first).

    A sort partitions along the images when the batch is sharded; XLA:CPU's
    ``TopK`` does not (the SPMD partitioner all-gathers its operand).
    """
    order = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
    return jnp.take_along_axis(x, order, axis=-1), order


def area(boxes: Array) -> Array:
    return jnp.clip(boxes[..., 2] - boxes[..., 0], 0) * jnp.clip(boxes[..., 3] - boxes[..., 1], 0)


def iou(a: Array, b: Array) -> Array:
    """Pairwise IoU of ``[A, 4]`` and ``[B, 4]`` boxes: ``[A, B]`` (0 for empty unions)."""
    lo = jnp.maximum(a[:, None, :2], b[None, :, :2])
    hi = jnp.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0), axis=-1)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1), 0.0)


def encode(boxes: Array, reference: Array, weights: Sequence[float]) -> Array:
    """Deltas ``(dx, dy, dw, dh)`` that take ``reference`` boxes to ``boxes`` (``[..., 4]``)."""
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    bw = jnp.maximum(boxes[..., 2] - boxes[..., 0], 1e-3)
    bh = jnp.maximum(boxes[..., 3] - boxes[..., 1], 1e-3)
    bx = boxes[..., 0] + 0.5 * (boxes[..., 2] - boxes[..., 0])
    by = boxes[..., 1] + 0.5 * (boxes[..., 3] - boxes[..., 1])
    rw, rh = jnp.maximum(rw, 1e-3), jnp.maximum(rh, 1e-3)
    return jnp.stack(
        [wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * jnp.log(bw / rw), wh * jnp.log(bh / rh)],
        axis=-1,
    )


def decode(deltas: Array, reference: Array, weights: Sequence[float]) -> Array:
    """The boxes that ``deltas`` make of ``reference`` boxes (inverse of :func:`encode`)."""
    wx, wy, ww, wh = weights
    rw = reference[..., 2] - reference[..., 0]
    rh = reference[..., 3] - reference[..., 1]
    rx = reference[..., 0] + 0.5 * rw
    ry = reference[..., 1] + 0.5 * rh
    dx, dy = deltas[..., 0] / wx, deltas[..., 1] / wy
    dw = jnp.minimum(deltas[..., 2] / ww, _MAX_LOG_SCALE)
    dh = jnp.minimum(deltas[..., 3] / wh, _MAX_LOG_SCALE)
    x, y = rx + dx * rw, ry + dy * rh
    w, h = rw * jnp.exp(dw), rh * jnp.exp(dh)
    return jnp.stack([x - 0.5 * w, y - 0.5 * h, x + 0.5 * w, y + 0.5 * h], axis=-1)


def clip(boxes: Array, size: int) -> Array:
    """Boxes clipped to a ``size x size`` image."""
    return jnp.clip(boxes, 0.0, float(size))


def nms(boxes: Array, valid: Array, threshold: float) -> Array:
    """Greedy NMS of ``[K, 4]`` boxes already sorted by score: the ``[K]`` keep mask.

    A box is kept if it is valid and no kept box before it overlaps it by more
    than ``threshold``. One pass of ``K`` steps over a ``[K, K]`` IoU table, so
    the shapes are static; invalid boxes neither survive nor suppress.
    """
    overlaps = iou(boxes, boxes) > threshold
    index = jnp.arange(boxes.shape[0])

    def visit(i, keep):
        return keep & ~(overlaps[i] & (index > i) & keep[i])

    return jax.lax.fori_loop(0, boxes.shape[0], visit, valid)


def balanced_sample(
    key: Array, positive: Array, negative: Array, num: int, num_positive: int
) -> tuple[Array, Array, Array]:
    """``num`` slots: up to ``num_positive`` random positives first, then random negatives.

    Returns the ``[num]`` indices into the candidates, whether each slot is a
    sampled positive, and whether it is sampled at all (a slot is empty when
    there are too few candidates). Thresholds on ``top_k`` of random priorities:
    no sort of the candidates, no scatter.
    """
    u = jax.random.uniform(key, positive.shape, jnp.float32)
    negative = negative & ~positive
    pos_cut = top_k(jnp.where(positive, u, -1.0), num_positive)[0][-1]
    take_pos = positive & (u >= pos_cut)
    room = num - jnp.minimum(take_pos.sum(), num_positive)
    neg_cut = top_k(jnp.where(negative, u, -1.0), num)[0][room - 1]
    take_neg = negative & (u >= neg_cut)
    priority = jnp.where(take_pos, 2.0 + u, jnp.where(take_neg, 1.0 + u, u - 1.0))
    _, index = top_k(priority, num)
    return index, take_pos[index], (take_pos | take_neg)[index]


def smooth_l1(x: Array, beta: float) -> Array:
    ax = jnp.abs(x)
    return jnp.where(ax < beta, 0.5 * ax**2 / beta, ax - 0.5 * beta)
