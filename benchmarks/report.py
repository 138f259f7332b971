"""Tables and BENCHMARKS.md from :func:`benchmarks.harness.run_benchmarks` results."""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from .harness import JAX, NAIVE, TORCH, geomean

# Issue 12's targets: (figure key, label, threshold); compile times must be strictly below.
TARGETS = (
    ("fwd_vs_torchvision", "forward <= 0.1x torchvision", 0.1),
    ("fwd_bwd_vs_torchvision", "forward+backward <= 0.06x torchvision", 0.06),
    ("temp_fwd_x", "temp memory fwd <= 1x output", 1.0),
    ("temp_fwd_bwd_x", "temp memory fwd+bwd <= 1x (features+output)", 1.0),
    ("compile_fwd_s", "first compile fwd < 1 s", 1.0),
    ("compile_fwd_bwd_s", "first compile fwd+bwd < 2 s", 2.0),
    ("loss_vs_fwd", "in a loss <= 1.5x alone", 1.5),
    ("loss_vg_vs_fwd_bwd", "value_and_grad of the loss <= 1.5x fwd+bwd", 1.5),
    ("temp_loss_extra_x", "temp in a loss <= alone + 1x output", 1.0),
)
_STRICT = {"compile_fwd_s", "compile_fwd_bwd_s"}


def _ms(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _r(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _status_note(impls: dict[str, Any], name: str) -> str:
    st = impls.get(name, {}).get("status", "absent")
    return "" if st == "ok" else st


def figure(res: dict[str, Any], key: str) -> float | None:
    """A target figure of one result: a ratio or a jax_roialign field."""
    if key in res.get("ratios", {}):
        return res["ratios"][key]
    return res["impls"].get(JAX, {}).get(key)


def met(key: str, value: float | None, threshold: float) -> bool | None:
    if value is None:
        return None
    return value < threshold if key in _STRICT else value <= threshold


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    sep = ["---" if i < 2 else "---:" for i in range(len(head))]
    return [_row(head), _row(sep)] + [_row(r) for r in rows]


def _dtypes(results: Sequence[dict[str, Any]]) -> list[str]:
    seen: list[str] = []
    for r in results:
        if r["dtype"] not in seen:
            seen.append(r["dtype"])
    return seen


def time_table(results: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "workload",
        "dtype",
        "jax fwd",
        "tv fwd",
        "naive fwd",
        "jax/tv",
        "jax/naive",
        "jax f+b",
        "tv f+b",
        "naive f+b",
        "jax/tv",
        "jax/naive",
    ]
    rows = []
    for r in results:
        im, ra = r["impls"], r["ratios"]
        rows.append(
            [
                r["workload"],
                r["dtype"],
                _ms(im.get(JAX, {}).get("fwd_ms")),
                _ms(im.get(TORCH, {}).get("fwd_ms")),
                _ms(im.get(NAIVE, {}).get("fwd_ms")),
                _r(ra["fwd_vs_torchvision"]),
                _r(ra["fwd_vs_naive"]),
                _ms(im.get(JAX, {}).get("fwd_bwd_ms")),
                _ms(im.get(TORCH, {}).get("fwd_bwd_ms")),
                _ms(im.get(NAIVE, {}).get("fwd_bwd_ms")),
                _r(ra["fwd_bwd_vs_torchvision"]),
                _r(ra["fwd_bwd_vs_naive"]),
            ]
        )
    for d in _dtypes(results):
        sel = [r for r in results if r["dtype"] == d]
        g = {k: geomean([r["ratios"][k] for r in sel]) for k in sel[0]["ratios"]}
        rows.append(
            [f"**geomean** ({len(sel)})", d, "", "", ""]
            + [f"**{_r(g['fwd_vs_torchvision'])}**", f"**{_r(g['fwd_vs_naive'])}**", "", "", ""]
            + [f"**{_r(g['fwd_bwd_vs_torchvision'])}**", f"**{_r(g['fwd_bwd_vs_naive'])}**"]
        )
    return _table(head, rows)


def compile_memory_table(results: Sequence[dict[str, Any]]) -> list[str]:
    head = [
        "workload",
        "dtype",
        "jax compile fwd (s)",
        "jax compile f+b (s)",
        "jax temp fwd (x out)",
        "jax temp f+b (x feat+out)",
        "naive compile fwd (s)",
        "naive temp fwd (x out)",
        "naive temp f+b (x feat+out)",
        "max abs diff vs ref fwd / grad",
    ]
    rows = []
    for r in results:
        j, n = r["impls"].get(JAX, {}), r["impls"].get(NAIVE, {})
        checks = []
        for k, v in r["check"].items():
            if isinstance(v, dict):
                who = k.split("_vs_")[0].replace("jax_roialign", "jax")
                checks.append(f"{who}: {v['fwd_max_abs']:.1e} / {v['grad_max_abs']:.1e}")
        rows.append(
            [
                r["workload"],
                r["dtype"],
                _r(j.get("compile_fwd_s")),
                _r(j.get("compile_fwd_bwd_s")),
                _x(j.get("temp_fwd_x")),
                _x(j.get("temp_fwd_bwd_x")),
                _r(n.get("compile_fwd_s")),
                _x(n.get("temp_fwd_x")),
                _x(n.get("temp_fwd_bwd_x")),
                "; ".join(checks) or "-",
            ]
        )
    return _table(head, rows)


def loss_table(results: Sequence[dict[str, Any]]) -> list[str]:
    """The op alone vs inside a reducing loss (and value_and_grad of it)."""
    head = [
        "workload",
        "dtype",
        "fwd (ms)",
        "in a loss (ms)",
        "loss / fwd",
        "f+b (ms)",
        "value_and_grad (ms)",
        "v&g / f+b",
        "temp fwd (x out)",
        "temp loss (x out)",
        "temp v&g (x feat+out)",
        "compile loss / v&g (s)",
    ]
    rows = []
    for r in results:
        j = r["impls"].get(JAX, {})
        if j.get("temp_loss_x") is None:
            continue
        compile_s = f"{_r(j.get('compile_loss_s'))} / {_r(j.get('compile_loss_vg_s'))}"
        rows.append(
            [
                r["workload"],
                r["dtype"],
                _ms(j.get("fwd_ms")),
                _ms(j.get("loss_ms")),
                _r(j.get("loss_vs_fwd")),
                _ms(j.get("fwd_bwd_ms")),
                _ms(j.get("loss_vg_ms")),
                _r(j.get("loss_vg_vs_fwd_bwd")),
                _x(j.get("temp_fwd_x")),
                _x(j.get("temp_loss_x")),
                _x(j.get("temp_loss_vg_x")),
                compile_s,
            ]
        )
    return _table(head, rows)


def target_table(results: Sequence[dict[str, Any]]) -> tuple[list[str], int, int]:
    head = ["workload", "dtype"] + [label for _, label, _ in TARGETS]
    rows, n_met, n_all = [], 0, 0
    for r in results:
        cells = [r["workload"], r["dtype"]]
        for key, _, thr in TARGETS:
            v = figure(r, key)
            ok = met(key, v, thr)
            if ok is None:
                cells.append("-")
                continue
            n_all += 1
            n_met += ok
            cells.append(f"{v:.2f} {'met' if ok else '**not met**'}")
        rows.append(cells)
    for d in _dtypes(results):
        sel = [r for r in results if r["dtype"] == d]
        cells = [f"**geomean** ({len(sel)})", d]
        for key, _, thr in TARGETS:
            g = geomean([figure(r, key) for r in sel])
            ok = met(key, g, thr)
            cells.append("-" if ok is None else f"{g:.2f} {'met' if ok else '**not met**'}")
        rows.append(cells)
    return _table(head, rows), n_met, n_all


def notes(results: Sequence[dict[str, Any]], skipped: Sequence[str]) -> list[str]:
    out = []
    for r in results:
        for name in (JAX, NAIVE, TORCH):
            s = _status_note(r["impls"], name)
            if s and s != "absent":
                out.append(f"- {r['workload']} [{r['dtype']}] {name}: {s}")
    out += [f"- {s}" for s in skipped]
    return out


def render_results(run: dict[str, Any], title_level: int = 2) -> str:
    """The results part (tables, targets, notes), as Markdown."""
    h = "#" * title_level
    res = run["results"]
    m = run["machine"]
    lines = []
    lines.append(f"{h} Times (ms, median)")
    lines.append("")
    tv = (
        f"torchvision {m.get('torchvision')} on CPU in float32, "
        f"torch threads = {m.get('torch_threads')} (it has no bf16 kernel, so bfloat16 rows "
        "divide by its float32 time)"
        if m.get("torchvision")
        else f"torchvision, not available here ({m.get('torch_unavailable_reason')})"
    )
    ref = "torchvision float32" if m.get("torchvision") else "the naive port"
    lines.append(
        f"jax = jax_roialign (jit, {m['jax_backend']}); tv = {tv}; naive = the straightforward "
        "JAX port (benchmarks/naive.py, every tap gathered). f+b = forward + gradient w.r.t. "
        "features of sum(out * cotangent). Ratios below 1 mean jax_roialign is faster."
    )
    lines.append("")
    lines += time_table(res)
    lines.append("")
    lines.append(f"{h} Compile time, XLA temp memory, agreement")
    lines.append("")
    lines.append(
        "First `jax.jit(f).lower(...).compile()` (trace + lower + compile) in seconds; temp = "
        "`memory_analysis().temp_size_in_bytes` as a multiple of the output's bytes (fwd) and of "
        "features + output bytes (f+b). Agreement (outputs and feature gradients) is checked "
        f"before timing against {ref} on the same (dtype-rounded) inputs."
    )
    lines.append("")
    lines += compile_memory_table(res)
    lines.append("")
    lt = loss_table(res)
    if len(lt) > 2:
        lines.append(f"{h} The op inside a loss")
        lines.append("")
        lines.append(
            "jax_roialign followed in the same jitted program by `sum(out * cotangent)` (float32), "
            "and `jax.value_and_grad` of that loss w.r.t. the features, against the op alone "
            "(fwd) and its output with its gradient (f+b). The op should cost the same whatever "
            "consumes it."
        )
        lines.append("")
        lines += lt
        lines.append("")
    tt, n_met, n_all = target_table(res)
    lines.append(f"{h} Targets (issue 12): {n_met} of {n_all} figures met")
    lines.append("")
    lines += tt
    lines.append("")
    n = notes(res, run.get("skipped", []))
    if n:
        lines.append(f"{h} Notes")
        lines.append("")
        lines += n
        lines.append("")
    return "\n".join(lines)


def render_markdown(run: dict[str, Any], argv: Sequence[str] | None = None) -> str:
    """The whole BENCHMARKS.md (without any preserved GPU section)."""
    m = run["machine"]
    argv = list(sys.argv[1:] if argv is None else argv)
    mem = m.get("memory_bytes")
    la0, la1 = m.get("loadavg"), run.get("loadavg_end")
    load = "unknown"
    if la0 is not None:
        load = f"{la0[0]:.2f} / {la0[1]:.2f} / {la0[2]:.2f} (1/5/15 min) at start"
        if la1 is not None:
            load += f", {la1[0]:.2f} / {la1[1]:.2f} / {la1[2]:.2f} at end"
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python -m benchmarks "
        + " ".join(shlex.quote(a) for a in argv)
        + "`"
        + (
            " (**quick mode: fewer boxes, C = 32; not the recorded figures**)"
            if run["quick"]
            else ""
        )
        + ". Edit the harness (`benchmarks/`), not the generated tables; the sections it does "
        "not generate (hand-written rounds, GPU) are kept below them.",
        "",
        f"- Date: {m['date']}",
        f"- Machine: {m['cpu']}, {m['cores']} cores"
        + (f", {mem / 2**30:.0f} GiB memory" if mem else ""),
        f"- Load average: {load}"
        + (
            f" -- **busy machine ({m['cores']} cores): timings are noisy, not for the record**"
            if max(la0[0] if la0 else 0.0, la1[0] if la1 else 0.0) > 0.5 * m["cores"]
            else ""
        ),
        f"- Versions: Python {m['python']}, jax {m['jax']}, jaxlib {m['jaxlib']}, "
        f"torch {m.get('torch') or 'n/a'}, torchvision {m.get('torchvision') or 'n/a'}, "
        f"numpy {m['numpy']}, jax_roialign {m['jax_roialign']}",
        f"- JAX backend: {m['jax_backend']} ({', '.join(m['jax_devices'])})",
        "",
        "## Workloads",
        "",
        "From `shared/workloads.md`: Mask R-CNN FPN on an 800 x 1344 input, 2 images, boxes "
        "spanning 14-28 cells on their level (sqrt of area), aspect ratio 0.5-2, inside the "
        "image, seed 0 (the FPN step draws each box's level uniformly from P2-P5). K counts the "
        "boxes of both images.",
        "",
    ]
    for name, wl in run["workloads"].items():
        from .workloads import Workload

        w = Workload(**{**wl, "levels": tuple(wl["levels"])})
        lines.append(f"- `{name}`: {w.title}: {w.shape_text()}")
    lines += ["", render_results(run)]
    return "\n".join(lines).rstrip() + "\n"


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _headings(text: str) -> tuple[list[str], list[tuple[int, int, str]]]:
    """The lines of ``text`` and its headings ``(line, depth, title)``, outside code fences."""
    lines = text.splitlines(keepends=True)
    heads: list[tuple[int, int, str]] = []
    fence = False
    for n, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fence = not fence
            continue
        mt = None if fence else _HEADING.match(line.rstrip("\n"))
        if mt:
            heads.append((n, len(mt.group(1)), mt.group(2)))
    return lines, heads


def _section(lines: list[str], heads: list[tuple[int, int, str]], i: int) -> str:
    """Heading ``i``'s section verbatim: to the next heading of its depth or above."""
    start, depth, _ = heads[i]
    end = next((h[0] for h in heads[i + 1 :] if h[1] <= depth), len(lines))
    return "".join(lines[start:end]).rstrip() + "\n"


def gpu_sections(text: str) -> list[str]:
    """Every section whose heading title starts with "GPU", verbatim (to its next peer heading)."""
    lines, heads = _headings(text)
    out, i = [], 0
    while i < len(heads):
        if re.match(r"GPU\b", heads[i][2]):
            out.append(_section(lines, heads, i))
            depth = heads[i][1]
            i += 1
            while i < len(heads) and heads[i][1] > depth:  # its subsections
                i += 1
        else:
            i += 1
    return out


def _sections(text: str, level: int = 2) -> list[tuple[str, str]]:
    """``(title, verbatim text)`` of each heading of ``level``, to the next heading
    of that level or above (its subsections included), outside code fences."""
    lines, heads = _headings(text)
    return [(h[2], _section(lines, heads, i)) for i, h in enumerate(heads) if h[1] == level]


def _key(title: str) -> str:
    """A section title without its varying tail (``Targets (issue 12): 41 of 90 ...``)."""
    return re.split(r"[(:]", title)[0].strip().lower()


def merge_kept(old: str, new: str) -> str:
    """``new`` (a rendered BENCHMARKS.md) followed by every ``##`` section of ``old``
    that the render does not produce: hand-written rounds and GPU sections are
    kept verbatim, in their order; generated sections are replaced."""
    generated = {_key(t) for t, _ in _sections(new)}
    kept = [body for t, body in _sections(old) if _key(t) not in generated]
    text = new.rstrip() + "\n"
    if kept:
        text += "\n" + "\n".join(kept)
    return text


def write_markdown(path: str, run: dict[str, Any], argv: Sequence[str] | None = None) -> str:
    """Writes BENCHMARKS.md: the rendered tables, then every section of an existing
    file that the render does not produce (hand-written rounds, GPU sections),
    verbatim (:func:`merge_kept`).

    On a GPU backend the results go into the ``## GPU`` section instead, and the
    rest of an existing file is kept.
    """
    try:
        with open(path) as fh:
            old = fh.read()
    except FileNotFoundError:
        old = ""
    if run["machine"]["jax_backend"] == "gpu":
        kept = gpu_sections(old)
        m = run["machine"]
        section = (
            "## GPU\n\n"
            f"{m['date']}, {', '.join(m['jax_devices'])}, jax {m['jax']}.\n\n"
            + render_results(run, title_level=3)
        )
        body = old
        for s in kept:
            body = body.replace(s, "")
        text = (body.rstrip() + "\n\n" if body.strip() else "# Benchmarks\n\n") + section
    else:
        text = merge_kept(old, render_markdown(run, argv))
    text = text.rstrip() + "\n"
    with open(path, "w") as fh:
        fh.write(text)
    return text
