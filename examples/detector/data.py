"""Synthetic scenes: discs, squares and triangles on a textured background, with masks.

In the style of the demo's ``synthetic_scene`` (``python -m jax_roialign``), but
random and labelled: every image holds 2 to 4 objects of three classes, each of
a random size (14 to 60 pixels across), position, orientation and colour, none
overlapping another. Everything comes from one seed, so a training stream and a
held-out set are reproducible and disjoint (different seeds).
"""

from __future__ import annotations

import dataclasses

import numpy as np

CLASSES = ("disc", "square", "triangle")  # labels 1, 2, 3; 0 is the background


@dataclasses.dataclass(frozen=True)
class Scenes:
    """A batch of scenes, padded to ``max_objects`` objects per image.

    Attributes:
      images: ``[N, S, S, 3]`` float32, roughly in ``[-0.3, 1.1]``.
      boxes: ``[N, M, 4]`` float32 ``(x1, y1, x2, y2)`` in pixels, the tight box of
        each mask; zeros where padded.
      classes: ``[N, M]`` int32 in ``1..3``; 0 where padded.
      masks: ``[N, M, S, S]`` uint8 (0 or 1); zeros where padded.
    """

    images: np.ndarray
    boxes: np.ndarray
    classes: np.ndarray
    masks: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name, as the train step takes them."""
        return dataclasses.asdict(self)


def _shape_mask(
    kind: int, cx: float, cy: float, radius: float, angle: float, xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Pixels (centres at +0.5) inside a disc, square or triangle of circumradius ``radius``."""
    dx, dy = xx - cx, yy - cy
    if kind == 1:  # disc
        return dx**2 + dy**2 <= radius**2
    sides = 4 if kind == 2 else 3
    apothem = radius * np.cos(np.pi / sides)
    inside = np.ones(xx.shape, bool)
    for i in range(sides):
        normal = angle + 2.0 * np.pi * i / sides
        inside &= dx * np.cos(normal) + dy * np.sin(normal) <= apothem
    return inside


def _background(rng: np.random.Generator, size: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Sinusoidal texture and noise, per channel: ``[S, S, 3]``."""
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(0.1, 0.5, 2)
        phase = rng.uniform(0.0, 2.0 * np.pi)
        wave = 0.15 * np.sin(xx * fx + phase) * np.cos(yy * fy)
        channels.append(wave + 0.05 * rng.standard_normal((size, size)))
    return np.stack(channels, axis=-1)


def _scene(
    rng: np.random.Generator, size: int, max_objects: int
) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image and its objects ``(class, mask)``; objects never overlap (2-pixel gap)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    image = _background(rng, size, yy, xx)
    taken = np.zeros((size, size), bool)
    objects: list[tuple[int, np.ndarray]] = []
    wanted = int(rng.integers(2, max_objects + 1))
    for _ in range(20 * wanted):
        if len(objects) == wanted:
            break
        kind = int(rng.integers(1, len(CLASSES) + 1))
        radius = float(np.exp(rng.uniform(np.log(7.0), np.log(30.0))))
        cx, cy = rng.uniform(radius, size - radius, 2)
        mask = _shape_mask(kind, cx, cy, radius, rng.uniform(0, 2 * np.pi), xx, yy)
        grown = np.zeros_like(mask)
        grown[2:, :] |= mask[:-2, :]
        grown[:-2, :] |= mask[2:, :]
        grown[:, 2:] |= mask[:, :-2]
        grown[:, :-2] |= mask[:, 2:]
        if mask.sum() < 16 or (taken & (grown | mask)).any():
            continue
        taken |= mask
        colour = rng.uniform(0.3, 1.0, 3)
        shade = colour + 0.05 * rng.standard_normal((size, size, 3))
        image = np.where(mask[..., None], shade, image)
        objects.append((kind, mask))
    return image.astype(np.float32), objects


def _tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def make_scenes(num: int, *, size: int = 128, max_objects: int = 4, seed: int = 0) -> Scenes:
    """``num`` scenes of ``size x size`` pixels from ``seed``.

    Examples:
      >>> s = make_scenes(2, size=64, seed=1)
      >>> s.images.shape, s.boxes.shape, s.classes.shape, s.masks.shape
      ((2, 64, 64, 3), (2, 4, 4), (2, 4), (2, 4, 64, 64))
    """
    rng = np.random.default_rng(seed)
    images = np.zeros((num, size, size, 3), np.float32)
    boxes = np.zeros((num, max_objects, 4), np.float32)
    classes = np.zeros((num, max_objects), np.int32)
    masks = np.zeros((num, max_objects, size, size), np.uint8)
    for n in range(num):
        images[n], objects = _scene(rng, size, max_objects)
        for m, (kind, mask) in enumerate(objects):
            boxes[n, m] = _tight_box(mask)
            classes[n, m] = kind
            masks[n, m] = mask
    return Scenes(images, boxes, classes, masks)


def stream(batch: int, *, size: int = 128, max_objects: int = 4, seed: int = 0):
    """An endless stream of batches; batch ``i`` comes from seed ``(seed, i)``."""
    step = 0
    while True:
        rng_seed = int(np.random.SeedSequence([seed, step]).generate_state(1)[0])
        yield make_scenes(batch, size=size, max_objects=max_objects, seed=rng_seed)
        step += 1
