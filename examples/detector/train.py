"""Training: the jitted train step, the loop, evaluation on held-out scenes, the command line.

``python -m examples.detector`` (from the repository root) trains the model on
synthetic scenes for a few minutes on a CPU and prints box AP@0.5, mask AP@0.5
and mask IoU on held-out scenes before and after training.
``--no-stop-gradient`` trains the same model with the proposals left attached
(the heads' box gradient flows through pooling into the RPN) and reports what
that costs per step, against the detached step timed on the same batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.flatten_util import ravel_pytree

from .data import Scenes, make_scenes, stream
from .inference import detect
from .losses import detector_loss
from .metrics import evaluate
from .model import Config, MaskRCNN, Pooling

Array = jax.Array
StepFn = Callable[..., tuple[Any, Any, dict[str, Array]]]

EVAL_SEED = 10_000  # held-out scenes come from their own seed
RUN_ONCE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@dataclasses.dataclass
class Trainer:
    """A model split for pure functions: its graph, parameters, optimizer and state."""

    graphdef: Any
    params: Any
    tx: optax.GradientTransformation
    opt_state: Any
    config: Config


def create(
    config: Config,
    *,
    seed: int = 0,
    steps: int = 600,
    learning_rate: float = 2e-3,
    pooling: Pooling | None = None,
) -> Trainer:
    """The model with fresh parameters and Adam with warm-up and cosine decay."""

    def build() -> MaskRCNN:
        return MaskRCNN(config, rngs=nnx.Rngs(seed), pooling=pooling)

    # Initialised by one program, compiled without LLVM's optimisations: it runs once,
    # and XLA:CPU takes 20 s to optimise the random initialisers of 40-odd arrays.
    graphdef, _ = nnx.split(nnx.eval_shape(build))
    init = jax.jit(lambda: nnx.split(build())[1]).lower()
    params = init.compile(compiler_options=RUN_ONCE)()
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(50, max(steps // 10, 1)), max(steps, 2)
    )
    tx = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(schedule))
    opt_state = jax.jit(lambda p: tx.init(ravel_pytree(p)[0]))(params)
    return Trainer(graphdef, params, tx, opt_state, config)


def make_train_step(
    graphdef: Any, tx: optax.GradientTransformation, *, stop_gradient: bool = True
) -> StepFn:
    """``step(params, opt_state, batch, key) -> (params, opt_state, losses)``: one
    Adam step on :func:`.losses.detector_loss` (pure; ``jax.jit`` it).

    The optimizer updates the parameters raveled into one vector (the same
    numbers: Adam is elementwise, the clipping norm global): XLA:CPU compiles
    the update of 40-odd separate arrays in three times the time.
    """

    def loss_fn(params, batch, key):
        model = nnx.merge(graphdef, params)
        return detector_loss(model, batch, key, stop_gradient=stop_gradient)

    def step(params, opt_state, batch, key):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
        flat, unravel = ravel_pytree(params)
        updates, opt_state = tx.update(ravel_pytree(grads)[0], opt_state, flat)
        return unravel(flat + updates), opt_state, {"loss": loss, **parts}

    return step


def to_batch(scenes: Scenes) -> dict[str, Array]:
    """Device arrays of a batch (float32 images and boxes, int32 classes, uint8 masks)."""
    return {k: jnp.asarray(v) for k, v in scenes.as_dict().items()}


def make_detect(graphdef: Any) -> Callable[[Any, Array], Any]:
    """Jitted ``(params, images) -> Detections``."""
    return jax.jit(lambda params, images: detect(nnx.merge(graphdef, params), images))


def evaluate_model(
    trainer: Trainer, scenes: Scenes, detect_fn: Callable[[Any, Array], Any], chunk: int = 16
) -> dict[str, float]:
    """Box AP@0.5, mask AP@0.5 and mask IoU of the current parameters on ``scenes``."""
    parts = []
    for i in range(0, scenes.images.shape[0], chunk):
        out = detect_fn(trainer.params, jnp.asarray(scenes.images[i : i + chunk]))
        parts.append(jax.tree.map(np.asarray, dataclasses.asdict(out)))
    det = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return evaluate(det, scenes)


def train(
    trainer: Trainer,
    batches: Iterator[Scenes],
    steps: int,
    *,
    stop_gradient: bool = True,
    seed: int = 0,
    log_every: int = 50,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs ``steps`` train steps in place; returns the first call's time (trace and
    compile), the median step time and the losses of the last step."""
    step = jax.jit(make_train_step(trainer.graphdef, trainer.tx, stop_gradient=stop_gradient))
    key = jax.random.key(seed)
    times, first, losses = [], 0.0, {}
    for i in range(steps):
        batch = to_batch(next(batches))
        t0 = time.perf_counter()
        trainer.params, trainer.opt_state, out = step(
            trainer.params, trainer.opt_state, batch, jax.random.fold_in(key, i)
        )
        losses = {k: float(v) for k, v in out.items()}
        elapsed = time.perf_counter() - t0
        if i == 0:
            first = elapsed
        else:
            times.append(elapsed)
        if log_every and (i % log_every == 0 or i == steps - 1):
            parts = "  ".join(f"{k} {v:.3f}" for k, v in losses.items())
            log(f"  step {i:4d}  {parts}  ({elapsed * 1e3:.0f} ms)")
    median = statistics.median(times) if times else float("nan")
    return {"first_s": first, "step_ms": median * 1e3, "losses": losses}


def _format(metrics: dict[str, float]) -> str:
    return (
        f"box AP@0.5 {100 * metrics['box_ap50']:5.1f}   mask AP@0.5 "
        f"{100 * metrics['mask_ap50']:5.1f}   mask IoU {100 * metrics['mask_iou']:5.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m examples.detector", description=__doc__)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=8, help="images per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval-images", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--no-stop-gradient",
        dest="stop_gradient",
        action="store_false",
        help="leave the proposals attached: the heads' box gradient flows through pooling "
        "into the RPN; also times the usual (detached) step on the same batches",
    )
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)

    config = Config()
    trainer = create(config, seed=args.seed, steps=args.steps, learning_rate=args.lr)
    held_out = make_scenes(args.eval_images, size=config.image_size, seed=EVAL_SEED + args.seed)
    n_params = sum(x.size for x in jax.tree.leaves(trainer.params))
    mode = "attached (no stop_gradient)" if not args.stop_gradient else "detached (stop_gradient)"
    print(
        f"Mask R-CNN (Flax NNX), {n_params / 1e3:.0f}k parameters, {config.image_size}x"
        f"{config.image_size} images, {args.batch} per step, {args.steps} steps, proposals "
        f"{mode}; jax {jax.__version__} on {jax.devices()[0].platform}"
    )
    detect_fn = make_detect(trainer.graphdef)
    before = evaluate_model(trainer, held_out, detect_fn)
    print(f"before training ({args.eval_images} held-out images): {_format(before)}")

    t0 = time.perf_counter()
    batches = stream(args.batch, size=config.image_size, seed=args.seed)
    stats = train(trainer, batches, args.steps, stop_gradient=args.stop_gradient, seed=args.seed)
    wall = time.perf_counter() - t0
    after = evaluate_model(trainer, held_out, detect_fn)
    print(f"after training  ({args.eval_images} held-out images): {_format(after)}")
    print(
        f"training: {wall:.0f} s, first step (trace + compile) {stats['first_s']:.1f} s, "
        f"median step {stats['step_ms']:.0f} ms"
    )
    if not args.stop_gradient:
        report_cost(trainer, args.batch, config, args.seed)
    return 0


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_cost(
    trainer: Trainer, images: int, config: Config, seed: int, repeats: int = 12
) -> None:
    """Times the detached and the attached step in turns on the same batches (median wall
    and CPU time, the trained parameters, nothing kept) and prints the ratios."""
    steps = {
        sg: jax.jit(make_train_step(trainer.graphdef, trainer.tx, stop_gradient=sg))
        for sg in (True, False)
    }
    times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    key = jax.random.key(seed)
    for i in range(repeats + 1):
        batch = to_batch(make_scenes(images, size=config.image_size, seed=seed + 1 + i))
        for sg, step in steps.items():
            c0, t0 = _cpu_seconds(), time.perf_counter()
            out = step(trainer.params, trainer.opt_state, batch, jax.random.fold_in(key, i))
            jax.block_until_ready(out)
            if i:  # the first call compiles
                times[sg].append((time.perf_counter() - t0, _cpu_seconds() - c0))
    (wall_d, cpu_d), (wall_a, cpu_a) = (
        [statistics.median(t[j] for t in times[sg]) * 1e3 for j in (0, 1)] for sg in (True, False)
    )
    print(
        f"step time, same batches in turns: detached {wall_d:.0f} ms (CPU {cpu_d:.0f} ms), "
        f"attached {wall_a:.0f} ms (CPU {cpu_a:.0f} ms): {wall_a / wall_d:.2f}x wall, "
        f"{cpu_a / cpu_d:.2f}x CPU"
    )


if __name__ == "__main__":
    sys.exit(main())
