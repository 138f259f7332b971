"""Writes the torchvision golden files used by the tests (tests/golden/*.npz).

Rerun (from the repository root, with torch and torchvision installed; the
package itself is not needed)::

    python tools/make_golden.py

It is deterministic (fixed seeds, float64 on the CPU), so rerunning with the
same torch/torchvision versions rewrites byte-identical arrays. The files hold,
per configuration ``i``:

* ``features`` (ps_roi_align: ``features_{PH}x{PW}``): ``[N, C, H, W]`` float64 maps
  (NCHW, as torchvision), normal values rounded to multiples of 2**-12;
* ``c{i}_rois``: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image coordinates;
* ``c{i}_output``: torchvision's output ``[K, C_out, PH, PW]``;
* ``c{i}_grad_output`` / ``c{i}_grad_input``: a random integer cotangent and torchvision's
  gradient with respect to the input map (argmax routing for roi_pool);
* ``configs``: a JSON string with each configuration's parameters, and the
  torch / torchvision versions.

Files written:

* ``roi_pool.npz``: ``torchvision.ops.roi_pool``;
* ``ps_roi_align.npz``: ``torchvision.ops.ps_roi_align`` (empty adaptive boxes give NaN);
* ``roi_align_tv.npz``: ``torchvision.ops.roi_align`` (aligned True/False, fixed and
  adaptive sampling), a reference beside ONNX Runtime.

Boxes cover every kind: inside, across the border, far outside, tiny, zero and
negative size, larger than the map, and half-integer coordinates (where
roi_pool's rounding is half away from zero). They are drawn in map cells and
divided by the spatial scale (dyadic scales keep them exact).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import torch
import torchvision
from torchvision import ops

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "golden"
N, H, W = 2, 9, 13
SCALES = (1.0, 0.5, 0.25)


def make_boxes(rng: np.random.Generator, k_random: int = 12) -> np.ndarray:
    """Boxes in map cells ``[K, 4]`` (x1, y1, x2, y2): fixed tricky ones + random ones."""
    fixed = [
        [1.0, 1.0, 3.0, 3.0],  # integer, inside
        [0.5, 1.5, 4.5, 2.5],  # half-integers: round half away from zero
        [-0.5, -1.5, 2.5, 3.5],  # negative half-integers
        [-2.5, -2.5, 0.5, -0.5],  # mostly above/left of the map
        [2.2, 3.3, 2.2, 3.3],  # zero size
        [5.0, 6.0, 3.0, 2.0],  # negative size
        [4.1, 2.05, 4.3, 2.2],  # tiny
        [-6.0, -4.0, W + 7.0, H + 5.0],  # larger than the map
        [-40.0, -30.0, -20.0, -10.0],  # far outside (before)
        [W + 20.0, H + 10.0, W + 45.0, H + 30.0],  # far outside (after)
        [W - 2.0, H - 2.0, W + 3.0, H + 3.0],  # across the far border
        [-1.2, 0.7, 1.1, H - 0.6],  # across the near border, tall
        [0.0, 0.0, W - 1.0, H - 1.0],  # the whole map
        [3.7, -0.9, 11.6, 0.4],  # thin strip at the top
    ]
    out = [np.array(fixed, np.float64)]
    # Random boxes: centres around the map (some outside), sizes from tiny to huge.
    cx = rng.uniform(-3.0, W + 3.0, k_random)
    cy = rng.uniform(-3.0, H + 3.0, k_random)
    sw = np.exp(rng.uniform(np.log(0.05), np.log(2.5 * W), k_random))
    sh = np.exp(rng.uniform(np.log(0.05), np.log(2.5 * H), k_random))
    rnd = np.stack([cx - sw / 2, cy - sh / 2, cx + sw / 2, cy + sh / 2], axis=1)
    out.append(np.round(rnd * 64.0) / 64.0)  # dyadic: exact after any dyadic scale
    return np.concatenate(out, axis=0)


def rois_for(rng: np.random.Generator, scale: float) -> np.ndarray:
    boxes = make_boxes(rng) / scale
    batch = rng.integers(0, N, boxes.shape[0]).astype(np.float64)
    return np.concatenate([batch[:, None], boxes], axis=1)


def run(fn, features: np.ndarray, rois: np.ndarray, rng: np.random.Generator, **kw):
    x = torch.tensor(features, dtype=torch.float64, requires_grad=True)
    r = torch.tensor(rois, dtype=torch.float64)
    y = fn(x, r, **kw)
    # Small integer cotangents: exact sums, and they compress well.
    g = rng.integers(-4, 5, tuple(y.shape)).astype(np.float64)
    # NaN outputs (empty adaptive ps_roi_align bins) have no gradient path worth testing.
    g = np.where(np.isnan(y.detach().numpy()), 0.0, g)
    (gx,) = torch.autograd.grad(y, x, torch.tensor(g))
    return y.detach().numpy(), g, gx.numpy()


def random_map(rng: np.random.Generator, shape) -> np.ndarray:
    """Normal values on a 2**-12 grid: few mantissa bits, so the files compress well."""
    return np.round(rng.standard_normal(shape) * 4096.0) / 4096.0


def versions() -> dict:
    return {"torch": torch.__version__, "torchvision": torchvision.__version__}


def roi_pool_file() -> None:
    rng = np.random.default_rng(20240401)
    features = random_map(rng, (N, 3, H, W))
    arrays: dict[str, np.ndarray] = {"features": features}
    configs = []
    for i, (size, scale) in enumerate(
        (s, sc) for s in [(2, 2), (3, 5), (7, 7), (1, 4)] for sc in SCALES
    ):
        rois = rois_for(rng, scale)
        y, g, gx = run(ops.roi_pool, features, rois, rng, output_size=size, spatial_scale=scale)
        arrays.update(
            {f"c{i}_rois": rois, f"c{i}_output": y, f"c{i}_grad_output": g, f"c{i}_grad_input": gx}
        )
        configs.append({"output_size": list(size), "spatial_scale": scale})
    arrays["configs"] = np.array(json.dumps({"configs": configs, **versions()}))
    np.savez_compressed(OUT / "roi_pool.npz", **arrays)


def ps_roi_align_file() -> None:
    rng = np.random.default_rng(20240402)
    c_out = 2
    arrays: dict[str, np.ndarray] = {}
    configs = []
    i = 0
    for size in [(2, 2), (3, 2), (1, 3)]:
        features = random_map(rng, (N, c_out * size[0] * size[1], H, W))
        arrays[f"features_{size[0]}x{size[1]}"] = features
        for scale in SCALES:
            for ratio in (0, 2):
                rois = rois_for(rng, scale)
                y, g, gx = run(
                    ops.ps_roi_align,
                    features,
                    rois,
                    rng,
                    output_size=size,
                    spatial_scale=scale,
                    sampling_ratio=ratio,
                )
                arrays.update(
                    {
                        f"c{i}_rois": rois,
                        f"c{i}_output": y,
                        f"c{i}_grad_output": g,
                        f"c{i}_grad_input": gx,
                    }
                )
                configs.append(
                    {"output_size": list(size), "spatial_scale": scale, "sampling_ratio": ratio}
                )
                i += 1
    arrays["configs"] = np.array(json.dumps({"configs": configs, **versions()}))
    np.savez_compressed(OUT / "ps_roi_align.npz", **arrays)


def roi_align_file() -> None:
    rng = np.random.default_rng(20240403)
    features = random_map(rng, (N, 3, H, W))
    arrays: dict[str, np.ndarray] = {"features": features}
    configs = []
    groups = [(True, 0, (3, 5)), (True, 2, (2, 2)), (False, 0, (7, 7)), (False, 3, (4, 1))]
    i = 0
    for aligned, ratio, size in groups:
        for scale in SCALES:
            rois = rois_for(rng, scale)
            y, g, gx = run(
                ops.roi_align,
                features,
                rois,
                rng,
                output_size=size,
                spatial_scale=scale,
                sampling_ratio=ratio,
                aligned=aligned,
            )
            arrays.update(
                {
                    f"c{i}_rois": rois,
                    f"c{i}_output": y,
                    f"c{i}_grad_output": g,
                    f"c{i}_grad_input": gx,
                }
            )
            configs.append(
                {
                    "output_size": list(size),
                    "spatial_scale": scale,
                    "sampling_ratio": ratio,
                    "aligned": aligned,
                }
            )
            i += 1
    arrays["configs"] = np.array(json.dumps({"configs": configs, **versions()}))
    np.savez_compressed(OUT / "roi_align_tv.npz", **arrays)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    roi_pool_file()
    ps_roi_align_file()
    roi_align_file()
    for name in ("roi_pool.npz", "ps_roi_align.npz", "roi_align_tv.npz"):
        print(f"{name}: {(OUT / name).stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
