"""``python -m jax_roialign``: RoI Align on a synthetic scene, jitted, with a box gradient.

Builds an image with a few objects on a textured background, a stride-4 feature
map from it, boxes around the objects (one of them off-centre), pools them with
``roi_align`` under ``jax.jit``, then follows the gradient of the pooled
"objectness" with respect to the off-centre box and shows that it moves onto
its object. Prints what it did and the torchvision call that gives the same
numbers.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_roialign as jr

STRIDE = 4
SHADES = " .:-=+*#%@"


def synthetic_scene(h: int = 128, w: int = 160, seed: int = 0):
    """An image with a disc, a square and a triangle on a textured background."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    image = 0.15 * np.sin(xx / 3.0) * np.cos(yy / 5.0) + 0.05 * rng.standard_normal((h, w))
    mask = np.zeros((h, w), bool)
    objects = []
    # disc
    cy, cx, r = 40.0, 45.0, 18.0
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    objects.append(("disc", (cx - r, cy - r, cx + r, cy + r)))
    # square
    sq = (np.abs(yy - 90) <= 16) & (np.abs(xx - 110) <= 16)
    objects.append(("square", (94.0, 74.0, 126.0, 106.0)))
    # triangle
    tri = (yy >= 20) & (yy <= 60) & (np.abs(xx - 125) <= (yy - 20) * 0.5)
    objects.append(("triangle", (105.0, 20.0, 145.0, 60.0)))
    for m in (disc, sq, tri):
        mask |= m
    image = image + mask * 1.0
    return image.astype(np.float32), mask, objects


def feature_map(image: np.ndarray) -> jnp.ndarray:
    """A stride-4 map with 4 channels: mean intensity, |d/dx|, |d/dy|, local contrast."""
    x = jnp.asarray(image)
    h, w = x.shape
    pooled = x.reshape(h // STRIDE, STRIDE, w // STRIDE, STRIDE).mean(axis=(1, 3))
    dx = jnp.abs(jnp.diff(pooled, axis=1, append=pooled[:, -1:]))
    dy = jnp.abs(jnp.diff(pooled, axis=0, append=pooled[-1:, :]))
    contrast = x.reshape(h // STRIDE, STRIDE, w // STRIDE, STRIDE).std(axis=(1, 3))
    return jnp.stack([pooled, dx, dy, contrast], axis=-1)[None]  # [1, H/4, W/4, 4]


def ascii_crop(values: np.ndarray) -> list[str]:
    lo, hi = float(values.min()), float(values.max())
    scaled = (values - lo) / max(hi - lo, 1e-6)
    idx = np.clip((scaled * (len(SHADES) - 1)).round().astype(int), 0, len(SHADES) - 1)
    return ["".join(SHADES[i] * 2 for i in row) for row in idx]


def main() -> None:
    image, _, objects = synthetic_scene()
    features = feature_map(image)
    n, fh, fw, c = features.shape
    print(f"jax_roialign {jr.__version__} on {jax.devices()[0].platform}")
    print(f"image {image.shape}, feature map {tuple(features.shape)} (NHWC, stride {STRIDE})")

    boxes = np.array([b for _, b in objects], np.float32)
    boxes = np.concatenate([np.zeros((len(boxes), 1), np.float32), boxes], axis=1)
    settings: dict[str, Any] = dict(
        output_size=7, spatial_scale=1.0 / STRIDE, sampling_ratio=2, aligned=True
    )
    pool = jax.jit(lambda f, b: jr.roi_align(f, b, **settings))

    t0 = time.perf_counter()
    out = pool(features, boxes).block_until_ready()
    t1 = time.perf_counter()
    pool(features, boxes).block_until_ready()
    t2 = time.perf_counter()
    print(f"\nroi_align {tuple(boxes.shape)} boxes -> {tuple(out.shape)}")
    first, second = 1e3 * (t1 - t0), 1e3 * (t2 - t1)
    print(f"  first call (trace + compile) {first:.0f} ms, next call {second:.2f} ms")
    for (name, box), crop in zip(objects, np.asarray(out), strict=True):
        print(f"\n  {name:8s} box {tuple(round(v, 1) for v in box)}: mean intensity per bin")
        for line in ascii_crop(crop[..., 0]):
            print("    " + line)

    # Gradient with respect to a box: slide an off-centre box onto the disc. The
    # objective is the integral of (intensity - 0.5) over the box, estimated as
    # the pooled mean times the box area: it grows while the box takes in object
    # pixels and shrinks when it takes in background.
    def objectness(box):
        pooled = jr.roi_align(features, box[None], **settings)
        area = (box[3] - box[1]) * (box[4] - box[2]) / STRIDE**2
        return (pooled[0, ..., 0].mean() - 0.5) * area

    step = jax.jit(jax.value_and_grad(objectness))
    box = jnp.array([0.0, 10.0, 8.0, 46.0, 44.0])  # the disc's size, shifted up-left
    print("\nGradient ascent of the pooled (intensity - 0.5) x area w.r.t. an off-centre box")
    print("  (the batch index column gets no gradient; x1, y1, x2, y2 do):")
    for it in range(61):
        value, grad = step(box)
        if it % 15 == 0:
            coords = ", ".join(f"{v:6.1f}" for v in np.asarray(box[1:]))
            g = ", ".join(f"{v:+.3f}" for v in np.asarray(grad[1:]))
            print(f"  step {it:2d}: box ({coords})  objective {float(value):7.2f}  grad ({g})")
        box = box.at[1:].add(grad[1:] / (jnp.abs(grad[1:]).max() + 1e-9))  # 1 px per step
    final = np.asarray(box[1:])
    print(
        f"  disc is at {objects[0][1]}; the box moved to ({', '.join(f'{v:.1f}' for v in final)})"
    )

    print("\nThe same numbers in torchvision (NCHW features, [K, 5] boxes):")
    print(
        "  torchvision.ops.roi_align(features.permute(0, 3, 1, 2), boxes, output_size=7,\n"
        "                            spatial_scale=0.25, sampling_ratio=2, aligned=True)"
    )
    print(
        "and in jax_roialign:\n"
        "  jax_roialign.roi_align(features, boxes, output_size=7, spatial_scale=0.25,\n"
        "                         sampling_ratio=2, aligned=True)"
    )


if __name__ == "__main__":
    main()
