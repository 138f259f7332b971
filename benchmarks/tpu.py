"""``python -m benchmarks.tpu``: the workloads compiled for TPU, ahead of time, on this host.

Needs the ``tpu`` extra (``pip install -e ".[tpu]"``: libtpu, whose TPU compiler
compiles for a named topology without a TPU). For each workload, dtype, and
forward / forward+backward it compiles the default implementation ("auto":
what a TPU program gets, the box-local window reader) for one v5e chip and for
a 16-chip v5e pod (features and per-image boxes sharded on the batch, 2 images
per chip), and ``implementation="matmul"`` (the dense gather-free path) on one
chip for comparison. It
reports compile time, per-chip temporaries (``memory_analysis``), the gathers,
scatters and collectives in the compiled program, the TPU cost model's
estimate, and the bytes the window reader moves (computed from the workload's
boxes: the cost model counts a loop's body once, so it cannot see a loop over
boxes) against the HBM roofline (features and output once at 819 GB/s). Then
it times the window path against the CPU default on this CPU, in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jax_roialign as jr  # noqa: E402
from jax_roialign import _sampling, _window  # noqa: E402
from jax_roialign._validation import DataFormat  # noqa: E402
from tests.helpers import count_ops, map_copies_in_loops, topology  # noqa: E402

from .harness import time_fn  # noqa: E402
from .workloads import LEVELS, Workload, make_inputs, workloads  # noqa: E402

HBM_BYTES_PER_S = 819e9  # v5e
CHIP = "v5e:2x2"
POD = "v5e:4x4"
POD_CHIPS = 16


def _per_device(spec: Any) -> tuple[int, ...]:
    sharding = getattr(spec, "sharding", None)
    return tuple(sharding.shard_shape(spec.shape)) if sharding is not None else tuple(spec.shape)


def compile_for(fn: Callable[..., Any], specs: tuple[Any, ...], mesh=None) -> dict[str, Any]:
    """Lower and compile ``jax.jit(fn)`` for the shardings in ``specs``; its figures."""
    t0 = time.perf_counter()
    if mesh is not None:
        with jax.set_mesh(mesh):
            compiled = jax.jit(fn).lower(*specs).compile()
    else:
        compiled = jax.jit(fn).lower(*specs).compile()
    seconds = time.perf_counter() - t0
    text = compiled.as_text()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return {
        "compile_s": seconds,
        "temp_bytes": int(mem.temp_size_in_bytes),
        "ops": count_ops(text),
        "map_copies": len(map_copies_in_loops(text, [_per_device(s) for s in specs[0]])),
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "optimal_s": float(cost.get("optimal_seconds", float("nan"))),
    }


def op_fn(wl: Workload, method: str) -> Callable[..., Any]:
    """``fn(features_tuple, boxes [N, R, 4]) -> [N, R, P, P, C]`` for the workload,
    by implementation ``method`` (``"auto"``: the default)."""
    p = wl.output_size
    impl = None if method == "auto" else method
    if wl.multiscale:

        def fwd(feats, boxes):
            return jr.multiscale_roi_align(
                list(feats),
                boxes,
                output_size=p,
                spatial_scales=wl.spatial_scales(),
                sampling_ratio=wl.sampling_ratio,
                aligned=wl.aligned,
                implementation=impl,
            )

        return fwd

    def fwd(feats, boxes):
        return jr.roi_align(
            feats[0],
            boxes,
            output_size=p,
            spatial_scale=wl.spatial_scales()[0],
            sampling_ratio=wl.sampling_ratio,
            aligned=wl.aligned,
            implementation=impl,
        )

    return fwd


def with_backward(fwd: Callable[..., Any]) -> Callable[..., Any]:
    """The output and its VJP with respect to the features and boxes (cotangent = output)."""

    def fb(feats, boxes):
        out, vjp = jax.vjp(fwd, feats, boxes)
        return out, vjp(out)

    return fb


def specs_for(wl: Workload, dtype: Any, sharding) -> tuple[Any, ...]:
    feats = tuple(jax.ShapeDtypeStruct(s, dtype, sharding=sharding) for s in wl.feature_shapes())
    boxes = jax.ShapeDtypeStruct((wl.images, wl.rois_per_image, 4), jnp.float32, sharding=sharding)
    return feats, boxes


def pod_workload(wl: Workload) -> Workload:
    import dataclasses

    return dataclasses.replace(wl, images=wl.images * POD_CHIPS)


def _spans(wl: Workload, boxes: np.ndarray):
    """Per level with boxes: ``(level name, lo_y, need_y, lo_x, need_x)``, the first
    row and column and how many rows and columns each of its boxes' taps span."""
    flat = jnp.asarray(boxes.reshape(-1, 4))
    k, p = flat.shape[0], wl.output_size
    if wl.multiscale:
        from jax_roialign._multiscale import LevelMapper, fpn_levels

        level, _ = fpn_levels(
            flat,
            k_min=2,
            k_max=2 + len(wl.levels) - 1,
            canonical_scale=224.0,
            canonical_level=4,
            level_mapper=LevelMapper.TORCHVISION,
        )
        level = np.asarray(level)
    else:
        level = np.zeros(k, np.int64)
    for lv, name in enumerate(wl.levels):
        sel = level == lv
        if not sel.any():
            continue
        h, w, stride = LEVELS[name]
        gy, gx = _sampling.box_grids(
            jnp.asarray(flat[sel]),
            jnp.ones(int(sel.sum()), bool),
            (p, p),
            (h, w),
            spatial_scale=1.0 / stride,
            sampling_ratio=wl.sampling_ratio,
            aligned=wl.aligned,
            dtype=jnp.float32,
        )
        lo_y, need_y = _sampling.tap_span(gy)
        lo_x, need_x = _sampling.tap_span(gx)
        yield name, *(np.asarray(a) for a in (lo_y, need_y, lo_x, need_x))


def window_bytes(wl: Workload, boxes: np.ndarray, itemsize: int, backward: bool) -> float:
    """Bytes the window reader moves for these boxes (per chip, the workload's images).

    Per box: its windows (the tier its taps need, or the tiles covering its span),
    read in the map's dtype, and its output row; the backward adds the
    cotangent, a read-modify-write of the window in the float32 gradient, and
    one more read of the window for the weights' gradient.
    """
    c, p = wl.channels, wl.output_size
    total = 0.0
    for name, _, need_y, _, need_x in _spans(wl, boxes):
        h, w, _ = LEVELS[name]
        tiers = _window.tier_sizes(h, w)
        for ny, nx in zip(need_y, need_x, strict=True):
            tier = next((t for t in tiers[:-1] if ny <= t[0] and nx <= t[1]), tiers[-1])
            window = tier[0] * tier[1] * _window.tiles_read(tier, int(ny), int(nx)) * c
            out = p * p * c
            if backward:
                total += window * itemsize + out * 4 + out * 4 + 2 * window * 4 + window * itemsize
            else:
                total += window * itemsize + out * itemsize
    return total


def pallas_bytes(wl: Workload, boxes: np.ndarray, itemsize: int) -> float:
    """Bytes the Pallas kernel's forward copies for these boxes: per box, its
    windows (16 rows of ``block`` columns: 16 columns widened to start at an
    aligned column; whole rows at a ragged far edge), its dense weights
    (float32) and its output row."""
    from jax_roialign import _pallas

    c, p = wl.channels, wl.output_size
    dtype = jnp.bfloat16 if itemsize == 2 else jnp.float32
    shapes = [(1, LEVELS[n][0], LEVELS[n][1], c) for n in wl.levels]
    plan = _window.Plan(DataFormat.NHWC, shapes, [dtype] * len(shapes), jnp.float32, pallas=True)
    sides = dict(zip(wl.levels, _pallas._sides(plan), strict=True))
    weights = p * (max(s[1] for s in shapes) + max(s[2] for s in shapes)) * 4
    total = 0.0
    for name, _, need_y, lo_x, need_x in _spans(wl, boxes):
        side, width = sides[name], LEVELS[name][1]
        for ny, lx, nx in zip(need_y, lo_x, need_x, strict=True):
            down = max(1, -(-int(ny) // side.h))
            for j in range(max(1, -(-int(nx) // side.w))):
                from_x = min(int(lx), width - 1) + j * side.w
                first = int(
                    _pallas._first_col(
                        jnp.int32(min(from_x, width - side.w)), width, side.block, side.align
                    )
                )
                held = first + side.block >= min(from_x + side.w, width)
                total += down * side.h * (side.block if held else width) * c * itemsize
        total += len(need_y) * (weights + p * p * c * itemsize)
    return total


def roofline_bytes(wl: Workload, itemsize: int, backward: bool) -> float:
    feats = sum(int(np.prod(s)) for s in wl.feature_shapes()) * itemsize
    out = int(np.prod(wl.output_shape())) * itemsize
    return (feats + out) * (2 if backward else 1)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding
    from jax.sharding import PartitionSpec as P

    chip = topology(CHIP)
    one = SingleDeviceSharding(chip.devices[0])
    pod = topology(POD)
    mesh = Mesh(np.array(pod.devices), ("batch",), axis_types=(AxisType.Explicit,))
    batch = NamedSharding(mesh, P("batch"))
    # Automatic sharding: the same placement by jit's in_shardings, no mesh in context.
    auto_mesh = Mesh(np.array(pod.devices), ("batch",))
    auto_batch = NamedSharding(auto_mesh, P("batch"))
    rows = []
    all_wl = workloads()
    for name in args.workloads.split(","):
        wl = all_wl[name]
        inputs = make_inputs(wl)
        for dtype_name in args.dtypes.split(","):
            dtype = jnp.dtype(dtype_name)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                targets = [
                    ("chip", "auto", wl, one, None),
                    ("pod", "auto", pod_workload(wl), batch, mesh),
                ]
                if args.auto_sharding:
                    targets.append(("pod-auto", "auto", pod_workload(wl), auto_batch, None))
                if args.matmul and dtype_name == "float32":
                    targets.insert(1, ("chip", "matmul", wl, one, None))
                if args.pallas:
                    targets += [
                        ("chip", "pallas", wl, one, None),
                        ("pod", "pallas", pod_workload(wl), batch, mesh),
                    ]
                for target, method, w, sharding, m in targets:
                    fn = op_fn(w, method)
                    fn = with_backward(fn) if backward else fn
                    stats = compile_for(fn, specs_for(w, dtype, sharding), m)
                    row = {
                        "workload": name,
                        "dtype": dtype_name,
                        "mode": mode,
                        "target": target,
                        "method": method,
                        **stats,
                        "roofline_s": roofline_bytes(wl, dtype.itemsize, backward)
                        / HBM_BYTES_PER_S,
                        "output_bytes": int(np.prod(wl.output_shape())) * dtype.itemsize,
                        "features_bytes": sum(int(np.prod(s)) for s in wl.feature_shapes())
                        * dtype.itemsize,
                    }
                    if method == "auto":
                        moved = window_bytes(wl, inputs.boxes, dtype.itemsize, backward)
                        row["moved_s"] = moved / HBM_BYTES_PER_S
                    if method == "pallas" and not backward:
                        moved = pallas_bytes(wl, inputs.boxes, dtype.itemsize)
                        row["moved_s"] = moved / HBM_BYTES_PER_S
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


def cpu_times(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The window path against the CPU default (``gather``) on this CPU, same run."""
    rows = []
    all_wl = workloads()
    for name in args.workloads.split(","):
        wl = all_wl[name]
        inputs = make_inputs(wl)
        feats = tuple(jnp.asarray(f) for f in inputs.features)
        boxes = jnp.asarray(inputs.boxes)
        for backward in (False, True):
            times = {}
            for method in ("gather", "window"):
                fn = op_fn(wl, method)
                fn = jax.jit(with_backward(fn) if backward else fn)
                times[method] = time_fn(fn, feats, boxes, warmup=1, repeats=args.repeats)[
                    "median_ms"
                ]
            row = {"workload": name, "mode": "fwd+bwd" if backward else "fwd", **times}
            row["ratio"] = times["window"] / times["gather"]
            rows.append(row)
            print(
                f"CPU {name:16s} {row['mode']:8s} gather {times['gather']:9.1f} ms  "
                f"window {times['window']:9.1f} ms  window/gather {row['ratio']:.2f}x",
                flush=True,
            )
    return rows


def format_row(r: dict[str, Any]) -> str:
    ops = r["ops"]
    moved = r.get("moved_s")
    return (
        f"{r['workload']:16s} {r['dtype']:8s} {r['mode']:8s} {r['target']:4s} {r['method']:7s} "
        f"compile {r['compile_s']:6.1f} s  temp {r['temp_bytes'] / 2**20:8.1f} MiB "
        f"({r['temp_bytes'] / r['output_bytes']:.2f}x out)  "
        f"gather {ops['gather']} scatter {ops['scatter']} "
        f"collectives {sum(v for k, v in ops.items() if k not in ('gather', 'scatter'))}  "
        f"map copies in loops {r['map_copies']}  "
        f"cost model {r['optimal_s'] * 1e3:7.3f} ms  "
        + (f"moved {moved * 1e3:7.3f} ms  " if moved is not None else "")
        + f"roofline {r['roofline_s'] * 1e3:6.3f} ms"
    )


def markdown(rows: list[dict[str, Any]], cpu: list[dict[str, Any]]) -> str:
    lines = [
        "## TPU (compiled ahead of time for v5e with libtpu; no TPU hardware)",
        "",
        f"Date {datetime.date.today()}, host: {platform.machine()} {os.cpu_count()} cores, "
        f"jax {jax.__version__}, {_libtpu_version()}. `python -m benchmarks.tpu` "
        "(see its docstring). Per chip: one v5e chip holds the workload's 2 images; the pod "
        "is a v5e 4x4 (16 chips) with 32 images and their boxes sharded on the batch "
        "(explicit sharding, plain `jit`). `auto` is the window reader on TPU. *Cost model*: "
        "XLA's TPU estimate, which counts a loop's body once (for the window reader: one "
        "box); *moved*: the bytes the window reader moves for the workload's actual boxes "
        "at 819 GB/s (its windows, output and, backward, cotangent and gradient windows); "
        "*roofline*: features and output once (twice for fwd+bwd) at 819 GB/s.",
        "",
        "| workload | dtype | mode | target | method | compile (s) | temp (MiB) | temp / bound "
        "| gathers | scatters | collectives | cost model (ms) | moved (ms) | roofline (ms) "
        "| moved / roofline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ops = r["ops"]
        bound = r["output_bytes"] + (r["features_bytes"] if r["mode"] != "fwd" else 0)
        moved = r.get("moved_s")
        lines.append(
            f"| {r['workload']} | {r['dtype']} | {r['mode']} | {r['target']} | {r['method']} "
            f"| {r['compile_s']:.1f} | {r['temp_bytes'] / 2**20:.1f} "
            f"| {r['temp_bytes'] / bound:.2f} | {ops['gather']} | {ops['scatter']} "
            f"| {sum(v for k, v in ops.items() if k not in ('gather', 'scatter'))} "
            f"| {r['optimal_s'] * 1e3:.3f} | "
            + (f"{moved * 1e3:.3f}" if moved is not None else "-")
            + f" | {r['roofline_s'] * 1e3:.3f} | "
            + (f"{moved / r['roofline_s']:.2f}x" if moved is not None else "-")
            + " |"
        )
    if cpu:
        lines += [
            "",
            "The gather-free window path on this CPU against the CPU default (`gather`), "
            "float32, same run (median ms):",
            "",
            "| workload | mode | gather (ms) | window (ms) | window / gather |",
            "|---|---|---|---|---|",
        ]
        for r in cpu:
            lines.append(
                f"| {r['workload']} | {r['mode']} | {r['gather']:.1f} | {r['window']:.1f} "
                f"| {r['ratio']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return f"libtpu {version('libtpu')}"
    except Exception:  # pragma: no cover
        return "libtpu ?"


def main(argv: list[str] | None = None) -> int:
    names = ",".join(workloads())
    ap = argparse.ArgumentParser(prog="python -m benchmarks.tpu", description=__doc__)
    ap.add_argument("--workloads", default=names)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument(
        "--no-matmul",
        dest="matmul",
        action="store_false",
        help="skip the dense matmul path (the 'before' column)",
    )
    ap.add_argument(
        "--pallas", action="store_true", help="also compile implementation='pallas' (chip and pod)"
    )
    ap.add_argument(
        "--auto-sharding",
        action="store_true",
        help="also compile for the pod with plain jit and NamedSharding in_shardings",
    )
    ap.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU timings")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the Markdown section here")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    rows = run(args)
    cpu = cpu_times(args) if args.cpu else []
    text = markdown(rows, cpu)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
