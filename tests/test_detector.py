"""The example detector (examples/detector): a Mask R-CNN train step with jax_roialign inside.

Fast: a few train steps of a tiny configuration (the loss falls, shapes hold, no
retrace when the boxes change), the greedy NMS and the balanced sampler.
Slow: the gradient through attached proposals, the step on 8 CPU devices with
both sharding styles, and the step compiled for a TPU v5e 4x4 pod (libtpu).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from examples.detector import boxes as bx
from examples.detector.data import make_scenes
from examples.detector.inference import detect
from examples.detector.losses import detector_loss
from examples.detector.model import Config, MaskRCNN
from examples.detector.train import create, make_train_step, to_batch

# Two pyramid levels (P2, P3) of a 64 x 64 image: the model's code, a fraction of its compile.
TINY = Config(
    image_size=64,
    widths=(8, 16, 16),
    channels=16,
    anchor_sizes=(8.0, 16.0),
    pre_nms=64,
    post_nms=16,
    rpn_batch=64,
    rois_per_image=16,
    hidden=64,
    detections=8,
)
IMAGES = 2


def _batches(seeds):
    return [to_batch(make_scenes(IMAGES, size=TINY.image_size, seed=s)) for s in seeds]


@pytest.mark.slow
def test_train_steps_loss_falls_shapes_hold_no_retrace():
    trainer = create(TINY, steps=50, learning_rate=1e-2)
    traces = []
    base = make_train_step(trainer.graphdef, trainer.tx)

    def counted(*args):
        traces.append(1)
        return base(*args)

    step = jax.jit(counted)
    batches = _batches([1, 2])
    assert not np.array_equal(batches[0]["boxes"], batches[1]["boxes"])
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), trainer.params)
    params, opt_state, losses = trainer.params, trainer.opt_state, []
    for i in range(8):  # the boxes change every step, and the proposals with them
        params, opt_state, out = step(params, opt_state, batches[i % 2], jax.random.key(i))
        losses.append(float(out["loss"]))
    assert len(traces) == 1, "the train step was traced again"
    assert all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), losses
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == shapes
    for v in out.values():
        assert v.shape == () and v.dtype == jnp.float32

    # Inference's shapes (traced, not compiled: the fast suite's time).
    det = jax.eval_shape(
        lambda p, x: detect(nnx.merge(trainer.graphdef, p), x), params, batches[0]["images"]
    )
    d, m = TINY.detections, TINY.mask_size
    assert det.boxes.shape == (IMAGES, d, 4) and det.boxes.dtype == jnp.float32
    assert det.scores.shape == det.valid.shape == det.classes.shape == (IMAGES, d)
    assert det.masks.shape == (IMAGES, d, m, m)


def test_nms_is_greedy_and_static():
    boxes = jnp.array(
        [[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9], [21, 21, 30, 30]],
        jnp.float32,
    )
    valid = jnp.array([True, True, True, True, False])
    keep = jax.jit(bx.nms, static_argnums=2)(boxes, valid, 0.5)
    # box 1 overlaps box 0 (IoU 0.68), box 3 too (0.9); box 4 is invalid
    assert keep.tolist() == [True, False, True, False, False]


def test_balanced_sample_takes_positives_first():
    positive = jnp.arange(40) % 10 == 0  # 4 positives
    negative = ~positive
    sample = jax.jit(bx.balanced_sample, static_argnums=(3, 4))
    index, pos, taken = sample(jax.random.key(0), positive, negative, 16, 8)
    assert pos.tolist() == [True] * 4 + [False] * 12
    assert bool(taken.all())
    assert len(set(index.tolist())) == 16
    assert bool(positive[index[:4]].all()) and not bool(positive[index[4:]].any())


@pytest.mark.slow
def test_attached_proposals_send_the_heads_gradient_to_the_rpn():
    model = MaskRCNN(TINY, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    batch = _batches([3])[0]

    def heads(params, stop_gradient):
        _, parts = detector_loss(
            nnx.merge(graphdef, params), batch, jax.random.key(0), stop_gradient=stop_gradient
        )
        return parts["cls"] + parts["box"] + parts["mask"]

    for stop in (True, False):
        grads = jax.jit(jax.grad(heads), static_argnums=1)(params, stop)
        rpn = np.abs(np.asarray(grads["rpn_head"]["deltas"]["kernel"])).max()
        assert (rpn == 0) == stop, (stop, rpn)


def _collectives(compiled):
    from examples.detector.pod import collectives

    return collectives(compiled.as_text())


@functools.cache
def _one_device_step():
    """The tiny trainer, a batch of 8 images and one train step's outputs on one
    device (compiled once per test process for both sharding styles)."""
    trainer = create(TINY)
    batch = _batches([4])[0]
    batch = {k: jnp.concatenate([v] * 4) for k, v in batch.items()}  # 8 images
    key = jax.random.key(0)
    step = jax.jit(make_train_step(trainer.graphdef, trainer.tx))
    _, _, want = step(trainer.params, trainer.opt_state, batch, key)
    return trainer, batch, key, want


@pytest.mark.slow
@pytest.mark.parametrize("style", ["explicit", "automatic"])
def test_eight_cpu_devices_match_one(style):
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from examples.detector.pod import compile_step

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    trainer, batch, key, want = _one_device_step()
    devices = jax.devices()[:8]
    compiled = compile_step(trainer, devices, 8, style)
    explicit = style == "explicit"
    axis_types = (AxisType.Explicit,) if explicit else (AxisType.Auto,)
    mesh = Mesh(np.array(devices), ("batch",), axis_types=axis_types)
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
    args = (
        *jax.device_put((trainer.params, trainer.opt_state), rep),
        jax.device_put(batch, shard),
        jax.device_put(key, rep),
    )
    if explicit:
        with jax.set_mesh(mesh):
            _, _, got = compiled(*args)
    else:
        _, _, got = compiled(*args)
    for name in want:
        np.testing.assert_allclose(float(got[name]), float(want[name]), rtol=1e-4, atol=1e-5)
    found = _collectives(compiled)
    if explicit:
        # Only reductions over the batch: the gradient's, and the loss's normalisers.
        assert {c.kind for c in found} == {"all-reduce"}, found
        assert not [c for c in found if c.pooling], found


@pytest.mark.slow
@pytest.mark.tpu
def test_pod_compile_explicit_sharding_adds_no_pooling_collective():
    pytest.importorskip("libtpu")
    from helpers import topology

    from examples.detector.pod import compile_step

    devices = topology("v5e:4x4").devices
    trainer = create(TINY)
    compiled = compile_step(trainer, devices, 2 * len(devices), "explicit")
    found = _collectives(compiled)
    assert not [c for c in found if c.pooling], found
    assert {c.kind for c in found} <= {"all-reduce"}, found
    mem = compiled.memory_analysis()
    assert mem.temp_size_in_bytes < 64 * 2**20


@pytest.mark.slow
@pytest.mark.tpu
def test_pod_compile_automatic_sharding():
    # Automatic sharding compiles too; whatever collectives pooling adds there are
    # reported by python -m examples.detector.pod (a known limitation, see the docs).
    pytest.importorskip("libtpu")
    from helpers import topology

    from examples.detector.pod import compile_step

    devices = topology("v5e:4x4").devices
    trainer = create(TINY)
    compiled = compile_step(trainer, devices, 2 * len(devices), "automatic")
    found = _collectives(compiled)
    assert any(c.kind == "all-reduce" and not c.pooling for c in found)  # the gradient's
