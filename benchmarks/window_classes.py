"""``python -m benchmarks.window_classes``: what a call costs when its boxes differ.

An R50-C4-like head (res4 50 x 84, stride 16, 1024 boxes of 2-50 cells of
square root of area, aspect 0.5-2, 14 x 14, ``sampling_ratio=0``,
``aligned=True``) on three sets of the same boxes:

* ``clipped``: each box's sides clipped to the image (the ``r50_c4`` workload);
* ``unclipped``: the same draws, not clipped (the ``r50_c4_unclipped`` workload:
  boxes past the image on any side);
* ``one huge``: the clipped boxes with one box twice the map's size among them.

For each, the forward and forward+backward (the features' gradient; with
``--box-gradient`` also the boxes') of the default implementation, jitted
(``--op``: average, max mode, or rotated boxes of the same sizes): the minimum
of ``--repeats`` runs, and the first compile. Only the public API is used, so
``PYTHONPATH=/path/to/old/checkout python -m benchmarks.window_classes`` measures
an older checkout for a before/after table.
"""

from __future__ import annotations

import argparse
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .harness import machine_info
from .workloads import IMAGE_SIZE, level_boxes


def box_sets(count: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``[N, R, 4]`` boxes of each set (two images)."""
    clipped = level_boxes(np.random.default_rng(seed), count, 16, cells=(2.0, 50.0))
    unclipped = level_boxes(np.random.default_rng(seed), count, 16, cells=(2.0, 50.0), clip=False)
    huge = clipped.copy()
    img_h, img_w = IMAGE_SIZE
    huge[count // 2] = [-img_w / 2, -img_h / 2, 1.5 * img_w, 1.5 * img_h]
    sets = {"clipped": clipped, "unclipped": unclipped, "one huge": huge}
    return {k: v.reshape(2, count // 2, 4) for k, v in sets.items()}


def programs(with_boxes: bool, op: str = "avg", output_size: int = 14) -> dict[str, Any]:
    """The op (``avg``: ``roi_align``; ``max``: ``roi_align(mode="max")``;
    ``rotated``: ``roi_align_rotated`` of the boxes turned by an angle drawn per
    box) alone and forward+backward."""
    import jax_roialign as jr

    kw = dict(output_size=output_size, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)

    def fwd(feats, boxes):
        if op == "rotated":
            return jr.roi_align_rotated(feats, _rotated(boxes), **kw)
        return jr.roi_align(feats, boxes, mode=op, **kw)

    def fb(feats, boxes, cot):
        if with_boxes:
            out, vjp = jax.vjp(fwd, feats, boxes)
        else:
            out, vjp = jax.vjp(lambda f: fwd(f, boxes), feats)
        return out, vjp(cot.reshape(out.shape))

    return {"fwd": lambda f, b, c: fwd(f, b), "f+b": fb}


def _rotated(boxes):
    """``[N, R, 4]`` corner boxes -> ``[N, R, 5]`` (centre, size, an angle in
    [-90, 90) degrees fixed per box)."""
    angle = jnp.asarray(np.random.default_rng(3).uniform(-90, 90, boxes.shape[:-1]), boxes.dtype)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2
    return jnp.concatenate([centre, boxes[..., 2:] - boxes[..., :2], angle[..., None]], -1)


def compile_program(fn, args) -> tuple[Any, float]:
    """``(compiled, first compile s)``: lowered and compiled cold, then run once."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    return compiled, seconds


def interleaved(calls: dict[Any, Any], repeats: int) -> dict[Any, float]:
    """The minimum run time (ms) of each ``call()``, the calls taken in turn
    ``repeats`` times, so that a busy machine slows them alike."""
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for key, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            best[key] = min(best[key], 1e3 * (time.perf_counter() - t0))
    return best


def torchvision_times(feats, boxes, repeats: int) -> tuple[float, float] | None:
    """torchvision's ``roi_align`` on the same boxes (NCHW, float32): ``(forward
    ms, forward+backward ms)``, minimum of ``repeats``; None without torch."""
    try:
        import torch
        from torchvision.ops import roi_align
    except ImportError:
        return None
    x = torch.from_numpy(np.asarray(feats, np.float32).transpose(0, 3, 1, 2).copy())
    rois = [torch.from_numpy(np.asarray(b, np.float32)) for b in np.asarray(boxes)]
    kw = dict(output_size=14, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * min(times)

    def fb():
        xg = x.detach().requires_grad_(True)
        roi_align(xg, rois, **kw).sum().backward()

    with torch.no_grad():
        fwd = best(lambda: roi_align(x, rois, **kw))
    return fwd, best(fb)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--boxes", type=int, default=1024)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sets", default="clipped,unclipped,one huge")
    parser.add_argument("--box-gradient", action="store_true", help="f+b also w.r.t. boxes")
    parser.add_argument("--torchvision", action="store_true", help="time torchvision too")
    parser.add_argument("--op", default="avg", choices=["avg", "max", "rotated"])
    parser.add_argument("--output-size", type=int, default=14)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"# {info.get('cpu', '')} {info.get('date', '')} jax {jax.__version__}")
    rng = np.random.default_rng(1)
    sets = box_sets(args.boxes)
    print(
        "| dtype | boxes | forward ms | f+b ms | compile fwd / f+b s | torchvision fwd / f+b ms |"
    )
    print("|---|---|---|---|---|---|")
    for dtype in args.dtypes.split(","):
        feats = jnp.asarray(rng.standard_normal((2, 50, 84, args.channels)), dtype)
        p = args.output_size
        cot = jnp.asarray(rng.standard_normal((args.boxes, p, p, args.channels)), dtype)
        names = args.sets.split(",")
        calls, first = {}, {}
        for name in names:
            boxes = jnp.asarray(sets[name])
            for prog, fn in programs(args.box_gradient, args.op, p).items():
                compiled, first[name, prog] = compile_program(fn, (feats, boxes, cot))
                calls[name, prog] = functools.partial(compiled, feats, boxes, cot)
        best = interleaved(calls, args.repeats)
        for name in names:
            tv = None
            if args.torchvision and dtype == "float32" and args.op == "avg" and p == 14:
                tv = torchvision_times(feats, sets[name], args.repeats)
            tv_text = "" if tv is None else f"{tv[0]:.0f} / {tv[1]:.0f}"
            print(
                f"| {dtype} | {name} | {best[name, 'fwd']:.0f} | {best[name, 'f+b']:.0f} | "
                f"{first[name, 'fwd']:.1f} / {first[name, 'f+b']:.1f} | {tv_text} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
