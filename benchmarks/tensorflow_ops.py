"""crop_and_resize and multilevel_crop_and_resize against TensorFlow on CPU, in one process.

Run ``python -m benchmarks.tensorflow_ops`` in an environment that has TensorFlow
and jax_roialign. float32; forward, and forward + backward (the output and the
gradients with respect to the image / features and the boxes). TensorFlow runs
its own kernels (``tf.image.crop_and_resize`` and its gradient kernels) and the
Model Garden formula in TensorFlow ops (tools/make_golden_tf.py), both inside
``tf.function``. Prints the median times and the ratios TensorFlow / ours.
"""

from __future__ import annotations

import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jax_roialign as jr

SETTLE_S = 1.0


def _time(fn, repeats: int = 15) -> float:
    fn()  # compile / trace
    fn()
    # TensorFlow's worker threads spin for a while after its ops return, taking
    # the cores from whatever runs next: let them settle before timing anything.
    time.sleep(SETTLE_S)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _crop_case(tf, rng, n, h, w, c, k, crop):
    image = rng.standard_normal((n, h, w, c)).astype(np.float32)
    y = np.sort(rng.uniform(0, 1, (k, 2)), axis=1)
    x = np.sort(rng.uniform(0, 1, (k, 2)), axis=1)
    boxes = np.stack([y[:, 0], x[:, 0], y[:, 1], x[:, 1]], 1).astype(np.float32)
    idx = rng.integers(0, n, k).astype(np.int32)
    g = rng.standard_normal((k, *crop, c)).astype(np.float32)

    fj = jax.jit(lambda im, b: jr.crop_and_resize(im, b, idx, crop))
    bj = jax.jit(
        lambda im, b: (lambda o, vjp: (o, *vjp(g)))(*jax.vjp(fj, im, b))  # noqa: E731
    )
    ji, jb = jnp.asarray(image), jnp.asarray(boxes)
    ti, tb, tg = tf.constant(image), tf.constant(boxes), tf.constant(g)

    @tf.function
    def ft(im, b):
        return tf.image.crop_and_resize(im, b, idx, crop)

    @tf.function
    def bt(im, b):
        with tf.GradientTape() as tape:
            tape.watch([im, b])
            o = tf.image.crop_and_resize(im, b, idx, crop)
        return (o, *tape.gradient(o, [im, b], output_gradients=tg))

    return (
        lambda: jax.block_until_ready(fj(ji, jb)),
        lambda: jax.block_until_ready(bj(ji, jb)),
        lambda: [t.numpy() for t in [ft(ti, tb)]],
        lambda: [t.numpy() for t in bt(ti, tb)],
    )


def _multilevel_case(tf, rng, b, image, c, n, out):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tools"))
    from make_golden_tf import model_garden_tf

    h, w = image
    feats = {
        str(lv): rng.standard_normal((b, h >> lv, w >> lv, c)).astype(np.float32)
        for lv in range(2, 7)
    }
    size = np.exp(rng.uniform(np.log(16.0), np.log(600.0), (b, n)))
    cy, cx = rng.uniform(0, h, (b, n)), rng.uniform(0, w, (b, n))
    boxes = np.stack([cy - size / 2, cx - size / 2, cy + size / 2, cx + size / 2], -1)
    boxes = boxes.astype(np.float32)
    g = rng.standard_normal((b, n, out, out, c)).astype(np.float32)

    fj = jax.jit(lambda f, bx: jr.multilevel_crop_and_resize(f, bx, out))
    bj = jax.jit(lambda f, bx: (lambda o, vjp: (o, *vjp(g)))(*jax.vjp(fj, f, bx)))
    jf = {k: jnp.asarray(v) for k, v in feats.items()}
    jbx = jnp.asarray(boxes)
    tfe = {k: tf.constant(v) for k, v in feats.items()}
    tbx, tg = tf.constant(boxes), tf.constant(g)

    @tf.function
    def ft(f, bx):
        return model_garden_tf(f, bx, out, 0.5)[0]

    @tf.function
    def bt(f, bx):
        with tf.GradientTape() as tape:
            tape.watch([f, bx])
            o = model_garden_tf(f, bx, out, 0.5)[0]
        return (o, *tape.gradient(o, [f, bx], output_gradients=tg))

    return (
        lambda: jax.block_until_ready(fj(jf, jbx)),
        lambda: jax.block_until_ready(bj(jf, jbx)),
        lambda: ft(tfe, tbx).numpy(),
        lambda: jax.tree.map(lambda t: t.numpy(), bt(tfe, tbx)),
    )


def main() -> None:
    try:
        import tensorflow as tf
    except ImportError:
        print("TensorFlow is not installed: nothing to compare with.")
        return
    rng = np.random.default_rng(0)
    cases = [
        ("crop_and_resize 2x64x64x32, K=256, 14x14",
         _crop_case(tf, rng, 2, 64, 64, 32, 256, (14, 14))),
        ("crop_and_resize 1x512x512x3, K=64, 224x224",
         _crop_case(tf, rng, 1, 512, 512, 3, 64, (224, 224))),
        ("multilevel P2-P6 512x512, B=2, N=256, C=64, 7x7",
         _multilevel_case(tf, rng, 2, (512, 512), 64, 256, 7)),
    ]  # fmt: skip
    print(f"jax {jax.__version__}, tensorflow {tf.__version__}, {jax.devices()[0].platform}")
    print("| workload | ours fwd (ms) | TF fwd (ms) | TF/ours "
          "| ours f+b (ms) | TF f+b (ms) | TF/ours |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, (jf, jb, tf_f, tf_b) in cases:
        a, b = _time(jf), _time(tf_f)
        c, d = _time(jb), _time(tf_b)
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} | {c:.2f} | {d:.2f} | {d / c:.2f} |")


if __name__ == "__main__":
    main()
