"""Writes tests/golden/tf_crop.npz from TensorFlow's ``crop_and_resize`` and a
TensorFlow-ops reproduction of TF Model Garden's ``multilevel_crop_and_resize``.

Rerun (from the repository root, in an environment with TensorFlow; the package
itself is not needed)::

    python tools/make_golden_tf.py

Deterministic (fixed seed, CPU, float32). The file holds:

* ``image_f32`` ``[2, 6, 9, 3]`` (values on a 2**-10 grid), ``image_u8``
  ``[2, 6, 9, 3]`` uint8, ``image_row`` ``[1, 1, 5, 2]`` (H = 1); ``crop_boxes``
  ``[K, 4]`` normalised ``(y1, x1, y2, x2)``: the whole image, flipped, degenerate,
  outside ``[0, 1]`` and random ones (float32); ``crop_indices`` ``[K]``;
* per crop configuration ``c{i}`` (image, crop size, method, extrapolation
  value): ``output`` from ``tf.image.crop_and_resize``; ``grad_output`` (small
  integers) and the kernels' gradients ``grad_image``
  (``CropAndResizeGradImage``, float images) and ``grad_boxes``
  (``CropAndResizeGradBoxes``, bilinear);
* per Model Garden configuration ``m{i}``: the pyramid ``m{i}_l{level}``
  ``[B, H_l, W_l, C]``, ``boxes`` ``[B, N, 4]`` in pixels, ``levels`` (the level
  each box takes), ``output``, ``grad_output`` and the gradients
  ``grad_l{level}`` and ``grad_boxes`` (TensorFlow autodiff of the reproduction);
* ``configs``: JSON with the configurations and TensorFlow's version.

:func:`model_garden_tf` is written from the published formula of
``official/vision/ops/spatial_transform_ops.py`` (its gather path: every level
flattened into one table, a ``2P x 2P`` corner grid gathered, weighted by the
bilinear kernel times 4 and average-pooled 2 x 2), in TensorFlow ops, float32.
tests/test_crop.py imports it for the live comparison when TensorFlow is installed.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden" / "tf_crop.npz"

CROP_CONFIGS = [
    {"image": "f32", "crop": [1, 1], "method": "bilinear", "extrapolation": 0.0},
    {"image": "f32", "crop": [1, 4], "method": "nearest", "extrapolation": -2.5},
    {"image": "f32", "crop": [3, 1], "method": "bilinear", "extrapolation": -2.5},
    {"image": "f32", "crop": [2, 2], "method": "nearest", "extrapolation": 0.0},
    {"image": "f32", "crop": [5, 7], "method": "bilinear", "extrapolation": 0.0},
    {"image": "f32", "crop": [5, 7], "method": "nearest", "extrapolation": 1.25},
    {"image": "f32", "crop": [8, 3], "method": "bilinear", "extrapolation": 1.25},
    {"image": "f32", "crop": [2, 6], "method": "bilinear", "extrapolation": 0.0},
    {"image": "f32", "crop": [13, 11], "method": "nearest", "extrapolation": 0.0},
    {"image": "u8", "crop": [5, 7], "method": "bilinear", "extrapolation": 0.0},
    {"image": "u8", "crop": [3, 1], "method": "nearest", "extrapolation": -1.0},
    {"image": "u8", "crop": [1, 1], "method": "bilinear", "extrapolation": 7.0},
    {"image": "row", "crop": [3, 4], "method": "bilinear", "extrapolation": -1.0},
    {"image": "row", "crop": [1, 2], "method": "nearest", "extrapolation": 0.0},
]

MG_CONFIGS = [
    # Levels 2-5 of a 128 x 192 image.
    {"levels": [2, 3, 4, 5], "sizes": [[32, 48], [16, 24], [8, 12], [4, 6]], "image": [128, 192],
     "output_size": 7, "sample_offset": 0.5},
    {"levels": [2, 3, 4, 5], "sizes": [[32, 48], [16, 24], [8, 12], [4, 6]], "image": [128, 192],
     "output_size": 4, "sample_offset": 0.25},
    # Odd sizes (stride-2 convolutions round up): the boundary H_min / 2**l - 1
    # is fractional and below the level's own last row.
    {"levels": [3, 4, 5], "sizes": [[25, 19], [13, 10], [7, 5]], "image": [200, 152],
     "output_size": 5, "sample_offset": 0.5},
    # One level: every box on it.
    {"levels": [4], "sizes": [[9, 7]], "image": [144, 112], "output_size": 3,
     "sample_offset": 0.5},
]  # fmt: skip


def crop_boxes(rng: np.random.Generator) -> np.ndarray:
    special = [
        [0.0, 0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0, 0.0],  # flipped: samples exactly on H - 1 and 0
        [0.5, 0.5, 0.5, 0.5],  # a point
        [0.25, 0.1, 0.75, 0.9],
        [0.9, 0.2, 0.1, 0.8],  # flipped in y only
        [-0.5, -0.5, 1.5, 1.5],  # around the image
        [-1.0, 0.0, -0.1, 1.0],  # above it
        [1.0, 1.0, 2.0, 2.0],  # touching the far corner
        [0.0, 1.0 / 3.0, 1.0, 2.0 / 3.0],
        [0.2, 0.0, 0.2, 1.0],  # zero height
    ]
    rand = rng.uniform(-0.4, 1.4, (22, 4))
    inside = rng.uniform(0.0, 1.0, (16, 4))
    return np.concatenate([special, rand, inside]).astype(np.float32)


def model_garden_tf(features: dict, boxes, output_size: int, sample_offset: float):
    """TF Model Garden's ``multilevel_crop_and_resize`` from its published formula."""
    import tensorflow as tf

    levels = sorted(int(k) for k in features)
    lo, hi = levels[0], levels[-1]
    maps = [features[str(level)] for level in range(lo, hi + 1)]
    batch, h_min, w_min, channels = maps[0].shape
    heights = [m.shape[1] for m in maps]
    widths = [m.shape[2] for m in maps]
    sizes = [h * w for h, w in zip(heights, widths, strict=True)]
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    per_image = int(sum(sizes))
    table = tf.reshape(tf.concat([tf.reshape(m, [batch, -1, channels]) for m in maps], 1),
                       [-1, channels])  # fmt: skip
    num = boxes.shape[1]

    height = boxes[:, :, 2] - boxes[:, :, 0]
    width = boxes[:, :, 3] - boxes[:, :, 1]
    root = tf.sqrt(tf.cast(height, tf.float32) * tf.cast(width, tf.float32))
    raw = tf.math.floordiv(tf.math.log(tf.math.divide_no_nan(root, 224.0)), tf.math.log(2.0))
    level = tf.cast(raw + 4.0, tf.int32)
    level = tf.minimum(hi, tf.maximum(level, lo))
    scale = tf.cast(tf.pow(2.0, tf.cast(level, tf.float32)), boxes.dtype)
    top = boxes[:, :, 0] / scale
    left = boxes[:, :, 1] / scale
    height = height / scale
    width = width / scale
    rel = level - lo
    stride = tf.pow(2.0, tf.cast(rel, tf.float32))
    bound_y = tf.cast(float(h_min) / stride - 1.0, boxes.dtype)[..., None]
    bound_x = tf.cast(float(w_min) / stride - 1.0, boxes.dtype)[..., None]

    def axis(start, size, bound):
        pos = tf.stack([start + (i + sample_offset) * size / output_size
                        for i in range(output_size)], axis=2)  # fmt: skip
        c0 = tf.minimum(tf.maximum(tf.floor(pos), 0.0), bound)
        c1 = tf.minimum(c0 + 1.0, bound)
        frac = pos - c0
        # Interleaved [B, N, 2P]: (cell0, cell1) of bin 0, then of bin 1, ...
        cells = tf.reshape(tf.stack([c0, c1], -1), [batch, num, 2 * output_size])
        kernel = tf.reshape(tf.stack([1.0 - frac, frac], -1), [batch, num, 2 * output_size])
        return tf.cast(cells, tf.int32), kernel

    ys, ky = axis(top, height, bound_y)
    xs, kx = axis(left, width, bound_x)
    row_len = tf.gather(tf.constant(widths, tf.int32), rel)[..., None, None]
    base = (tf.range(batch, dtype=tf.int32)[:, None] * per_image
            + tf.gather(tf.constant(offsets), rel))[..., None, None]  # fmt: skip
    index = base + ys[..., :, None] * row_len + xs[..., None, :]
    corners = tf.gather(table, tf.reshape(index, [-1]))
    corners = tf.reshape(corners, [batch, num, 2 * output_size, 2 * output_size, channels])
    kernel = ky[..., :, None] * kx[..., None, :] * 4.0
    weighted = corners * tf.cast(kernel[..., None], corners.dtype)
    weighted = tf.reshape(weighted, [-1, 2 * output_size, 2 * output_size, channels])
    pooled = tf.nn.avg_pool(weighted, [1, 2, 2, 1], [1, 2, 2, 1], "VALID")
    return tf.reshape(pooled, [batch, num, output_size, output_size, channels]), level


def mg_boxes(rng: np.random.Generator, image: list[int], batch: int) -> np.ndarray:
    ih, iw = image
    d = 1.0 / 64.0
    special = []
    y0, x0 = 3.0, 5.0
    for s in (56.0, 112.0, 224.0, 448.0):
        for bh, bw in ((s, s), (s / 2, 2 * s)):
            for e in (-d, 0.0, d):
                special.append([y0, x0, y0 + bh + e, x0 + bw])
    special += [
        [30.0, 40.0, 30.0, 70.0],  # zero area: lowest level
        [60.0, 50.0, 20.0, 90.0],  # negative area: lowest level
        [90.0, 80.0, 40.0, 20.0],  # both sides reversed
        [-40.0, -30.0, 20.0, 10.0],  # over the top-left corner: extrapolates
        [ih - 20.0, iw - 30.0, ih + 40.0, iw + 50.0],  # past the far corner
        [2.0, 3.0, 9.0, 8.0],  # a small box
    ]
    k = 30
    size = np.exp(rng.uniform(np.log(4.0), np.log(900.0), k))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), k))
    bh, bw = size / np.sqrt(aspect), size * np.sqrt(aspect)
    cy = rng.uniform(-0.1 * ih, 1.1 * ih, k)
    cx = rng.uniform(-0.1 * iw, 1.1 * iw, k)
    rand = np.stack([cy - bh / 2, cx - bw / 2, cy + bh / 2, cx + bw / 2], axis=1)
    rand = np.round(rand * 64.0) / 64.0
    all_boxes = np.concatenate([special, rand]).astype(np.float32)
    per = all_boxes.shape[0] // batch
    return np.stack([rng.permutation(all_boxes)[:per] for _ in range(batch)])


def main() -> None:
    import tensorflow as tf
    from tensorflow.python.ops import gen_image_ops

    tf.config.threading.set_intra_op_parallelism_threads(1)
    rng = np.random.default_rng(20261130)
    images = {
        "f32": (np.round(rng.standard_normal((2, 6, 9, 3)) * 1024) / 1024).astype(np.float32),
        "u8": rng.integers(0, 256, (2, 6, 9, 3)).astype(np.uint8),
        "row": (np.round(rng.standard_normal((1, 1, 5, 2)) * 1024) / 1024).astype(np.float32),
    }
    boxes = crop_boxes(rng)
    arrays: dict[str, np.ndarray] = {f"image_{k}": v for k, v in images.items()}
    arrays["crop_boxes"] = boxes
    indices = {k: rng.integers(0, v.shape[0], boxes.shape[0]).astype(np.int32)
               for k, v in images.items()}  # fmt: skip
    for k, v in indices.items():
        arrays[f"crop_indices_{k}"] = v
    for i, cfg in enumerate(CROP_CONFIGS):
        image = images[cfg["image"]]
        idx = indices[cfg["image"]]
        out = tf.image.crop_and_resize(
            image,
            boxes,
            idx,
            cfg["crop"],
            method=cfg["method"],
            extrapolation_value=cfg["extrapolation"],
        ).numpy()
        g = rng.integers(-3, 4, out.shape).astype(np.float32)
        arrays[f"c{i}_output"] = out
        arrays[f"c{i}_grad_output"] = g
        if image.dtype == np.float32:
            arrays[f"c{i}_grad_image"] = gen_image_ops.crop_and_resize_grad_image(
                g, boxes, idx, image.shape, T=tf.float32, method=cfg["method"]
            ).numpy()
        if cfg["method"] == "bilinear":
            arrays[f"c{i}_grad_boxes"] = gen_image_ops.crop_and_resize_grad_boxes(
                g, image, boxes, idx
            ).numpy()
    for i, cfg in enumerate(MG_CONFIGS):
        batch, channels = 2, 3
        maps = {
            str(level): (
                np.round(rng.standard_normal((batch, h, w, channels)) * 1024) / 1024
            ).astype(np.float32)
            for level, (h, w) in zip(cfg["levels"], cfg["sizes"], strict=True)
        }
        b = mg_boxes(rng, cfg["image"], batch)
        tmaps = {k: tf.constant(v) for k, v in maps.items()}
        tb = tf.constant(b)
        with tf.GradientTape() as tape:
            tape.watch(list(tmaps.values()) + [tb])
            out, level = model_garden_tf(tmaps, tb, cfg["output_size"], cfg["sample_offset"])
            g = rng.integers(-3, 4, out.shape).astype(np.float32)
            loss = tf.reduce_sum(out * g)
        grads = tape.gradient(loss, list(tmaps.values()) + [tb])
        for (key, value), grad in zip(maps.items(), grads[:-1], strict=True):
            arrays[f"m{i}_l{key}"] = value
            arrays[f"m{i}_grad_l{key}"] = grad.numpy()
        arrays[f"m{i}_boxes"] = b
        arrays[f"m{i}_levels"] = level.numpy()
        arrays[f"m{i}_output"] = out.numpy()
        arrays[f"m{i}_grad_output"] = g
        arrays[f"m{i}_grad_boxes"] = grads[-1].numpy()
    meta = {"crop": CROP_CONFIGS, "model_garden": MG_CONFIGS, "tensorflow": tf.__version__}
    arrays["configs"] = np.array(json.dumps(meta))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"{OUT.name}: {OUT.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
