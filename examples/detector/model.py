"""A small Mask R-CNN in Flax NNX: backbone, FPN (P2-P5), RPN, box head and mask head.

Pooling sits in two places, both :func:`jax_roialign.multiscale_roi_align` on
the same pyramid: the box head reads 7 x 7 per RoI, the mask head 14 x 14. A
third RoI Align (:func:`jax_roialign.roi_align`) cuts the mask targets out of
the ground-truth masks. The three calls go through a :class:`Pooling` object,
so that the benchmark can swap in other implementations with the same numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

import jax_roialign as jr

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes of the model and of its sampling; the defaults train on a CPU in minutes.

    ``canonical_scale`` is FPN's 224 scaled to the 128-pixel images: a box of
    64 pixels (square root of its area) is pooled from P4, one of 32 from P3,
    one of 16 or less from P2.
    """

    image_size: int = 128
    widths: tuple[int, ...] = (16, 32, 48, 64, 64)  # stem (stride 2), then C2..C5
    channels: int = 32  # FPN channels
    num_classes: int = 3  # foreground classes (disc, square, triangle)
    anchor_sizes: tuple[float, ...] = (16.0, 32.0, 64.0, 128.0)  # one per level, P2..P5
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    pre_nms: int = 256  # proposals per image before NMS (top-k of the objectness)
    post_nms: int = 64  # proposals per image after NMS (padded, with a valid mask)
    rpn_nms: float = 0.7
    rpn_batch: int = 256  # anchors per image in the RPN loss, half positive at most
    rois_per_image: int = 32  # RoIs per image for the box head, a quarter positive at most
    positive_fraction: float = 0.25
    box_pool: int = 7
    mask_pool: int = 14  # the mask head predicts 2 x mask_pool = 28 pixels a side
    sampling_ratio: int = 2  # as torchvision's Mask R-CNN (0: adaptive, as detectron2)
    canonical_scale: float = 64.0
    canonical_level: int = 4
    hidden: int = 256  # box head's fully connected layers
    detections: int = 16  # per image at inference (padded, with a valid mask)
    score_threshold: float = 0.05
    detection_nms: float = 0.5

    @property
    def strides(self) -> tuple[int, ...]:
        """Strides of the pyramid's levels: P2 (4) up, one level per width after the stem."""
        return tuple(2 ** (i + 2) for i in range(len(self.widths) - 1))

    @property
    def spatial_scales(self) -> tuple[float, ...]:
        return tuple(1.0 / s for s in self.strides)

    @property
    def mask_rois(self) -> int:
        """RoIs per image for the mask head: the positive slots of the box head's RoIs."""
        return int(self.rois_per_image * self.positive_fraction)

    @property
    def mask_size(self) -> int:
        return 2 * self.mask_pool


class Pooling(Protocol):
    """The pooling calls of the model (any implementation with the same numbers)."""

    def pyramid(self, maps: Sequence[Array], boxes: Array, output_size: int) -> Array:
        """``[N, R, P, P, C]`` from P2-P5 ``[N, H_l, W_l, C]`` at boxes ``[N, R, 4]``."""
        ...

    def crop(self, images: Array, boxes: Array, output_size: int) -> Array:
        """``[K, 1, P, P, C]`` from ``[K, S, S, C]`` images at one box each, ``[K, 1, 4]``."""
        ...


@dataclasses.dataclass(frozen=True)
class RoIAlignPooling:
    """jax_roialign's ops: ``multiscale_roi_align`` on the pyramid, ``roi_align`` for crops."""

    spatial_scales: tuple[float, ...]
    sampling_ratio: int = 2
    canonical_scale: float = 64.0
    canonical_level: int = 4

    def pyramid(self, maps: Sequence[Array], boxes: Array, output_size: int) -> Array:
        return jr.multiscale_roi_align(
            list(maps),
            boxes,
            output_size=output_size,
            spatial_scales=self.spatial_scales,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
            canonical_scale=self.canonical_scale,
            canonical_level=self.canonical_level,
        )

    def crop(self, images: Array, boxes: Array, output_size: int) -> Array:
        return jr.roi_align(
            images,
            boxes,
            output_size=output_size,
            spatial_scale=1.0,
            sampling_ratio=self.sampling_ratio,
            aligned=True,
        )


def default_pooling(config: Config) -> RoIAlignPooling:
    """The model's pooling: jax_roialign with the config's sampling and level mapping."""
    return RoIAlignPooling(
        spatial_scales=config.spatial_scales,
        sampling_ratio=config.sampling_ratio,
        canonical_scale=config.canonical_scale,
        canonical_level=config.canonical_level,
    )


def batch_axis(x: Array) -> str | tuple[str, ...] | None:
    """The mesh axes that shard axis 0 of ``x`` according to its type (explicit
    sharding), or ``None``."""
    spec = jax.typeof(x).sharding.spec
    return spec[0] if len(spec) else None


def reshape(x: Array, shape: tuple[int, ...]) -> Array:
    """``x.reshape(shape)``, keeping axis 0's sharding.

    Under explicit sharding (``AxisType.Explicit`` mesh axes) a reshape that
    merges or splits axes must be told its output's sharding; the batch axis
    stays where it is (or leads the merged axis). Elsewhere a plain reshape.
    """
    lead = batch_axis(x)
    return jnp.reshape(x, shape, out_sharding=P(lead) if lead is not None else None)


def like_batch(x: Array, ref: Array) -> Array:
    """``x`` with axis 0 sharded as ``ref``'s (e.g. per-image random keys made from one
    replicated key, before a ``vmap`` over the images); ``x`` itself elsewhere."""
    lead = batch_axis(ref)
    return x if lead is None else jax.sharding.reshard(x, P(lead))


def _conv(cin: int, cout: int, kernel: int, rngs: nnx.Rngs, stride: int = 1) -> nnx.Conv:
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, rngs=rngs)


class Backbone(nnx.Module):
    """Stride-2 stages of two 3 x 3 convolutions; returns all but the stem's (C2-C5 for
    five stages: strides 4 to 32)."""

    def __init__(self, widths: Sequence[int], *, rngs: nnx.Rngs):
        ins = (3, *widths[:-1])
        self.down = nnx.List(
            [_conv(i, o, 3, rngs, stride=2) for i, o in zip(ins, widths, strict=True)]
        )
        self.same = nnx.List([_conv(o, o, 3, rngs) for o in widths])

    def __call__(self, images: Array) -> list[Array]:
        x, outs = images, []
        for down, same in zip(self.down, self.same, strict=True):
            x = jax.nn.relu(same(jax.nn.relu(down(x))))
            outs.append(x)
        return outs[1:]


def _upsample(x: Array) -> Array:
    """Nearest-neighbour upsampling by 2 of ``[N, H, W, C]``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nnx.Module):
    """Feature pyramid: lateral 1 x 1, top-down sum, 3 x 3 output convolutions."""

    def __init__(self, widths: Sequence[int], channels: int, *, rngs: nnx.Rngs):
        self.lateral = nnx.List([_conv(w, channels, 1, rngs) for w in widths])
        self.output = nnx.List([_conv(channels, channels, 3, rngs) for _ in widths])

    def __call__(self, feats: Sequence[Array]) -> list[Array]:
        top = self.lateral[-1](feats[-1])
        merged = [top]
        for lateral, x in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            top = lateral(x) + _upsample(top)
            merged.append(top)
        merged.reverse()
        return [conv(m) for conv, m in zip(self.output, merged, strict=True)]


class RPNHead(nnx.Module):
    """Shared over the levels: a 3 x 3 convolution, then objectness and box deltas per anchor."""

    def __init__(self, channels: int, anchors_per_cell: int, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs)
        init = nnx.initializers.normal(0.01)
        self.objectness = nnx.Conv(channels, anchors_per_cell, (1, 1), kernel_init=init, rngs=rngs)
        self.deltas = nnx.Conv(channels, 4 * anchors_per_cell, (1, 1), kernel_init=init, rngs=rngs)

    def __call__(self, maps: Sequence[Array]) -> tuple[Array, Array]:
        """Objectness logits ``[N, A]`` and deltas ``[N, A, 4]``, A over all levels."""
        logits, deltas = [], []
        for x in maps:
            h = jax.nn.relu(self.conv(x))
            logits.append(reshape(self.objectness(h), (x.shape[0], -1)))
            deltas.append(reshape(self.deltas(h), (x.shape[0], -1, 4)))
        return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)


class BoxHead(nnx.Module):
    """Two fully connected layers on the 7 x 7 RoI features; class logits and per-class deltas."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        k = config.num_classes
        flat = config.box_pool**2 * config.channels
        self.fc1 = nnx.Linear(flat, config.hidden, rngs=rngs)
        self.fc2 = nnx.Linear(config.hidden, config.hidden, rngs=rngs)
        self.cls = nnx.Linear(
            config.hidden, k + 1, kernel_init=nnx.initializers.normal(0.01), rngs=rngs
        )
        self.box = nnx.Linear(
            config.hidden, 4 * k, kernel_init=nnx.initializers.normal(0.001), rngs=rngs
        )

    def __call__(self, pooled: Array) -> tuple[Array, Array]:
        """``[N, R, P, P, C]`` -> logits ``[N, R, K + 1]``, deltas ``[N, R, K, 4]``."""
        x = reshape(pooled, pooled.shape[:2] + (-1,))
        x = jax.nn.relu(self.fc2(jax.nn.relu(self.fc1(x))))
        return self.cls(x), reshape(self.box(x), x.shape[:2] + (-1, 4))


def _depth_to_space(x: Array) -> Array:
    """``[B, H, W, 4 C]`` -> ``[B, 2 H, 2 W, C]``: channel block ``(i, j)`` goes to pixel
    ``(2 h + i, 2 w + j)``."""
    b, h, w, c4 = x.shape
    x = reshape(x, (b, h, w, 2, 2, c4 // 4)).transpose(0, 1, 3, 2, 4, 5)
    return reshape(x, (b, 2 * h, 2 * w, c4 // 4))


class MaskHead(nnx.Module):
    """Two 3 x 3 convolutions on the 14 x 14 RoI features, a 2 x 2 stride-2 transposed
    convolution, and one mask logit map per class: ``[N, R, 28, 28, K]``.

    The transposed convolution is written as what it is when the kernel equals the
    stride, a linear map of each cell to its 2 x 2 block (``nnx.ConvTranspose``'s
    kernel gradient is a dilated 14 x 14 convolution that XLA:CPU runs slowly).
    """

    def __init__(self, config: Config, *, rngs: nnx.Rngs):
        c = config.channels
        self.convs = nnx.List([_conv(c, c, 3, rngs) for _ in range(2)])
        self.up = nnx.Linear(c, 4 * c, rngs=rngs)  # a 2 x 2, stride-2 transposed convolution
        self.logits = nnx.Conv(c, config.num_classes, (1, 1), rngs=rngs)

    def __call__(self, pooled: Array) -> Array:
        n, r = pooled.shape[:2]
        x = reshape(pooled, (n * r,) + pooled.shape[2:])
        for conv in self.convs:
            x = jax.nn.relu(conv(x))
        x = self.logits(jax.nn.relu(_depth_to_space(self.up(x))))
        return reshape(x, (n, r) + x.shape[1:])


class MaskRCNN(nnx.Module):
    """The model's parts; training (:mod:`.losses`) and inference (:mod:`.inference`)
    call them in order."""

    def __init__(self, config: Config, *, rngs: nnx.Rngs, pooling: Pooling | None = None):
        self.config = config
        self.pooling = pooling if pooling is not None else default_pooling(config)
        self.backbone = Backbone(config.widths, rngs=rngs)
        self.fpn = FPN(config.widths[1:], config.channels, rngs=rngs)
        self.rpn_head = RPNHead(config.channels, len(config.aspect_ratios), rngs=rngs)
        self.box_head = BoxHead(config, rngs=rngs)
        self.mask_head = MaskHead(config, rngs=rngs)

    def features(self, images: Array) -> list[Array]:
        """P2-P5, ``[N, S / 4, S / 4, C]`` to ``[N, S / 32, S / 32, C]``."""
        return self.fpn(self.backbone(images))

    def rpn(self, maps: Sequence[Array]) -> tuple[Array, Array]:
        return self.rpn_head(maps)

    def boxes(self, maps: Sequence[Array], rois: Array) -> tuple[Array, Array]:
        """Box head at ``rois`` ``[N, R, 4]``: class logits and per-class deltas."""
        with jax.named_scope("box_pool"):
            pooled = self.pooling.pyramid(maps, rois, self.config.box_pool)
        return self.box_head(pooled)

    def masks(self, maps: Sequence[Array], rois: Array) -> Array:
        """Mask head at ``rois`` ``[N, R, 4]``: ``[N, R, 28, 28, K]`` logits."""
        with jax.named_scope("mask_pool"):
            pooled = self.pooling.pyramid(maps, rois, self.config.mask_pool)
        return self.mask_head(pooled)
