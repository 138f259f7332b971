"""Region proposals under ``jit``: anchors, top-k, NMS, padding; and the RPN's loss.

Proposals keep their shape whatever the scores: ``post_nms`` boxes per image
with a mask of the real ones. They are differentiable with respect to the RPN's
box deltas (the top-k and NMS choose indices from stopped scores and boxes; the
chosen boxes are decoded from the deltas), which is what lets a box gradient
from the heads reach the RPN when nobody stops it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from . import boxes as bx
from .model import Config, like_batch

Array = jax.Array

RPN_POSITIVE, RPN_NEGATIVE = 0.7, 0.3  # anchor IoU thresholds (Faster R-CNN)


@functools.lru_cache(maxsize=8)
def _anchors(config: Config) -> np.ndarray:
    sizes = config.anchor_sizes
    return bx.anchors(config.image_size, config.strides, sizes, config.aspect_ratios)


def anchors(config: Config) -> Array:
    """``[A, 4]`` float32 anchors of the config, P2's first (a constant of the program)."""
    return jnp.asarray(_anchors(config))


def per_image(constant: Array, ref: Array) -> Array:
    """``constant`` repeated for each image of ``ref`` (axis 0), sharded like ``ref``: under
    explicit sharding, a gather from a replicated table at batch-sharded indices
    has no unambiguous output sharding, a gather from each device's copy does."""
    return like_batch(jnp.broadcast_to(constant, (ref.shape[0],) + constant.shape), ref)


def _propose_one(config: Config, anc: Array, logits: Array, deltas: Array) -> tuple[Array, Array]:
    scores, index = bx.top_k(jax.lax.stop_gradient(logits), config.pre_nms)
    boxes = bx.decode(deltas[index], anc[index], bx.RPN_WEIGHTS)
    boxes = bx.clip(boxes, config.image_size)
    sizes = boxes[:, 2:] - boxes[:, :2]
    valid = jnp.all(sizes >= 1.0, axis=-1)
    keep = bx.nms(jax.lax.stop_gradient(boxes), valid, config.rpn_nms)
    top, chosen = bx.top_k(jnp.where(keep, scores, -jnp.inf), config.post_nms)
    return boxes[chosen], top > -jnp.inf


def propose(config: Config, logits: Array, deltas: Array) -> tuple[Array, Array]:
    """Proposals ``[N, post_nms, 4]`` and their valid mask ``[N, post_nms]``.

    Per image: the ``pre_nms`` anchors of highest objectness (over all levels),
    decoded and clipped, boxes under a pixel dropped, NMS at ``rpn_nms``, the
    best ``post_nms`` survivors, by score, padded when fewer survive.
    """
    anc = per_image(anchors(config), logits)
    return jax.vmap(functools.partial(_propose_one, config))(anc, logits, deltas)


def _rpn_loss_one(
    config: Config,
    anc: Array,
    logits: Array,
    deltas: Array,
    gt: Array,
    gt_valid: Array,
    key: Array,
) -> tuple[Array, Array]:
    overlaps = jnp.where(gt_valid[None, :], bx.iou(anc, gt), -1.0)  # [A, M]
    best = overlaps.max(axis=1)
    matched = overlaps.argmax(axis=1)
    # Each ground-truth box also claims the anchors that overlap it most.
    best_per_gt = overlaps.max(axis=0)
    claimed = ((overlaps == best_per_gt[None, :]) & gt_valid[None, :] & (best_per_gt > 0)).any(1)
    positive = (best >= RPN_POSITIVE) | claimed
    negative = (best < RPN_NEGATIVE) & (best >= 0)
    num_pos = int(config.rpn_batch * 0.5)
    index, pos, taken = bx.balanced_sample(key, positive, negative, config.rpn_batch, num_pos)
    cls = optax.sigmoid_binary_cross_entropy(logits[index], pos.astype(jnp.float32))
    target = bx.encode(gt[matched[index]], anc[index], bx.RPN_WEIGHTS)
    reg = bx.smooth_l1(deltas[index] - target, 1.0 / 9).sum(-1)
    count = jnp.maximum(taken.sum(), 1)
    return jnp.sum(cls * taken) / count, jnp.sum(reg * pos) / count


def rpn_loss(
    config: Config, logits: Array, deltas: Array, gt: Array, gt_valid: Array, key: Array
) -> tuple[Array, Array]:
    """Objectness (binary cross-entropy) and box (smooth L1) losses of the RPN.

    Anchors with IoU >= 0.7 with a ground-truth box (or the best anchors of a
    box) are positive, < 0.3 negative; ``rpn_batch`` of them per image, at most
    half positive, are sampled. Both terms are divided by the sampled count.
    """
    keys = like_batch(jax.random.split(key, logits.shape[0]), logits)
    fn = jax.vmap(functools.partial(_rpn_loss_one, config))
    cls, reg = fn(per_image(anchors(config), logits), logits, deltas, gt, gt_valid, keys)
    return cls.mean(), reg.mean()
