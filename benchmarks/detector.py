"""``python -m benchmarks.detector``: what pooling costs inside a detector's train step.

The train step of ``examples/detector`` (a small Mask R-CNN in Flax NNX: 8
images of 128 x 128 per step, FPN P2-P5, 32 RoIs per image pooled 7 x 7 for
the box head, 8 pooled 14 x 14 for the mask head, mask targets cut out of
the ground truth by RoI Align at 28 x 28) with its three pooling calls served by:

* ``jax_roialign`` (the model as written): ``multiscale_roi_align`` and ``roi_align``;
* ``naive port`` (``benchmarks/naive.py``): every bilinear tap of every sample
  gathered, every box on every level then the box's own level selected; with
  adaptive sampling the grid is capped per level at ``ceil(extent / P)``, the
  largest grid a box inside the image can have;
* ``torchvision-style fallback`` (adaptive sampling only): the same gathers
  with the grid capped at the map's extent, as torchvision's pure-PyTorch
  ``_roi_align`` and KerasHub's SAM3 port of it do (with a fixed
  ``sampling_ratio`` it is the naive port); compiled, and run only where
  its temporaries fit in ``--max-temp-gib``;
* ``none``: a stand-in of the same shapes that reads only each image's mean
  feature (no pooling work; the gradient still reaches every map), so that
  *with pooling - without* is pooling's cost.

Each variant is compiled cold (``jax.clear_caches()``: the first compile a
process pays), its temporaries read from ``memory_analysis()``, then all are
timed in turns on the same batches (the median of every turn's steps), so a
change of load on the machine falls on all of them alike. With
``--no-stop-gradient`` rows, the proposals stay attached (the heads' box
gradient reaches the RPN through pooling). ``--profile`` also splits one
profiled jax_roialign step by the model's ``box_pool`` / ``mask_pool`` /
``target_pool`` scopes. Before timing, every pooling is checked against
jax_roialign on one batch's RoIs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import gzip
import json
import math
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from examples.detector.data import make_scenes
from examples.detector.model import Config, MaskRCNN, Pooling, RoIAlignPooling, default_pooling
from examples.detector.train import create, make_train_step, to_batch

from .naive import naive_roi_align

Array = jax.Array
SCOPES = ("box_pool", "mask_pool", "target_pool")


# ---------------------------------------------------------------------------
# The poolings swapped in
# ---------------------------------------------------------------------------


def _levels(boxes: Array, pooling: RoIAlignPooling) -> Array:
    """The model's level of each ``[K, 4]`` box (torchvision's mapper, the model's
    canonical scale), as an index into the pyramid."""
    k_min = -math.log2(pooling.spatial_scales[0])
    k_max = -math.log2(pooling.spatial_scales[-1])
    b = jax.lax.stop_gradient(boxes)
    size = jnp.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    k = jnp.floor(pooling.canonical_level + jnp.log2(size / pooling.canonical_scale) + 1e-6)
    return (jnp.clip(k, k_min, k_max) - k_min).astype(jnp.int32)


def _rois(boxes: Array) -> Array:
    """``[N, R, 4]`` -> ``[N * R, 5]`` rows ``(image, x1, y1, x2, y2)``."""
    n, r = boxes.shape[:2]
    index = jnp.repeat(jnp.arange(n, dtype=boxes.dtype), r)[:, None]
    return jnp.concatenate([index, boxes.reshape(n * r, 4)], axis=1)


@dataclasses.dataclass(frozen=True)
class GatherPooling:
    """The model's pooling by per-sample bilinear gathers (``benchmarks/naive.py``).

    ``cap``: with adaptive sampling, the samples gathered per bin and axis:
    ``"bound"`` (``ceil(extent / P)``, enough for any box inside the image) or
    ``"extent"`` (the map's extent, as torchvision's fallback and SAM3).
    """

    like: RoIAlignPooling
    cap: str = "bound"

    def _cap(self, height: int, width: int, output_size: int) -> tuple[int, int] | None:
        if self.like.sampling_ratio > 0:
            return None
        if self.cap == "extent":
            return height, width
        return max(1, math.ceil(height / output_size)), max(1, math.ceil(width / output_size))

    def _one(self, features: Array, rois: Array, output_size: int, scale: float) -> Array:
        _, h, w, _ = features.shape
        return naive_roi_align(
            features,
            rois,
            output_size=output_size,
            spatial_scale=scale,
            sampling_ratio=self.like.sampling_ratio,
            aligned=True,
            grid_cap=self._cap(h, w, output_size),
        )

    def pyramid(self, maps: Sequence[Array], boxes: Array, output_size: int) -> Array:
        n, r = boxes.shape[:2]
        rois = _rois(boxes)
        level = _levels(rois[:, 1:], self.like)
        out = None
        for i, (m, s) in enumerate(zip(maps, self.like.spatial_scales, strict=True)):
            o = self._one(m, rois, output_size, s)
            out = o if out is None else jnp.where((level == i)[:, None, None, None], o, out)
        assert out is not None
        return out.reshape((n, r) + out.shape[1:])

    def crop(self, images: Array, boxes: Array, output_size: int) -> Array:
        out = self._one(images, _rois(boxes), output_size, 1.0)
        return out[:, None]


@dataclasses.dataclass(frozen=True)
class NoPooling:
    """A stand-in of pooling's shapes that does no pooling: each RoI gets its image's
    mean feature over all levels (the maps still receive a gradient, the boxes none)."""

    def pyramid(self, maps: Sequence[Array], boxes: Array, output_size: int) -> Array:
        mean = sum(m.mean(axis=(1, 2)) for m in maps)  # [N, C]
        n, r = boxes.shape[:2]
        shape = (n, r, output_size, output_size, mean.shape[-1])
        return jnp.broadcast_to(mean[:, None, None, None, :], shape)

    def crop(self, images: Array, boxes: Array, output_size: int) -> Array:
        mean = images.mean(axis=(1, 2))
        shape = (images.shape[0], 1, output_size, output_size, mean.shape[-1])
        return jnp.broadcast_to(mean[:, None, None, None, :], shape)


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    config: Config
    pooling: Pooling | None  # None: the model's own (jax_roialign)
    stop_gradient: bool = True

    @property
    def label(self) -> str:
        sampling = "adaptive" if self.config.sampling_ratio <= 0 else self.config.sampling_ratio
        attached = "" if self.stop_gradient else ", attached"
        return f"{self.name} (sampling {sampling}{attached})"


def variants(config: Config, *, adaptive: bool, attached: bool) -> list[Variant]:
    """The rows of the benchmark."""
    out = []
    configs = [config]
    if adaptive and config.sampling_ratio > 0:
        configs.append(dataclasses.replace(config, sampling_ratio=0))
    for cfg in configs:
        like = default_pooling(cfg)
        out.append(Variant("jax_roialign", cfg, None))
        if attached:
            out.append(Variant("jax_roialign", cfg, None, stop_gradient=False))
        out.append(Variant("naive port", cfg, GatherPooling(like)))
        if attached:
            out.append(Variant("naive port", cfg, GatherPooling(like), stop_gradient=False))
        if cfg.sampling_ratio <= 0:
            out.append(Variant("torchvision-style fallback", cfg, GatherPooling(like, "extent")))
    out.append(Variant("none (no pooling)", config, NoPooling()))
    return out


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------


def check_numbers(v: Variant, scenes: Any) -> float:
    """Largest difference between ``v``'s pooling and jax_roialign's on one batch: the
    box and mask poolings at the ground truth jittered, and the mask targets' crop."""
    if v.pooling is None or isinstance(v.pooling, NoPooling):
        return 0.0
    trainer = create(v.config)
    net: MaskRCNN = nnx.merge(trainer.graphdef, trainer.params)
    images = jnp.asarray(scenes.images)
    maps = jax.jit(net.features)(images)
    rng = np.random.default_rng(0)
    boxes = np.repeat(scenes.boxes, 4, axis=1)
    boxes = np.clip(boxes + rng.uniform(-6, 6, boxes.shape), 0, v.config.image_size)
    boxes[..., 2:] = np.maximum(boxes[..., 2:], boxes[..., :2] + 2)
    boxes = jnp.asarray(boxes, jnp.float32)
    ref = default_pooling(v.config)
    worst = 0.0
    for size in (v.config.box_pool, v.config.mask_pool):
        got = jax.jit(v.pooling.pyramid, static_argnums=2)(maps, boxes, size)
        want = jax.jit(ref.pyramid, static_argnums=2)(maps, boxes, size)
        worst = max(worst, float(jnp.max(jnp.abs(got - want))))
    masks = jnp.asarray(scenes.masks[:, :1], jnp.float32).reshape(-1, *scenes.masks.shape[2:], 1)
    crop_boxes = boxes[:, :1]
    got = jax.jit(v.pooling.crop, static_argnums=2)(masks, crop_boxes, v.config.mask_size)
    want = jax.jit(ref.crop, static_argnums=2)(masks, crop_boxes, v.config.mask_size)
    return max(worst, float(jnp.max(jnp.abs(got - want))))


def compile_variant(v: Variant, batch: dict[str, Array]) -> dict[str, Any]:
    """Cold lower + compile of the variant's train step; its temporaries."""
    trainer = create(v.config, pooling=v.pooling)
    step = make_train_step(trainer.graphdef, trainer.tx, stop_gradient=v.stop_gradient)
    jax.clear_caches()
    key = jax.random.key(0)
    c0, t0 = _cpu_seconds(), time.perf_counter()
    lowered = jax.jit(step).lower(trainer.params, trainer.opt_state, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    c2, t2 = _cpu_seconds(), time.perf_counter()
    return {
        "trainer": trainer,
        "compiled": compiled,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "first_s": t2 - t0,
        "first_cpu_s": c2 - c0,
        "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
    }


def _cpu_seconds() -> float:
    """This process's CPU time (user + system, all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_turns(rows: list[dict[str, Any]], batches: list, turns: int) -> None:
    """Median wall and CPU time of each runnable row's step, the rows timed in turns."""
    key = jax.random.key(0)
    for row in rows:
        row["times"], row["cpu"] = [], []
        row["state"] = (row["trainer"].params, row["trainer"].opt_state)
        # one warm-up step
        if row.get("run", True):
            p, o, out = row["compiled"](*row["state"], batches[0], key)
            jax.block_until_ready(out)
    for t in range(turns):
        for row in rows:
            if not row.get("run", True):
                continue
            for i, batch in enumerate(batches):
                c0, t0 = _cpu_seconds(), time.perf_counter()
                _, _, out = row["compiled"](*row["state"], batch, jax.random.fold_in(key, i))
                jax.block_until_ready(out)
                row["times"].append(time.perf_counter() - t0)
                row["cpu"].append(_cpu_seconds() - c0)
        print(f"  turn {t + 1}/{turns} done", flush=True)
    for row in rows:
        row["step_ms"] = 1e3 * statistics.median(row["times"]) if row["times"] else None
        row["cpu_ms"] = 1e3 * statistics.median(row["cpu"]) if row["cpu"] else None


def profile_split(row: dict[str, Any], batch: dict[str, Array], steps: int = 3) -> dict[str, float]:
    """Share of one compiled step's op time in each pooling scope (profiler trace)."""
    names = {}
    for line in row["compiled"].as_text().splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+) = .*?op_name=\"([^\"]*)\"", line)
        if m:
            names[m[1]] = m[2]
    key = jax.random.key(0)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(steps):
                out = row["compiled"](*row["state"], batch, jax.random.fold_in(key, i))
                jax.block_until_ready(out)
        path = glob.glob(os.path.join(tmp, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as fh:
            events = json.load(fh)["traceEvents"]
    spans = [e for e in events if e.get("ph") == "X" and e.get("name") in names]
    by_thread: dict[Any, list] = {}
    for e in spans:
        by_thread.setdefault((e["pid"], e["tid"]), []).append(e)
    totals = {scope: 0.0 for scope in SCOPES}
    total = 0.0
    for evs in by_thread.values():  # self time: a while loop's span holds its body's
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []
        selfs = []
        for e in evs:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                selfs.append(stack.pop())
            if stack:
                stack[-1][1] -= e["dur"]
            stack.append([e, float(e["dur"])])
        selfs += stack
        for e, own in selfs:
            total += own
            for scope in SCOPES:
                if scope in names[e["name"]]:
                    totals[scope] += own
                    break
    return {scope: v / total for scope, v in totals.items()} | {"op_ms": total / steps / 1e3}


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace, split: dict | None) -> str:
    import jaxlib

    base = {
        r["variant"].config.sampling_ratio: r
        for r in rows
        if r["variant"].name == "jax_roialign" and r["variant"].stop_gradient
    }
    none = next(r for r in rows if isinstance(r["variant"].pooling, NoPooling))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        f"Date {datetime.date.today()}; {platform.machine()}, {os.cpu_count()} cores, "
        f"load average {load}; jax {jax.__version__}, jaxlib {jaxlib.__version__}; "
        f"`python -m benchmarks.detector {' '.join(sys.argv[1:])}`. Train step of "
        f"`examples/detector`: {args.batch} images of {rows[0]['variant'].config.image_size} "
        "px per step, float32. *Step*: median over the turns; *first compile*: trace, lower "
        "and compile after `jax.clear_caches()`; *temp*: `memory_analysis().temp_size_in_bytes`; "
        "*diff*: largest difference from jax_roialign's pooled values on one batch.",
        "",
        "| pooling | step (ms) | step CPU (ms) | CPU vs jax_roialign | first compile (s) "
        "| compile CPU (s) | temp (MiB) | diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["variant"]
        ref = base.get(v.config.sampling_ratio, base[args.sampling])
        ratio = r["cpu_ms"] / ref["cpu_ms"] if r.get("cpu_ms") and ref.get("cpu_ms") else None
        ran = r.get("run", True)
        step = _fmt(r.get("step_ms"), ".0f") if ran else "not run (memory)"
        cpu = _fmt(r.get("cpu_ms"), ".0f") if ran else "-"
        lines.append(
            f"| {v.label} | {step} | {cpu} | {_fmt(ratio, '.2f')}x | {r['first_s']:.1f} "
            f"| {r['first_cpu_s']:.1f} | {r['temp_bytes'] / 2**20:.1f} "
            f"| {_fmt(r.get('diff'), '.1e')} |"
        )
    lines.append("")
    for sr, r in sorted(base.items()):
        sampling = "adaptive" if sr <= 0 else f"sampling {sr}"
        parts = []
        for key, unit, what in (
            ("step_ms", "ms", "step's wall time"),
            ("cpu_ms", "ms", "step's CPU time"),
            ("first_s", "s", "first compile (wall)"),
            ("first_cpu_s", "s", "first compile (CPU)"),
        ):
            d = r[key] - none[key]
            parts.append(f"{100 * d / r[key]:.0f}% of the {what} ({d:.1f} {unit})")
        lines.append(
            f"- Pooling's share, jax_roialign ({sampling}), by difference with *none*: "
            + ", ".join(parts)
            + "."
        )
        att = next(
            (
                x
                for x in rows
                if x["variant"].name == "jax_roialign"
                and not x["variant"].stop_gradient
                and x["variant"].config.sampling_ratio == sr
            ),
            None,
        )
        if att is not None:
            lines.append(
                f"- Attached proposals ({sampling}): {att['step_ms'] / r['step_ms']:.2f}x the "
                f"detached step's wall time, {att['cpu_ms'] / r['cpu_ms']:.2f}x its CPU time, "
                f"{att['first_s'] / r['first_s']:.2f}x its first compile."
            )
    if split:
        parts = ", ".join(f"{k} {100 * v:.1f}%" for k, v in split.items() if k in SCOPES)
        lines.append(
            f"- Profile of the jax_roialign step (sampling {args.sampling}; self time of the "
            f"ops, {split['op_ms']:.0f} ms a step): {parts}; "
            f"pooling {100 * sum(split[s] for s in SCOPES):.1f}% in all."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.detector", description=__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3, help="steps per turn")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--sampling", type=int, default=Config().sampling_ratio)
    ap.add_argument("--no-adaptive", dest="adaptive", action="store_false")
    ap.add_argument("--no-attached", dest="attached", action="store_false")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--max-temp-gib", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="write the Markdown here too")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    config = dataclasses.replace(Config(), sampling_ratio=args.sampling)
    scenes = [
        make_scenes(args.batch, size=config.image_size, seed=500 + i) for i in range(args.steps)
    ]
    batches = [to_batch(s) for s in scenes]
    rows = []
    for v in variants(config, adaptive=args.adaptive, attached=args.attached):
        row = {"variant": v, "diff": check_numbers(v, scenes[0])}
        row |= compile_variant(v, batches[0])
        row["run"] = row["temp_bytes"] <= args.max_temp_gib * 2**30
        rows.append(row)
        print(
            f"{v.label:58s} first compile {row['first_s']:6.1f} s (lower {row['lower_s']:.1f}) "
            f"temp {row['temp_bytes'] / 2**20:8.1f} MiB  diff {row['diff']:.1e}"
            + ("" if row["run"] else "  (not run: temporaries over --max-temp-gib)"),
            flush=True,
        )
    time_turns(rows, batches, args.turns)
    split = None
    if args.profile:
        first = next(r for r in rows if r["variant"].pooling is None and r["variant"].stop_gradient)
        split = profile_split(first, batches[0])
    text = markdown(rows, args, split)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
