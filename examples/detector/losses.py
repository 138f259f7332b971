"""The training loss: RPN, box head and mask head, with RoI sampling under ``jit``.

The proposals are detached (``jax.lax.stop_gradient``) before the heads pool
from them, as in Faster R-CNN's approximate joint training and every common
implementation. ``stop_gradient=False`` leaves them attached: the heads' loss
then reaches the RPN's box deltas through pooling's gradient with respect to
the boxes. Matching and regression targets always use the detached boxes.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import boxes as bx
from .model import Config, MaskRCNN, like_batch, reshape
from .rpn import propose, rpn_loss

Array = jax.Array
Batch = dict[str, Array]

HEAD_POSITIVE = 0.5  # RoI IoU threshold for a foreground RoI


def _sample_one(
    config: Config, candidates: Array, valid: Array, gt: Array, gt_valid: Array, key: Array
) -> tuple[Array, ...]:
    fixed = jax.lax.stop_gradient(candidates)
    overlaps = jnp.where(gt_valid[None, :], bx.iou(fixed, gt), -1.0)  # [P + M, M]
    best, matched = overlaps.max(axis=1), overlaps.argmax(axis=1)
    positive = valid & (best >= HEAD_POSITIVE)
    negative = valid & (best < HEAD_POSITIVE)
    index, pos, taken = bx.balanced_sample(
        key, positive, negative, config.rois_per_image, config.mask_rois
    )
    return candidates[index], matched[index], pos, taken


def sample_rois(
    config: Config, proposals: Array, valid: Array, batch: Batch, key: Array
) -> tuple[Array, ...]:
    """RoIs for the heads: ``rois_per_image`` per image from the proposals and the
    ground-truth boxes (added as candidates, as Mask R-CNN does), a quarter
    positive (IoU >= 0.5) at most, positives first.

    Returns the RoIs ``[N, R, 4]`` (differentiable wherever the proposals are),
    the index of each RoI's ground-truth box ``[N, R]``, whether it is positive
    and whether the slot is sampled at all (``[N, R]`` masks).
    """
    gt, gt_valid = batch["boxes"], batch["classes"] > 0
    candidates = jnp.concatenate([proposals, gt], axis=1)
    cand_valid = jnp.concatenate([valid, gt_valid], axis=1)
    keys = like_batch(jax.random.split(key, gt.shape[0]), gt)
    fn = jax.vmap(functools.partial(_sample_one, config))
    return fn(candidates, cand_valid, gt, gt_valid, keys)


def _gather(x: Array, index: Array) -> Array:
    """``x[n, index[n, r]]`` for ``x`` ``[N, M, ...]`` and ``index`` ``[N, R]``."""
    return jax.vmap(lambda a, i: a[i])(x, index)


def box_losses(
    config: Config,
    logits: Array,
    deltas: Array,
    rois: Array,
    matched: Array,
    positive: Array,
    taken: Array,
    batch: Batch,
) -> tuple[Array, Array]:
    """Cross-entropy over the sampled RoIs and smooth L1 of the true class's deltas on
    the positive ones, both divided by the number of sampled RoIs."""
    labels = jnp.where(positive, _gather(batch["classes"], matched), 0)
    count = jnp.maximum(taken.sum(), 1)
    cls = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    target = bx.encode(_gather(batch["boxes"], matched), rois, bx.HEAD_WEIGHTS)
    k = jnp.maximum(labels - 1, 0)[..., None, None]
    own = jnp.take_along_axis(deltas, k, axis=2)[:, :, 0]
    reg = bx.smooth_l1(own - target, 1.0).sum(-1)
    return jnp.sum(cls * taken) / count, jnp.sum(reg * positive) / count


def mask_targets(model: MaskRCNN, rois: Array, matched: Array, batch: Batch) -> Array:
    """``[N, R, 28, 28]`` targets: each RoI's ground-truth mask RoI-Aligned to 28 x 28
    (as detectron2 does), thresholded at 0.5."""
    n, r = rois.shape[:2]
    size = model.config.image_size
    masks = _gather(batch["masks"], matched).astype(jnp.float32)  # [N, R, S, S]
    with jax.named_scope("target_pool"):
        crops = model.pooling.crop(
            reshape(masks, (n * r, size, size, 1)),
            reshape(rois, (n * r, 1, 4)),
            model.config.mask_size,
        )
    return (reshape(crops, (n, r, model.config.mask_size, model.config.mask_size)) >= 0.5).astype(
        jnp.float32
    )


def mask_loss(
    model: MaskRCNN, maps: list[Array], rois: Array, matched: Array, positive: Array, batch: Batch
) -> Array:
    """Per-pixel binary cross-entropy of the true class's mask on the positive RoIs."""
    k = model.config.mask_rois  # the first slots: positives come first
    rois, matched, positive = rois[:, :k], matched[:, :k], positive[:, :k]
    logits = model.masks(maps, rois)  # [N, k, 28, 28, K]
    labels = _gather(batch["classes"], matched)
    own = jnp.take_along_axis(logits, jnp.maximum(labels - 1, 0)[:, :, None, None, None], axis=4)
    target = mask_targets(model, jax.lax.stop_gradient(rois), matched, batch)
    per_roi = optax.sigmoid_binary_cross_entropy(own[..., 0], target).mean(axis=(2, 3))
    return jnp.sum(per_roi * positive) / jnp.maximum(positive.sum(), 1)


def detector_loss(
    model: MaskRCNN, batch: Batch, key: Array, *, stop_gradient: bool = True
) -> tuple[Array, dict[str, Any]]:
    """The sum of the five losses, and each of them.

    ``batch``: ``images`` ``[N, S, S, 3]``, ``boxes`` ``[N, M, 4]``, ``classes``
    ``[N, M]`` (0: padding), ``masks`` ``[N, M, S, S]``.
    """
    config = model.config
    rpn_key, roi_key = jax.random.split(key)
    maps = model.features(batch["images"])
    logits, deltas = model.rpn(maps)
    gt_valid = batch["classes"] > 0
    rpn_cls, rpn_box = rpn_loss(config, logits, deltas, batch["boxes"], gt_valid, rpn_key)
    proposals, valid = propose(config, logits, deltas)
    if stop_gradient:
        proposals = jax.lax.stop_gradient(proposals)
    rois, matched, positive, taken = sample_rois(config, proposals, valid, batch, roi_key)
    cls_logits, box_deltas = model.boxes(maps, rois)
    targets_at = jax.lax.stop_gradient(rois)
    cls, box = box_losses(
        config, cls_logits, box_deltas, targets_at, matched, positive, taken, batch
    )
    mask = mask_loss(model, maps, rois, matched, positive, batch)
    parts = {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "cls": cls, "box": box, "mask": mask}
    return sum(parts.values()), parts
