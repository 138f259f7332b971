"""``python -m benchmarks``: jax_roialign vs torchvision vs the naive JAX port."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .harness import DTYPES, IMPLS, run_benchmarks, torch_status
from .report import render_results, write_markdown
from .workloads import workloads


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float | int | str | bool) or x is None:
        return x
    return str(x)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = list(workloads())
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Times jax_roialign (jit), torchvision.ops.roi_align (CPU, float32) and a "
        "naive JAX port side by side on Mask R-CNN FPN workloads, after checking that they "
        "agree; reports forward and forward+backward times, first compile time and XLA temp "
        "memory, and the op inside a loss, against the targets of issue 12.",
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer boxes and C=32 (1-3 min, mostly compiling)"
    )
    ap.add_argument(
        "--workloads", default=",".join(names), help=f"comma-separated subset of {names}"
    )
    ap.add_argument("--dtypes", default="float32,bfloat16", help=f"subset of {list(DTYPES)}")
    ap.add_argument(
        "--impls", default=",".join(IMPLS), help=f"subset of {list(IMPLS)} (default: all)"
    )
    ap.add_argument("--repeats", type=int, default=None, help="timed runs (default 7, quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 2, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    ap.add_argument(
        "--max-temp-gib",
        type=float,
        default=None,
        help="do not run an implementation whose compiled temp memory exceeds this many GiB "
        "(default: half the memory available at start)",
    )
    ap.add_argument("--out", default=None, help="write Markdown here, e.g. BENCHMARKS.md")
    ap.add_argument("--json", default=None, help="write every figure as JSON here")
    ap.add_argument(
        "--render",
        default=None,
        metavar="JSON",
        help="do not measure: re-render the tables (and --out) from a previous --json file",
    )
    args = ap.parse_args(argv)

    if args.render:
        with open(args.render) as fh:
            run = json.load(fh)
        print(render_results(run))
        if args.out:
            write_markdown(args.out, run, run.get("argv", argv))
            print(f"wrote {args.out}")
        return 0
    torch_status(args.threads)
    run = run_benchmarks(
        _split(args.workloads),
        _split(args.dtypes),
        quick=args.quick,
        impls=_split(args.impls),
        warmup=args.warmup,
        repeats=args.repeats,
        max_temp_bytes=None if args.max_temp_gib is None else args.max_temp_gib * 2**30,
    )
    run["argv"] = list(argv)
    print()
    print(render_results(run))
    if args.out:
        write_markdown(args.out, run, argv)
        print(f"wrote {args.out}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(run), fh, indent=1)
        print(f"wrote {args.json}")
    bad = [
        f"{r['workload']} [{r['dtype']}] {n}"
        for r in run["results"]
        for n, v in r["impls"].items()
        if str(v.get("status", "")).startswith(("mismatch", "error"))
    ]
    if bad:
        print("FAILED (mismatch or error): " + "; ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
