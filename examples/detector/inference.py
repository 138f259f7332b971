"""Inference under ``jit``: proposals, box head, per-class NMS, then masks at the detections."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from . import boxes as bx
from .model import Config, MaskRCNN
from .rpn import propose

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Detections:
    """``detections`` per image, best first, padded (``valid`` marks the real ones).

    Attributes:
      boxes: ``[N, D, 4]`` in pixels.
      scores: ``[N, D]`` class probabilities.
      classes: ``[N, D]`` in ``1..K``.
      masks: ``[N, D, 28, 28]`` mask probabilities inside each box.
      valid: ``[N, D]``.
    """

    boxes: Array
    scores: Array
    classes: Array
    masks: Array
    valid: Array


def _select_one(config: Config, probs: Array, deltas: Array, rois: Array, valid: Array):
    k = config.num_classes
    boxes = bx.clip(bx.decode(deltas, rois[:, None, :], bx.HEAD_WEIGHTS), config.image_size)
    scores = jnp.where(valid[:, None], probs[:, 1:], 0.0)  # [P, K]
    classes = jnp.broadcast_to(jnp.arange(1, k + 1), scores.shape)
    boxes, scores, classes = boxes.reshape(-1, 4), scores.reshape(-1), classes.reshape(-1)
    top, order = bx.top_k(scores, min(scores.shape[0], 4 * config.detections))
    boxes, classes = boxes[order], classes[order]
    # Class-aware NMS: boxes of different classes are moved apart so they never overlap.
    shifted = boxes + (classes * 2 * config.image_size)[:, None].astype(boxes.dtype)
    keep = bx.nms(shifted, top > config.score_threshold, config.detection_nms)
    best, chosen = bx.top_k(jnp.where(keep, top, -1.0), config.detections)
    return boxes[chosen], best, classes[chosen], best > config.score_threshold


def detect(model: MaskRCNN, images: Array) -> Detections:
    """Detections with masks for ``[N, S, S, 3]`` images (pure; ``jax.jit`` it)."""
    config = model.config
    maps = model.features(images)
    logits, deltas = model.rpn(maps)
    rois, valid = propose(config, logits, deltas)
    cls_logits, box_deltas = model.boxes(maps, rois)
    probs = jax.nn.softmax(cls_logits, axis=-1)
    select = jax.vmap(functools.partial(_select_one, config))
    boxes, scores, classes, ok = select(probs, box_deltas, rois, valid)
    mask_logits = model.masks(maps, boxes)  # [N, D, 28, 28, K]
    own = jnp.take_along_axis(mask_logits, (classes - 1)[:, :, None, None, None], axis=4)
    return Detections(boxes, scores, classes, jax.nn.sigmoid(own[..., 0]), ok)
