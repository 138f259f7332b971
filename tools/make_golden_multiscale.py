"""Writes tests/golden/multiscale.npz from torchvision's ``MultiScaleRoIAlign``.

Rerun (from the repository root, with torch and torchvision installed; the
package itself is not needed)::

    python tools/make_golden_multiscale.py

Deterministic (fixed seed, CPU). Four small FPN maps P2-P5 of a 96 x 128 image
(strides 4 to 32: 24 x 32, 12 x 16, 6 x 8, 3 x 4), two images, two channels;
torchvision infers the scales (1/4 ... 1/32) from the map and image sizes and
uses ``aligned=False``. The file holds:

* ``features_l{i}``: ``[N, C, H_l, W_l]`` float64 maps (NCHW), values on a 2**-12 grid
  (exact in float32 too);
* per configuration ``c{i}``: ``rois`` ``[K, 5]`` (batch_index, x1, y1, x2, y2) in image
  pixels; ``levels`` torchvision's LevelMapper output (level - k_min; a negative-area
  box gets a garbage level and no output); ``output`` ``[K, C, PH, PW]``;
  for float64 configurations also ``grad_output`` (small integers) and
  ``grad_l{i}``, the gradient with respect to each map;
* ``configs``: JSON with each configuration (dtype, output_size, sampling_ratio,
  canonical_scale, canonical_level) and the torch / torchvision versions.

Boxes: sizes (sqrt of the area) log-uniform from 6 to 700 pixels so that every
level is used, aspect ratios from 1:3 to 3:1, some across the image border;
boxes exactly on level boundaries (sqrt area 56, 112, 224, 448, square and
not) and 1/64 pixel either side; a zero-area box, a negative-area box and a
box with both sides reversed; in the adaptive configurations a long thin box on
P2 that needs more rows per bin than the fast window (exact dense path).
Coordinates are multiples of 1/64 (exact in float32).
"""

from __future__ import annotations

import json
import pathlib
from collections import OrderedDict

import numpy as np
import torch
import torchvision
from torchvision import ops

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden"
N, C = 2, 2
IMAGE = (96, 128)  # H, W
SIZES = [(24, 32), (12, 16), (6, 8), (3, 4)]
CONFIGS = [
    {"dtype": "float64", "output_size": [5, 4], "sampling_ratio": 2, "grads": True},
    {"dtype": "float64", "output_size": [4, 6], "sampling_ratio": 0, "grads": True, "thin": True},
    {"dtype": "float32", "output_size": [7, 7], "sampling_ratio": 2},
    {"dtype": "float32", "output_size": [3, 5], "sampling_ratio": 0, "thin": True},
    {
        "dtype": "float64",
        "output_size": [4, 4],
        "sampling_ratio": 0,
        "canonical_scale": 112,
        "canonical_level": 3,
    },
]


def boundary_boxes() -> np.ndarray:
    out = []
    x0, y0 = 20.0, 10.0
    d = 1.0 / 64.0
    for s in (56.0, 112.0, 224.0, 448.0):
        for w, h in ((s, s), (s / 2, 2 * s), (2 * s, s / 2)):
            for dh in (-d, 0.0, d):
                out.append([x0, y0, x0 + w, y0 + h + dh])
    out += [
        [30.0, 40.0, 30.0, 70.0],  # zero area
        [60.0, 20.0, 40.0, 50.0],  # negative area: no level in torchvision, zeros
        [90.0, 80.0, 50.0, 30.0],  # both sides reversed: positive area
    ]
    return np.array(out, np.float64)


def random_boxes(rng: np.random.Generator, k: int) -> np.ndarray:
    h, w = IMAGE
    size = np.exp(rng.uniform(np.log(6.0), np.log(700.0), k))
    aspect = np.exp(rng.uniform(np.log(1 / 3), np.log(3.0), k))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx = rng.uniform(-0.1 * w, 1.1 * w, k)
    cy = rng.uniform(-0.1 * h, 1.1 * h, k)
    boxes = np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)
    return np.round(boxes * 64.0) / 64.0


def random_map(rng: np.random.Generator, shape) -> np.ndarray:
    return np.round(rng.standard_normal(shape) * 4096.0) / 4096.0


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rng = np.random.default_rng(20240405)
    maps = [random_map(rng, (N, C, h, w)) for h, w in SIZES]
    arrays: dict[str, np.ndarray] = {f"features_l{i}": m for i, m in enumerate(maps)}
    for i, cfg in enumerate(CONFIGS):
        dtype = getattr(torch, cfg["dtype"])
        boxes = np.concatenate([boundary_boxes(), random_boxes(rng, 32)])
        if cfg.get("thin"):
            boxes = np.concatenate(
                [boxes, [[10.0, -40.0, 14.0, 280.0], [-30.0, 50.0, 300.0, 52.0]]]
            )
        batch = rng.integers(0, N, boxes.shape[0])
        module = ops.MultiScaleRoIAlign(
            [f"p{j}" for j in range(len(maps))],
            tuple(cfg["output_size"]),
            cfg["sampling_ratio"],
            canonical_scale=cfg.get("canonical_scale", 224),
            canonical_level=cfg.get("canonical_level", 4),
        )
        xs = [torch.tensor(m, dtype=dtype, requires_grad=True) for m in maps]
        x = OrderedDict((f"p{j}", t) for j, t in enumerate(xs))
        tb = torch.tensor(boxes, dtype=dtype)
        box_list = [tb[batch == n] for n in range(N)]
        # torchvision orders the output by image; keep that order in the file.
        order = np.concatenate([np.nonzero(batch == n)[0] for n in range(N)])
        y = module(x, box_list, [IMAGE] * N)
        levels = module.map_levels(box_list).numpy()
        rois = np.concatenate([batch[order, None].astype(np.float64), boxes[order]], axis=1)
        arrays[f"c{i}_rois"] = rois
        arrays[f"c{i}_levels"] = levels
        arrays[f"c{i}_output"] = y.detach().numpy()
        if cfg.get("grads"):
            g = rng.integers(-4, 5, tuple(y.shape)).astype(np.float64)
            grads = torch.autograd.grad(y, xs, torch.tensor(g, dtype=dtype))
            arrays[f"c{i}_grad_output"] = g
            for j, gj in enumerate(grads):
                arrays[f"c{i}_grad_l{j}"] = gj.numpy()
        assert module.scales == [0.25, 0.125, 0.0625, 0.03125], module.scales
    meta = {
        "configs": CONFIGS,
        "image": IMAGE,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    arrays["configs"] = np.array(json.dumps(meta))
    path = OUT / "multiscale.npz"
    np.savez_compressed(path, **arrays)
    print(f"{path.name}: {path.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
