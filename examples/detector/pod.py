"""``python -m examples.detector.pod``: the train step with the batch sharded over devices.

The same train step as ``python -m examples.detector``, with parameters and
optimizer state replicated and the batch (images, boxes, classes, masks)
sharded on its first axis, in two styles:

* **explicit**: the README's pod recipe, a mesh with ``AxisType.Explicit``
  axes set with ``jax.set_mesh`` and the inputs typed as batch-sharded; plain
  ``jax.jit``. jax_roialign sees the sharded batch in the maps' type and pools
  each device's own images.
* **automatic**: plain ``jax.jit`` with ``NamedSharding`` ``in_shardings`` on
  a mesh of default (automatic) axes, as most training code does; XLA's SPMD
  partitioner decides the rest.

For each, it compiles the step ahead of time for a TPU v5e 4x4 pod (16 chips,
``--images-per-chip`` images each; libtpu's compiler, no TPU needed) and
reports per-chip memory and every collective in the program, with its
size and whether it comes from pooling (the ops under the model's
``box_pool``, ``mask_pool`` and ``target_pool`` scopes). Then it runs both on 8
CPU devices (``--xla_force_host_platform_device_count=8``, set here unless
``XLA_FLAGS`` is set) and checks the losses against one device.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from .data import make_scenes  # noqa: E402
from .model import Config  # noqa: E402
from .train import Trainer, create, make_train_step, to_batch  # noqa: E402

POOL_SCOPES = ("box_pool", "mask_pool", "target_pool")
_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+ = (?P<shape>.+?) "
    r"(?P<kind>all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)"
    r"(?:-start)?\("
)
_ARRAY = re.compile(r"\b(pred|[a-z]+\d+)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2}


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program."""

    kind: str
    shape: str
    bytes: int
    op_name: str

    @property
    def pooling(self) -> bool:
        return any(scope in self.op_name for scope in POOL_SCOPES)


def _bytes(shape: str) -> int:
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
        total += size * _ITEMSIZE.get(dtype, 8 if dtype.endswith("64") else 4)
    return total


def collectives(hlo_text: str) -> list[Collective]:
    """The collectives of a compiled HLO module (an async pair counts once)."""
    found = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.match(line)
        if m is None:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        shape = re.sub(r"\{[^}]*\}", "", m["shape"])  # drop layouts
        found.append(Collective(m["kind"], shape, _bytes(shape), op[1] if op else ""))
    return found


def summarize(found: list[Collective]) -> str:
    """``kind x count (MiB)``, pooling's apart."""
    if not found:
        return "none"
    groups: Counter[tuple[str, bool]] = Counter()
    sizes: Counter[tuple[str, bool]] = Counter()
    for c in found:
        groups[(c.kind, c.pooling)] += 1
        sizes[(c.kind, c.pooling)] += c.bytes
    parts = []
    for (kind, pooling), count in sorted(groups.items()):
        where = "pooling" if pooling else "rest"
        parts.append(f"{kind} x{count} ({sizes[(kind, pooling)] / 2**20:.2f} MiB, {where})")
    return ", ".join(parts)


def _specs(tree: Any, sharding: Any = None) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


def batch_like(config: Config, images: int) -> dict[str, Any]:
    """Arrays of a batch of ``images`` scenes (zeros: only shapes and dtypes matter)."""
    s, m = config.image_size, 4
    return {
        "images": np.zeros((images, s, s, 3), np.float32),
        "boxes": np.zeros((images, m, 4), np.float32),
        "classes": np.zeros((images, m), np.int32),
        "masks": np.zeros((images, m, s, s), np.uint8),
    }


def compile_step(
    trainer: Trainer,
    devices: Any,
    images: int,
    style: str,
    *,
    stop_gradient: bool = True,
) -> Any:
    """The train step lowered and compiled for ``devices`` (a 1-D batch mesh)."""
    step = make_train_step(trainer.graphdef, trainer.tx, stop_gradient=stop_gradient)
    key = jax.eval_shape(lambda: jax.random.key(0))
    batch = batch_like(trainer.config, images)
    if style == "explicit":
        mesh = Mesh(np.array(devices), ("batch",), axis_types=(AxisType.Explicit,))
        rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        args = (
            _specs(trainer.params, rep),
            _specs(trainer.opt_state, rep),
            _specs(batch, shard),
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=rep),
        )
        with jax.set_mesh(mesh):
            return jax.jit(step).lower(*args).compile()
    mesh = Mesh(np.array(devices), ("batch",))
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    jitted = jax.jit(
        step, in_shardings=(rep, rep, shard, rep), out_shardings=(rep, rep, rep), donate_argnums=()
    )
    args = (_specs(trainer.params), _specs(trainer.opt_state), _specs(batch), key)
    return jitted.lower(*args).compile()


def report(compiled: Any, label: str, seconds: float) -> dict[str, Any]:
    """Per-device memory and collectives of a compiled step; prints one line."""
    mem = compiled.memory_analysis()
    found = collectives(compiled.as_text())
    row = {
        "label": label,
        "compile_s": seconds,
        "temp_mib": mem.temp_size_in_bytes / 2**20,
        "argument_mib": mem.argument_size_in_bytes / 2**20,
        "output_mib": mem.output_size_in_bytes / 2**20,
        "collectives": found,
    }
    print(
        f"{label:28s} compile {seconds:6.1f} s  per device: temp {row['temp_mib']:7.2f} MiB, "
        f"arguments {row['argument_mib']:6.2f} MiB, outputs {row['output_mib']:6.2f} MiB\n"
        f"{'':28s} collectives: {summarize(found)}",
        flush=True,
    )
    return row


def pod(trainer: Trainer, images_per_chip: int, styles: tuple[str, ...]) -> list[dict[str, Any]]:
    """Both styles compiled for a v5e 4x4 pod (needs libtpu)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="tpu",
        topology_name="v5e:4x4",
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )
    devices = topo.devices
    rows = []
    for style in styles:
        t0 = time.perf_counter()
        compiled = compile_step(trainer, devices, images_per_chip * len(devices), style)
        label = f"v5e 4x4, {style}"
        rows.append(report(compiled, label, time.perf_counter() - t0))
    return rows


def cpu_devices(
    trainer: Trainer, images_per_device: int, styles: tuple[str, ...], steps: int = 3
) -> list[dict[str, Any]]:
    """Both styles run on the host's CPU devices, losses checked against one device."""
    devices = jax.devices()
    images = images_per_device * len(devices)
    config = trainer.config
    scenes = [make_scenes(images, size=config.image_size, seed=100 + i) for i in range(steps)]
    step = jax.jit(make_train_step(trainer.graphdef, trainer.tx))
    want = _run(step, trainer, scenes)
    rows = []
    for style in styles:
        t0 = time.perf_counter()
        compiled = compile_step(trainer, devices, images, style)
        row = report(compiled, f"{len(devices)} CPU devices, {style}", time.perf_counter() - t0)
        if style == "explicit":
            mesh = Mesh(np.array(devices), ("batch",), axis_types=(AxisType.Explicit,))
            with jax.set_mesh(mesh):
                got = _run(compiled, trainer, scenes, mesh)
        else:
            got = _run(compiled, trainer, scenes, Mesh(np.array(devices), ("batch",)))
        diff = max(abs(a - b) for a, b in zip(got["losses"], want["losses"], strict=True))
        row.update(step_ms=got["step_ms"], loss_diff=diff, single_ms=want["step_ms"])
        print(
            f"{'':28s} losses over {steps} steps within {diff:.1e} of one device's; "
            f"step {got['step_ms']:.0f} ms ({want['step_ms']:.0f} ms on one device)",
            flush=True,
        )
        rows.append(row)
    return rows


def _run(step: Any, trainer: Trainer, scenes: list, mesh: Mesh | None = None) -> dict[str, Any]:
    """Losses and median step time of ``len(scenes)`` steps; with ``mesh``, the state
    replicated and the batch sharded on it first."""
    params, opt_state = trainer.params, trainer.opt_state
    if mesh is not None:
        rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
        params, opt_state = jax.device_put((params, opt_state), rep)
    losses, times = [], []
    for i, s in enumerate(scenes):
        batch, key = to_batch(s), jax.random.key(i)
        if mesh is not None:
            batch, key = jax.device_put(batch, shard), jax.device_put(key, rep)
        t0 = time.perf_counter()
        params, opt_state, out = step(params, opt_state, batch, key)
        losses.append(float(out["loss"]))
        times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_ms": 1e3 * float(np.median(times[1:] or times))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.detector.pod", description=__doc__)
    ap.add_argument("--images-per-chip", type=int, default=2)
    ap.add_argument("--styles", default="explicit,automatic")
    ap.add_argument("--no-tpu", dest="tpu", action="store_false", help="skip the pod compile")
    ap.add_argument("--no-cpu", dest="cpu", action="store_false", help="skip the CPU run")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    styles = tuple(args.styles.split(","))
    trainer = create(Config())
    print(f"jax {jax.__version__}; {len(jax.devices())} {jax.devices()[0].platform} devices")
    if args.tpu:
        pod(trainer, args.images_per_chip, styles)
    if args.cpu:
        cpu_devices(trainer, args.images_per_chip, styles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
