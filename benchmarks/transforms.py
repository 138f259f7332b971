"""``python -m benchmarks.transforms``: the op as programs use it, per workload.

For each workload and dtype, the default implementation, jitted:

* trace, lower and compile times of the forward, of forward+backward with the
  gradient of the features, and of forward+backward with the gradients of the
  features and the boxes (a VJP with the workload's cotangent), each compiled
  cold (``jax.clear_caches()`` first);
* their run times (median) and compiled temporaries;
* the op inside a loss: ``value_and_grad`` of ``sum(out * cot)`` w.r.t. the
  features and the boxes.

Only the public API is used, so the same file measures an older checkout
(``PYTHONPATH=/path/to/old/checkout python -m benchmarks.transforms``) for a
before/after table. Prints a markdown table; ``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .harness import DTYPES, jax_forward, machine_info, time_fn
from .workloads import make_inputs, workloads

DEFAULT = "box_p2,box_p4_adaptive,mask_p3,r50_c4,fpn_step"


def programs(fwd: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """The op alone, forward+backward (features; features and boxes), and a loss."""

    def features_grad(feats, boxes, cot):
        out, vjp = jax.vjp(lambda f: fwd(f, boxes), feats)
        return out, vjp(cot)[0]

    def both_grads(feats, boxes, cot):
        out, vjp = jax.vjp(fwd, feats, boxes)
        return out, vjp(cot)

    def loss_grads(feats, boxes, cot):
        def loss(f, b):
            return jnp.sum(fwd(f, b).astype(jnp.float32) * cot.astype(jnp.float32))

        return jax.value_and_grad(loss, argnums=(0, 1))(feats, boxes)

    return {
        "fwd": lambda feats, boxes, cot: fwd(feats, boxes),
        "f+b feat": features_grad,
        "f+b feat+box": both_grads,
        "loss v&g": loss_grads,
    }


def measure(fn: Callable[..., Any], args: tuple[Any, ...], repeats: int) -> dict[str, Any]:
    jax.clear_caches()
    jitted = jax.jit(fn)
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    temp = compiled.memory_analysis().temp_size_in_bytes
    timing = time_fn(compiled, *args, warmup=1, repeats=repeats)
    return {
        "trace_s": t1 - t0,
        "lower_s": t2 - t1,
        "compile_s": t3 - t2,
        "first_s": t3 - t0,
        "ms": timing["median_ms"],
        "temp_mib": temp / 2**20,
    }


def run(names: list[str], dtypes: list[str], repeats: int, quick: bool) -> list[dict[str, Any]]:
    rows = []
    all_wl = workloads(quick=quick)
    for name in names:
        wl = all_wl[name]
        inputs = make_inputs(wl)
        boxes = inputs.boxes if wl.multiscale else inputs.rois
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            feats = tuple(jnp.asarray(f, dtype) for f in inputs.features)
            cot = jnp.asarray(inputs.cotangent, dtype)
            args = (feats, jnp.asarray(boxes), cot)
            for kind, fn in programs(jax_forward(wl)).items():
                row = {"workload": name, "dtype": dtype_name, "program": kind}
                row.update(measure(fn, args, repeats))
                rows.append(row)
                print(_line(row), flush=True)
    return rows


def _line(r: dict[str, Any]) -> str:
    return (
        f"| {r['workload']} | {r['dtype']} | {r['program']} | {r['trace_s']:.2f} | "
        f"{r['lower_s']:.2f} | {r['compile_s']:.2f} | {r['first_s']:.2f} | {r['ms']:.1f} | "
        f"{r['temp_mib']:.1f} |"
    )


HEADER = (
    "| workload | dtype | program | trace (s) | lower (s) | compile (s) | first call (s) "
    "| run (ms) | temporaries (MiB) |\n|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=DEFAULT)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small boxes and channels")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores, jax {jax.__version__}")
    print(HEADER)
    rows = run(args.workloads.split(","), args.dtypes.split(","), args.repeats, args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1, default=float)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
