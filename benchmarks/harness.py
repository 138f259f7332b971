"""Measurements: jax_roialign vs torchvision (CPU) vs the naive JAX port, in one process.

Importable from a notebook::

    from benchmarks.harness import time_fn, workloads, run_workload, run_benchmarks, run_sweep

Every figure is a plain number in a plain dict (times in milliseconds, compile
times in seconds, memory in bytes and as multiples), so results can be tabled,
plotted or dumped to JSON as they are.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jax_roialign

from .naive import grid_caps, naive_multiscale_roi_align, naive_roi_align
from .workloads import (
    IMAGE_SIZE,
    LEVELS,
    Inputs,
    Workload,
    level_boxes,
    make_inputs,
    rois_from_boxes,
    workloads,
)

__all__ = [
    "IMPLS",
    "TorchUnavailable",
    "compile_stats",
    "machine_info",
    "run_benchmarks",
    "run_sweep",
    "run_workload",
    "time_fn",
    "torch_status",
    "workloads",
]

JAX = "jax_roialign"
NAIVE = "naive"
TORCH = "torchvision"
IMPLS = (JAX, NAIVE, TORCH)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# ---------------------------------------------------------------------------
# Timing, compiling, memory
# ---------------------------------------------------------------------------


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_fn(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float | None = 30.0,
    sync: Callable[[Any], Any] = _block,
) -> dict[str, Any]:
    """Median wall time of ``sync(fn(*args))`` after ``warmup`` calls.

    ``repeats`` is lowered (to no fewer than 3) when the warm-up shows that
    the runs would take longer than ``max_seconds`` in all. Returns
    ``{"median_ms", "min_ms", "runs_ms", "repeats"}``.
    """
    last = 0.0
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        sync(fn(*args))
        last = time.perf_counter() - t0
    n = repeats
    if max_seconds is not None and last > 0:
        n = max(min(repeats, int(max_seconds / last)), min(3, repeats))
    runs = []
    for _ in range(n):
        t0 = time.perf_counter()
        sync(fn(*args))
        runs.append(time.perf_counter() - t0)
    ms = [r * 1e3 for r in runs]
    return {
        "median_ms": statistics.median(ms),
        "min_ms": min(ms),
        "runs_ms": ms,
        "repeats": n,
    }


def compile_stats(fn: Callable[..., Any], *args: Any, cold: bool = True) -> dict[str, Any]:
    """First lower + compile of ``jax.jit(fn)`` at ``args``, timed, with XLA's memory analysis.

    ``cold`` clears JAX's in-memory caches first (``jax.clear_caches()``), so
    that helpers traced and compiled by an earlier measurement are not reused:
    the figure is what a fresh process pays (less imports and backend start-up).
    Returns ``{"compiled", "lower_s", "compile_s", "total_s", "temp_bytes",
    "argument_bytes", "output_bytes"}`` (memory fields ``None`` when the
    backend reports none).
    """
    if cold:
        jax.clear_caches()
    t0 = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = None
    try:
        mem = compiled.memory_analysis()
    except Exception:  # pragma: no cover - backend without memory analysis
        mem = None

    def field(name: str) -> int | None:
        v = getattr(mem, name, None) if mem is not None else None
        return int(v) if v is not None else None

    return {
        "compiled": compiled,
        "lower_s": t1 - t0,
        "compile_s": t2 - t1,
        "total_s": t2 - t0,
        "temp_bytes": field("temp_size_in_bytes"),
        "argument_bytes": field("argument_size_in_bytes"),
        "output_bytes": field("output_size_in_bytes"),
    }


def _nbytes(x: Any) -> int:
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(x)))


# ---------------------------------------------------------------------------
# torchvision (optional)
# ---------------------------------------------------------------------------


class TorchUnavailable(RuntimeError):
    """torch or torchvision cannot be imported."""


_TORCH_STATE: dict[str, Any] = {}


def torch_status(threads: int | None = None) -> dict[str, Any]:
    """Imports torch + torchvision once; ``{"available", "reason", "threads", versions}``.

    Sets ``torch.set_num_threads`` to ``threads`` (default: the cores this
    process may use).
    """
    if "available" not in _TORCH_STATE:
        try:
            import torch
            import torchvision  # noqa: F401
            import torchvision.ops  # noqa: F401

            _TORCH_STATE.update(
                available=True,
                reason="",
                torch=torch.__version__,
                torchvision=torchvision.__version__,
            )
        except Exception as e:  # any import failure: skip the column, never fail
            _TORCH_STATE.update(available=False, reason=f"{type(e).__name__}: {e}")
    if _TORCH_STATE["available"]:
        import torch

        n = threads or _cores()
        torch.set_num_threads(n)
        _TORCH_STATE["threads"] = torch.get_num_threads()
    return dict(_TORCH_STATE)


class TorchCase:
    """torchvision on CPU for one workload: NCHW float32 tensors, ready to run."""

    def __init__(self, wl: Workload, features: Sequence[np.ndarray], inputs: Inputs):
        if not torch_status().get("available"):
            raise TorchUnavailable(_TORCH_STATE.get("reason", "torch not importable"))
        import torch
        import torchvision.ops as tvops

        self.torch = torch
        self.wl = wl
        self.feats = [
            torch.from_numpy(np.ascontiguousarray(np.asarray(f, np.float32).transpose(0, 3, 1, 2)))
            for f in features
        ]
        self.cot = torch.from_numpy(np.ascontiguousarray(inputs.cotangent.transpose(0, 3, 1, 2)))
        if wl.multiscale:
            names = list(wl.levels)
            pool = tvops.MultiScaleRoIAlign(names, wl.output_size, wl.sampling_ratio)
            boxes = [torch.from_numpy(b.copy()) for b in inputs.boxes]
            shapes = [IMAGE_SIZE] * wl.images

            def op(feats):
                return pool(dict(zip(names, feats, strict=True)), boxes, shapes)

        else:
            rois = torch.from_numpy(inputs.rois.copy())
            scale = wl.spatial_scales()[0]

            def op(feats):
                return tvops.roi_align(
                    feats[0],
                    rois,
                    wl.output_size,
                    spatial_scale=scale,
                    sampling_ratio=wl.sampling_ratio,
                    aligned=wl.aligned,
                )

        self.op = op
        self.leaves = [f.clone().requires_grad_(True) for f in self.feats]

    def forward(self):
        with self.torch.no_grad():
            return self.op(self.feats)

    def forward_backward(self):
        for leaf in self.leaves:
            leaf.grad = None
        out = self.op(self.leaves)
        out.backward(self.cot)
        return [leaf.grad for leaf in self.leaves]

    def outputs(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """Forward output (NHWC) and the feature gradients (NHWC), as numpy."""
        out = self.forward().numpy().transpose(0, 2, 3, 1)
        grads = [g.numpy().transpose(0, 2, 3, 1) for g in self.forward_backward()]
        return out, grads


def _no_sync(x: Any) -> Any:
    return x


# ---------------------------------------------------------------------------
# The JAX implementations
# ---------------------------------------------------------------------------


def has_multiscale() -> bool:
    return hasattr(jax_roialign, "multiscale_roi_align")


def jax_forward(wl: Workload) -> Callable[[tuple[Any, ...], Any], Any]:
    """``fn(features_tuple, boxes) -> [K, P, P, C]`` with jax_roialign.

    Boxes are ``[K, 5]`` for one level and ``[N, R, 4]`` for the FPN step.
    """
    p = wl.output_size
    if wl.multiscale:
        op = jax_roialign.multiscale_roi_align  # type: ignore[attr-defined]

        def fwd(feats, boxes):
            out = op(
                list(feats),
                boxes,
                output_size=p,
                spatial_scales=wl.spatial_scales(),
                sampling_ratio=wl.sampling_ratio,
                aligned=wl.aligned,
                level_mapper="torchvision",
            )
            return out.reshape((-1,) + out.shape[-3:])

        return fwd
    scale = wl.spatial_scales()[0]

    def fwd(feats, boxes):
        return jax_roialign.roi_align(
            feats[0],
            boxes,
            output_size=p,
            spatial_scale=scale,
            sampling_ratio=wl.sampling_ratio,
            aligned=wl.aligned,
        )

    return fwd


def naive_forward(wl: Workload, rois: np.ndarray) -> Callable[[tuple[Any, ...], Any], Any]:
    """``fn(features_tuple, rois5) -> [K, P, P, C]`` with the naive port (caps from ``rois``)."""
    scales = wl.spatial_scales()
    caps = None
    if wl.sampling_ratio <= 0:
        caps = [grid_caps(rois, wl.output_size, s, wl.aligned) for s in scales]
    if wl.multiscale:

        def fwd(feats, boxes):
            return naive_multiscale_roi_align(
                list(feats),
                boxes,
                output_size=wl.output_size,
                spatial_scales=scales,
                sampling_ratio=wl.sampling_ratio,
                aligned=wl.aligned,
                grid_caps=caps,
            )

        return fwd

    def fwd(feats, boxes):
        return naive_roi_align(
            feats[0],
            boxes,
            output_size=wl.output_size,
            spatial_scale=scales[0],
            sampling_ratio=wl.sampling_ratio,
            aligned=wl.aligned,
            grid_cap=None if caps is None else caps[0],
        )

    return fwd


def forward_backward(fwd: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """``g(features, boxes, cot) -> (out, grad)``: the output and the gradient of
    ``sum(fwd(features) * cot)`` w.r.t. the features, as in a training step (the
    output is returned so that XLA cannot drop the forward: the feature gradient
    of a linear op does not need it, and torchvision's timing includes it)."""

    def g(feats, boxes, cot):
        out, vjp = jax.vjp(lambda f: fwd(f, boxes), feats)
        return out, vjp(cot)[0]

    return g


def reducing_loss(fwd: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """``loss(features, boxes, cot) = sum(fwd(features) * cot)`` in float32: the op
    followed, in the same program, by a reduction of its output (any loss on the
    pooled features). The op should cost there what it costs alone."""

    def loss(feats, boxes, cot):
        out = fwd(feats, boxes).astype(jnp.float32)
        return jnp.sum(out * cot.astype(jnp.float32))

    return loss


def loss_value_and_grad(fwd: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    """``jax.value_and_grad`` of :func:`reducing_loss` w.r.t. the features."""
    loss = reducing_loss(fwd)

    def vg(feats, boxes, cot):
        return jax.value_and_grad(lambda f: loss(f, boxes, cot))(feats)

    return vg


# ---------------------------------------------------------------------------
# One workload
# ---------------------------------------------------------------------------


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0))


def _agree(got: Any, ref: Any, dtype_name: str, grad: bool) -> tuple[float, float, bool]:
    """Max abs difference over arrays, the same over the reference's largest
    magnitude, and whether it is within tolerance.

    float32: 1e-4 relative to the reference's largest magnitude (summation order);
    bfloat16: 2^-7 (one bf16 ulp) of each value for outputs, 2^-5 of the largest
    magnitude for gradients (a transpose may accumulate in bf16); a wrong tap
    or weight is off by far more.
    """
    diff, ok, scale = 0.0, True, 0.0
    for g, r in zip(got, ref, strict=True):
        g64, r64 = np.asarray(g, np.float64), np.asarray(r, np.float64)
        d = np.abs(g64 - r64)
        big = float(np.max(np.abs(r64), initial=0.0))
        if dtype_name == "float32":
            tol = 1e-4 * max(big, 1.0)
            good = bool(np.all(d <= tol))
        elif grad:
            good = bool(np.all(d <= 2.0**-5 * max(big, 1.0)))
        else:
            good = bool(np.all(d <= 2.0**-7 * np.abs(r64) + 1e-3))
        good = good and bool(np.all(np.isfinite(g64)))
        diff = max(diff, float(np.max(d, initial=0.0)))
        scale = max(scale, big)
        ok = ok and good
    return diff, diff / max(scale, 1e-30), ok


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def default_temp_limit() -> float:
    """Half the memory available now (``MemAvailable``), or 6 GiB where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable"):
                    return int(line.split()[1]) * 1024 / 2
    except OSError:
        pass
    return 6 * 2**30


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB"


def run_workload(
    wl: Workload,
    dtype_name: str = "float32",
    *,
    inputs: Inputs | None = None,
    impls: Sequence[str] = IMPLS,
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 30.0,
    max_temp_bytes: float | None = None,
    torch_cache: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Checks and times one workload in one dtype; returns a plain dict.

    Steps: compile (timed, with XLA memory analysis) the forward and the
    forward+backward of each JAX implementation; run each once and compare
    outputs and feature gradients with torchvision (float32 on the same,
    dtype-rounded inputs; the naive port when torch is missing); then time only
    what agreed. An implementation whose compiled temp memory exceeds
    ``max_temp_bytes`` is not run (``status`` says so). torchvision runs in
    float32 only (it has no bf16 kernel); its timings are cached in
    ``torch_cache`` across dtypes.
    """
    if inputs is None:
        inputs = make_inputs(wl)
    if max_temp_bytes is None:
        max_temp_bytes = default_temp_limit()
    dt = DTYPES[dtype_name]
    feats = tuple(jnp.asarray(f, dt) for f in inputs.features)
    feats_np = [np.asarray(f.astype(jnp.float32)) for f in feats]  # the rounded inputs
    cot = jnp.asarray(inputs.cotangent, dt)
    rois = jnp.asarray(inputs.rois)
    out_bytes = _nbytes(jax.ShapeDtypeStruct(wl.output_shape(), dt))
    feat_bytes = _nbytes(feats)
    result: dict[str, Any] = {
        "workload": wl.name,
        "title": wl.title,
        "shape": wl.shape_text(),
        "dtype": dtype_name,
        "output_bytes": out_bytes,
        "features_bytes": feat_bytes,
        "impls": {},
        "check": {},
    }
    log(f"== {wl.name} [{dtype_name}] {wl.shape_text()}")

    # -- build and compile --
    jax_impls: dict[str, tuple[Callable, Any]] = {}
    if JAX in impls:
        if wl.multiscale and not has_multiscale():
            result["impls"][JAX] = {"status": "skipped: jax_roialign.multiscale_roi_align missing"}
        else:
            jax_impls[JAX] = (jax_forward(wl), jnp.asarray(inputs.boxes) if wl.multiscale else rois)
    if NAIVE in impls:
        jax_impls[NAIVE] = (naive_forward(wl, inputs.rois), rois)

    compiled: dict[str, dict[str, Any]] = {}
    for name, (fwd, boxes) in jax_impls.items():
        rec: dict[str, Any] = {"status": "ok"}
        try:
            cf = compile_stats(fwd, feats, boxes)
            cb = compile_stats(forward_backward(fwd), feats, boxes, cot)
        except Exception as e:
            rec["status"] = f"error: {type(e).__name__}: {e}"[:300]
            log(f"   {name}: {rec['status']}")
            result["impls"][name] = rec
            continue
        rec.update(
            compile_fwd_s=cf["total_s"],
            compile_fwd_bwd_s=cb["total_s"],
            temp_fwd_bytes=cf["temp_bytes"],
            temp_fwd_bwd_bytes=cb["temp_bytes"],
            temp_fwd_x=None if cf["temp_bytes"] is None else cf["temp_bytes"] / out_bytes,
            temp_fwd_bwd_x=(
                None if cb["temp_bytes"] is None else cb["temp_bytes"] / (feat_bytes + out_bytes)
            ),
        )
        log(
            f"   {name}: compile fwd {cf['total_s']:.2f} s, fwd+bwd {cb['total_s']:.2f} s; "
            f"temp fwd {_x(rec['temp_fwd_x'])} output, "
            f"fwd+bwd {_x(rec['temp_fwd_bwd_x'])} (features+output)"
        )
        worst = max(cf["temp_bytes"] or 0, cb["temp_bytes"] or 0)
        entry = {"fwd": cf["compiled"], "bwd": cb["compiled"], "boxes": boxes}
        if name == JAX and worst <= max_temp_bytes:
            # The op inside a loss, and value_and_grad of that loss.
            try:
                cl = compile_stats(reducing_loss(fwd), feats, boxes, cot)
                cv = compile_stats(loss_value_and_grad(fwd), feats, boxes, cot)
            except Exception as e:
                log(f"   {name}: loss: error: {type(e).__name__}: {e}"[:300])
            else:
                rec.update(
                    compile_loss_s=cl["total_s"],
                    compile_loss_vg_s=cv["total_s"],
                    temp_loss_bytes=cl["temp_bytes"],
                    temp_loss_vg_bytes=cv["temp_bytes"],
                    temp_loss_x=None if cl["temp_bytes"] is None else cl["temp_bytes"] / out_bytes,
                    temp_loss_extra_x=(
                        None
                        if cl["temp_bytes"] is None or cf["temp_bytes"] is None
                        else (cl["temp_bytes"] - cf["temp_bytes"]) / out_bytes
                    ),
                    temp_loss_vg_x=(
                        None
                        if cv["temp_bytes"] is None
                        else cv["temp_bytes"] / (feat_bytes + out_bytes)
                    ),
                )
                log(
                    f"   {name}: in a loss: temp {_x(rec['temp_loss_x'])} output, "
                    f"value_and_grad {_x(rec['temp_loss_vg_x'])} (features+output)"
                )
                worst = max(worst, cl["temp_bytes"] or 0, cv["temp_bytes"] or 0)
                entry.update(loss=cl["compiled"], loss_vg=cv["compiled"])
        if worst > max_temp_bytes:
            rec["status"] = f"skipped: needs {_gib(worst)} temp memory"
            log(f"   {name}: {rec['status']} (limit {_gib(max_temp_bytes)})")
        else:
            compiled[name] = entry
        result["impls"][name] = rec

    # -- agreement --
    outs: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for name, c in compiled.items():
        try:
            o = c["fwd"](feats, c["boxes"])
            _, g = c["bwd"](feats, c["boxes"], cot)
            outs[name] = ([np.asarray(o.astype(jnp.float32))], [np.asarray(x) for x in g])
        except Exception as e:
            result["impls"][name]["status"] = f"error: {type(e).__name__}: {e}"[:300]
            log(f"   {name}: {result['impls'][name]['status']}")
    for name in [n for n in compiled if n not in outs]:
        compiled.pop(name)
    torch_case = None
    if TORCH in impls:
        if not torch_status().get("available"):
            result["impls"][TORCH] = {"status": f"skipped: {_TORCH_STATE['reason']}"}
        else:
            torch_case = TorchCase(wl, feats_np, inputs)
            # the cotangent rounded like the JAX one
            torch_case.cot = torch_case.torch.from_numpy(
                np.ascontiguousarray(np.asarray(cot.astype(jnp.float32)).transpose(0, 3, 1, 2))
            )
            o, g = torch_case.outputs()
            outs[TORCH] = ([o], g)
    ref_name = TORCH if TORCH in outs else (NAIVE if NAIVE in outs else None)
    result["check"]["reference"] = ref_name
    if ref_name is None or len(outs) < 2:
        log("   check: nothing to compare with; timings below are unchecked")
    if ref_name is not None:
        ref = outs[ref_name]
        for name, (o, g) in outs.items():
            if name == ref_name:
                continue
            d_out, r_out, ok_out = _agree(o, ref[0], dtype_name, grad=False)
            d_grad, r_grad, ok_grad = _agree(g, ref[1], dtype_name, grad=True)
            result["check"][f"{name}_vs_{ref_name}"] = {
                "fwd_max_abs": d_out,
                "fwd_max_rel": r_out,
                "grad_max_abs": d_grad,
                "grad_max_rel": r_grad,
                "ok": ok_out and ok_grad,
            }
            log(
                f"   check {name} vs {ref_name} ({'float32' if ref_name == TORCH else dtype_name}"
                f" on the same inputs): max |diff| fwd {d_out:.3g} ({r_out:.1e} of max |ref|), "
                f"grad {d_grad:.3g} ({r_grad:.1e}) -> {'ok' if ok_out and ok_grad else 'MISMATCH'}"
            )
            if not (ok_out and ok_grad):
                result["impls"][name]["status"] = "mismatch: not timed"
                compiled.pop(name, None)
    # -- timing --
    kw = dict(warmup=warmup, repeats=repeats, max_seconds=max_seconds)
    for name, c in compiled.items():
        rec = result["impls"][name]
        f, b, boxes = c["fwd"], c["bwd"], c["boxes"]
        tf = time_fn(f, feats, boxes, **kw)
        tb = time_fn(b, feats, boxes, cot, **kw)
        rec.update(
            fwd_ms=tf["median_ms"], fwd_bwd_ms=tb["median_ms"], timing={"fwd": tf, "bwd": tb}
        )
        log(f"   {name}: fwd {tf['median_ms']:.2f} ms, fwd+bwd {tb['median_ms']:.2f} ms")
        if "loss" in c:
            tl = time_fn(c["loss"], feats, boxes, cot, **kw)
            tv = time_fn(c["loss_vg"], feats, boxes, cot, **kw)
            rec.update(
                loss_ms=tl["median_ms"],
                loss_vg_ms=tv["median_ms"],
                loss_vs_fwd=tl["median_ms"] / tf["median_ms"],
                loss_vg_vs_fwd_bwd=tv["median_ms"] / tb["median_ms"],
            )
            rec["timing"].update(loss=tl, loss_vg=tv)
            log(
                f"   {name}: in a loss {tl['median_ms']:.2f} ms "
                f"({rec['loss_vs_fwd']:.2f}x fwd), value_and_grad {tv['median_ms']:.2f} ms "
                f"({rec['loss_vg_vs_fwd_bwd']:.2f}x fwd+bwd)"
            )
    if torch_case is not None:
        key = wl.name
        cached = (torch_cache or {}).get(key)
        if cached is None:
            tf = time_fn(torch_case.forward, sync=_no_sync, **kw)
            tb = time_fn(torch_case.forward_backward, sync=_no_sync, **kw)
            cached = {
                "status": "ok",
                "dtype": "float32",
                "threads": _TORCH_STATE.get("threads"),
                "fwd_ms": tf["median_ms"],
                "fwd_bwd_ms": tb["median_ms"],
                "timing": {"fwd": tf, "bwd": tb},
            }
            if torch_cache is not None:
                torch_cache[key] = cached
            log(
                f"   {TORCH} (float32): fwd {tf['median_ms']:.2f} ms, "
                f"fwd+bwd {tb['median_ms']:.2f} ms"
            )
        result["impls"][TORCH] = dict(cached)
    result["ratios"] = _ratios(result["impls"])
    return result


def _ratios(impls: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = impls.get(a, {}).get(key), impls.get(b, {}).get(key)
        return None if x is None or y is None or y <= 0 else x / y

    return {
        "fwd_vs_torchvision": ratio(JAX, TORCH, "fwd_ms"),
        "fwd_bwd_vs_torchvision": ratio(JAX, TORCH, "fwd_bwd_ms"),
        "fwd_vs_naive": ratio(JAX, NAIVE, "fwd_ms"),
        "fwd_bwd_vs_naive": ratio(JAX, NAIVE, "fwd_bwd_ms"),
    }


def geomean(values: Sequence[float | None]) -> float | None:
    v = [x for x in values if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(math.log(x) for x in v) / len(v)) if v else None


# ---------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load, and the versions that matter."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    import jaxlib

    ts = torch_status()
    return {
        "cpu": cpu,
        "cores": _cores(),
        "memory_bytes": mem,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": sys.version.split()[0],
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
        "jax_roialign": getattr(jax_roialign, "__version__", "?"),
        "torch": ts.get("torch"),
        "torchvision": ts.get("torchvision"),
        "torch_threads": ts.get("threads"),
        "torch_unavailable_reason": ts.get("reason") or None,
        "numpy": np.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def warm_backend() -> None:
    """Compiles and runs a trivial function so backend start-up is not charged to a workload."""
    jax.block_until_ready(jax.jit(lambda x: x * 2 + 1)(jnp.ones(8)))


def run_benchmarks(
    names: Sequence[str] | None = None,
    dtypes: Sequence[str] = ("float32", "bfloat16"),
    *,
    quick: bool = False,
    impls: Sequence[str] = IMPLS,
    warmup: int | None = None,
    repeats: int | None = None,
    max_temp_bytes: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the chosen workloads (all by default) in each dtype.

    Returns ``{"machine", "quick", "results": [run_workload dicts], "skipped": [...],
    "loadavg_end"}``.
    """
    all_wl = workloads(quick)
    names = list(names) if names else list(all_wl)
    unknown = [n for n in names if n not in all_wl]
    if unknown:
        raise ValueError(f"unknown workloads {unknown}; choose from {list(all_wl)}")
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; choose from {list(DTYPES)}")
    if max_temp_bytes is None:
        max_temp_bytes = default_temp_limit()
    log(f"implementations needing more than {_gib(max_temp_bytes)} of temp memory are not run")
    warmup = warmup if warmup is not None else (1 if quick else 2)
    repeats = repeats if repeats is not None else (3 if quick else 7)
    machine = machine_info()
    if TORCH in impls and not torch_status().get("available"):
        log(
            "torchvision column skipped: cannot import torch/torchvision "
            f"({_TORCH_STATE['reason']})"
        )
    elif TORCH in impls:
        log(
            f"torchvision {machine['torchvision']} on CPU, "
            f"torch threads = {machine['torch_threads']}"
        )
    warm_backend()
    results, skipped = [], []
    torch_cache: dict[str, Any] = {}
    for name in names:
        wl = all_wl[name]
        if wl.multiscale and not has_multiscale():
            msg = f"{name}: skipped, jax_roialign.multiscale_roi_align does not exist yet"
            log(msg)
            skipped.append(msg)
            continue
        inputs = make_inputs(wl)
        for d in dtypes:
            results.append(
                run_workload(
                    wl,
                    d,
                    inputs=inputs,
                    impls=impls,
                    warmup=warmup,
                    repeats=repeats,
                    max_temp_bytes=max_temp_bytes,
                    torch_cache=torch_cache,
                    log=log,
                )
            )
    return {
        "machine": machine,
        "quick": quick,
        "workloads": {n: dataclasses.asdict(all_wl[n]) for n in names},
        "results": results,
        "skipped": skipped,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------
# Sweeps (for the notebooks)
# ---------------------------------------------------------------------------


def run_sweep(
    box_counts: Sequence[int] = (16, 64, 256, 1024),
    sampling_ratios: Sequence[int] = (1, 2, 3, 4, 0),
    *,
    level: str = "P3",
    channels: int = 64,
    output_size: int = 7,
    boxes_for_ratio_sweep: int = 128,
    sampling_ratio: int = 2,
    aligned: bool = True,
    backward: bool = False,
    impls: Sequence[str] = IMPLS,
    warmup: int = 1,
    repeats: int = 3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Time vs number of boxes and vs sampling ratio, for each implementation.

    One level (``level``, 2 images, ``channels`` channels), boxes realistic for
    the level. The box sweep uses ``sampling_ratio``; the ratio sweep uses
    ``boxes_for_ratio_sweep`` boxes (0 = adaptive). ``backward`` times
    forward+backward instead of the forward. Results are not checked against
    each other (the main harness does that). Returns plain dicts::

        {"by_boxes": {"x": [...], "x_label": ..., "ms": {impl: [...]}},
         "by_sampling_ratio": {...}, "meta": {...}}

    with ``None`` where an implementation is unavailable.
    """
    h, w, stride = LEVELS[level]
    rng = np.random.default_rng(seed)
    feats_np = rng.standard_normal((2, h, w, channels), dtype=np.float32)
    feats = (jnp.asarray(feats_np),)
    have_torch = TORCH in impls and torch_status().get("available", False)

    def point(k: int, sr: int) -> dict[str, float | None]:
        wl = Workload("sweep", "sweep", (level,), k // 2, output_size, sr, aligned, channels)
        boxes = level_boxes(np.random.default_rng(seed + k), wl.num_boxes, stride)
        boxes = boxes.reshape(2, k // 2, 4)
        rois_np = rois_from_boxes(boxes)
        rois = jnp.asarray(rois_np)
        cot_np = rng.standard_normal(wl.output_shape(), dtype=np.float32)
        inputs = Inputs([feats_np], boxes, rois_np, cot_np)
        cot = jnp.asarray(cot_np)
        res: dict[str, float | None] = {}
        for name in (JAX, NAIVE):
            if name not in impls:
                continue
            fwd = jax_forward(wl) if name == JAX else naive_forward(wl, rois_np)
            if backward:
                f = jax.jit(forward_backward(fwd))
                t = time_fn(f, feats, rois, cot, warmup=warmup, repeats=repeats)
            else:
                f = jax.jit(fwd)
                t = time_fn(f, feats, rois, warmup=warmup, repeats=repeats)
            res[name] = t["median_ms"]
        if TORCH in impls:
            res[TORCH] = None
            if have_torch:
                tc = TorchCase(wl, [feats_np], inputs)
                fn = tc.forward_backward if backward else tc.forward
                res[TORCH] = time_fn(fn, sync=_no_sync, warmup=warmup, repeats=repeats)["median_ms"]
        if log:
            log(f"   sweep K={k} sampling={sr}: " + ", ".join(f"{n} {v}" for n, v in res.items()))
        return res

    def collect(points: list[dict[str, float | None]]) -> dict[str, list[float | None]]:
        return {n: [p.get(n) for p in points] for n in impls}

    warm_backend()
    by_boxes = [point(int(k) // 2 * 2, sampling_ratio) for k in box_counts]
    by_ratio = [point(boxes_for_ratio_sweep, int(sr)) for sr in sampling_ratios]
    return {
        "by_boxes": {
            "x": [int(k) // 2 * 2 for k in box_counts],
            "x_label": f"boxes K (2 images, sampling_ratio {sampling_ratio})",
            "ms": collect(by_boxes),
        },
        "by_sampling_ratio": {
            "x": [int(s) for s in sampling_ratios],
            "x_label": f"sampling_ratio (0 = adaptive; K = {boxes_for_ratio_sweep})",
            "ms": collect(by_ratio),
        },
        "meta": {
            "level": level,
            "map": [2, h, w, channels],
            "output_size": output_size,
            "aligned": aligned,
            "backward": backward,
            "unit": "ms (median)",
            "torch_threads": _TORCH_STATE.get("threads") if have_torch else None,
        },
    }
