"""The benchmark workloads: the shapes real detection models run (shared/workloads.md).

Mask R-CNN / Faster R-CNN with FPN on an 800 x 1344 input, C = 256, 2 images per
device: P2 200x336 (stride 4), P3 100x168 (8), P4 50x84 (16), P5 25x42 (32).
Training runs 512 sampled RoIs per image through the box head (7x7) and up to
128 foreground RoIs per image through the mask head (14x14).

Boxes are realistic for their level: FPN assigns a box to level
``k = floor(4 + log2(sqrt(area) / 224))``, so on its level a box spans about
14-28 feature cells (``sqrt(area)`` uniform in that range, in cells), with an
aspect ratio log-uniform in [0.5, 2], placed uniformly inside the image, from a
fixed seed. Boxes are split evenly between the images (``rois_per_image`` each).

Besides FPN: detectron2's R50-C4 head pools 14 x 14 from res4 (stride 16,
C = 1024) with ``ROIAlignV2`` (adaptive sampling, aligned), every box on that
one map, so boxes span 2-50 cells (32-800 pixels).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

IMAGE_SIZE = (800, 1344)  # (height, width) of the input image
IMAGES = 2  # images per device
CHANNELS = 256

# FPN levels of an 800 x 1344 input: name -> (H, W, stride)
LEVELS = {
    "P2": (200, 336, 4),
    "P3": (100, 168, 8),
    "P4": (50, 84, 16),
    "P5": (25, 42, 32),
    "res4": (50, 84, 16),  # ResNet C4 (detectron2 R50-C4), no FPN
}


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark case.

    Attributes:
      name: short key used on the command line (``--workloads``).
      title: one-line description for the tables.
      levels: the FPN level names read (one for a single-level ``roi_align``,
        four for the multi-level FPN step).
      rois_per_image: boxes per image; ``K = images * rois_per_image``.
      output_size: pooled size (square).
      sampling_ratio: samples per bin per axis; 0 for adaptive.
      aligned: the half-pixel offset (detectron2 ``ROIAlignV2``) or not (torchvision).
      channels: feature channels C.
      images: batch size N.
      cells: range of ``sqrt(area)`` of the boxes, in cells of their level.
    """

    name: str
    title: str
    levels: tuple[str, ...]
    rois_per_image: int
    output_size: int
    sampling_ratio: int
    aligned: bool
    channels: int = CHANNELS
    images: int = IMAGES
    cells: tuple[float, float] = (14.0, 28.0)
    clip: bool = True
    log_uniform: bool = False

    @property
    def multiscale(self) -> bool:
        return len(self.levels) > 1

    @property
    def num_boxes(self) -> int:
        return self.images * self.rois_per_image

    def feature_shapes(self) -> list[tuple[int, int, int, int]]:
        """NHWC shape of each level's feature map."""
        return [(self.images, LEVELS[n][0], LEVELS[n][1], self.channels) for n in self.levels]

    def spatial_scales(self) -> tuple[float, ...]:
        return tuple(1.0 / LEVELS[n][2] for n in self.levels)

    def output_shape(self) -> tuple[int, int, int, int]:
        """NHWC output ``[K, P, P, C]``."""
        p = self.output_size
        return (self.num_boxes, p, p, self.channels)

    def shape_text(self) -> str:
        maps = ", ".join(f"{n} {LEVELS[n][0]}x{LEVELS[n][1]}" for n in self.levels)
        sr = "adaptive" if self.sampling_ratio <= 0 else str(self.sampling_ratio)
        return (
            f"N={self.images}, {maps}, C={self.channels}, K={self.num_boxes} "
            f"({self.rois_per_image}/image), {self.output_size}x{self.output_size}, "
            f"sampling {sr}, aligned={self.aligned}, "
            f"boxes {self.cells[0]:g}-{self.cells[1]:g} cells"
        )


def workloads(quick: bool = False) -> dict[str, Workload]:
    """The workloads, by name; ``quick`` shrinks boxes and channels (same maps)."""
    c = 32 if quick else CHANNELS
    box_rois = 64 if quick else 512
    mask_rois = 16 if quick else 128
    cases = [
        Workload(
            "box_p2",
            "box head on P2 (torchvision MultiScaleRoIAlign settings)",
            ("P2",),
            box_rois,
            7,
            sampling_ratio=2,
            aligned=False,
            channels=c,
        ),
        Workload(
            "box_p4_adaptive",
            "box head on P4, adaptive sampling (detectron2 ROIAlignV2)",
            ("P4",),
            box_rois,
            7,
            sampling_ratio=0,
            aligned=True,
            channels=c,
        ),
        Workload(
            "mask_p3",
            "mask head on P3, 14x14",
            ("P3",),
            mask_rois,
            14,
            sampling_ratio=2,
            aligned=False,
            channels=c,
        ),
        fpn := Workload(
            "fpn_step",
            "whole FPN box-head step P2-P5 (MultiScaleRoIAlign)",
            ("P2", "P3", "P4", "P5"),
            box_rois,
            7,
            sampling_ratio=2,
            aligned=False,
            channels=c,
        ),
        dataclasses.replace(
            fpn,
            name="fpn_step_adaptive",
            title="whole FPN box-head step P2-P5, adaptive (MultiScaleRoIAlign(sampling_ratio=0))",
            sampling_ratio=0,
        ),
        r50 := Workload(
            "r50_c4",
            "detectron2 R50-C4 head on res4, 14x14, ROIAlignV2 (adaptive)",
            ("res4",),
            box_rois,
            14,
            sampling_ratio=0,
            aligned=True,
            channels=4 * c,
            cells=(2.0, 50.0),
        ),
        dataclasses.replace(
            r50,
            name="r50_c4_unclipped",
            title="the R50-C4 head's boxes not clipped to the image (past it on any side)",
            clip=False,
        ),
        dataclasses.replace(
            r50,
            name="proposals_c4",
            title="R50-C4 head on proposals: sides log-uniform from 2 cells to the map, clipped",
            cells=(2.0, 84.0),
            log_uniform=True,
        ),
    ]
    return {w.name: w for w in cases}


@dataclasses.dataclass
class Inputs:
    """Host (numpy) inputs of one workload, float32.

    Attributes:
      features: one ``[N, H, W, C]`` array per level.
      boxes: ``[N, R, 4]`` image coordinates ``(x1, y1, x2, y2)``.
      rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, image-major.
      cotangent: ``[K, P, P, C]``, the output cotangent for forward+backward.
    """

    features: list[np.ndarray]
    boxes: np.ndarray
    rois: np.ndarray
    cotangent: np.ndarray


def level_boxes(
    rng: np.random.Generator,
    count: int,
    stride: int | np.ndarray,
    image_size: tuple[int, int] = IMAGE_SIZE,
    cells: tuple[float, float] = (14.0, 28.0),
    *,
    clip: bool = True,
    log_uniform: bool = False,
) -> np.ndarray:
    """``[count, 4]`` boxes spanning ``cells`` feature cells (sqrt of area) at ``stride``.

    ``clip``: sides clipped to the image and boxes placed inside it; else the same
    draws unclipped, a box longer than the image covering it with its ends past
    both sides. ``log_uniform``: sides log-uniform in ``cells`` (proposals) rather
    than uniform."""
    img_h, img_w = image_size
    if log_uniform:
        side = np.exp(rng.uniform(math.log(cells[0]), math.log(cells[1]), count)) * stride
    else:
        side = rng.uniform(cells[0], cells[1], count) * stride
    ratio = np.exp(rng.uniform(math.log(0.5), math.log(2.0), count))  # h / w
    w, h = side / np.sqrt(ratio), side * np.sqrt(ratio)
    if clip:
        w, h = np.minimum(w, img_w - 1.0), np.minimum(h, img_h - 1.0)
    x1 = rng.uniform(np.minimum(0.0, img_w - w), np.maximum(0.0, img_w - w))
    y1 = rng.uniform(np.minimum(0.0, img_h - h), np.maximum(0.0, img_h - h))
    return np.stack([x1, y1, x1 + w, y1 + h], axis=-1).astype(np.float32)


def make_boxes(wl: Workload, seed: int = 0) -> np.ndarray:
    """``[N, R, 4]`` boxes for the workload (single level: on that level; FPN:
    each box on a level drawn uniformly from P2..P5)."""
    rng = np.random.default_rng(seed)
    k = wl.num_boxes
    strides = np.array([LEVELS[n][2] for n in wl.levels], np.float64)
    stride = strides[rng.integers(0, len(strides), k)] if wl.multiscale else strides[0]
    boxes = level_boxes(rng, k, stride, cells=wl.cells, clip=wl.clip, log_uniform=wl.log_uniform)
    return boxes.reshape(wl.images, wl.rois_per_image, 4)


def rois_from_boxes(boxes: np.ndarray) -> np.ndarray:
    """``[N, R, 4]`` -> ``[N * R, 5]`` torchvision rows ``(batch_index, x1, y1, x2, y2)``."""
    n, r, _ = boxes.shape
    index = np.repeat(np.arange(n, dtype=np.float32), r)[:, None]
    return np.concatenate([index, boxes.reshape(n * r, 4)], axis=1)


def make_inputs(wl: Workload, seed: int = 0) -> Inputs:
    """Features (standard normal), boxes and a cotangent, all from ``seed``."""
    rng = np.random.default_rng(seed + 1)
    features = [rng.standard_normal(s, dtype=np.float32) for s in wl.feature_shapes()]
    boxes = make_boxes(wl, seed)
    cotangent = rng.standard_normal(wl.output_shape(), dtype=np.float32)
    return Inputs(features, boxes, rois_from_boxes(boxes), cotangent)
