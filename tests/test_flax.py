"""Flax modules (nnx and linen): each equals its function; a small head trains; state
saves and restores."""

from __future__ import annotations

import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, serialization

import jax_roialign as jr
from jax_roialign import linen as jlinen
from jax_roialign import nnx as jnnx
from jax_roialign._deform import deform_roi_align
from jax_roialign._rotated import roi_align_rotated

# flax 0.11: nnx.Optimizer.update takes the model (before: the grads alone), and a
# variable's array is variable[...] (before: .value, now deprecated for setting).
FLAX_0_11 = tuple(int(p) for p in re.findall(r"\d+", flax.__version__)[:2]) >= (0, 11)


def _get(variable):
    """A variable's array: ``variable[...]`` (flax 0.11; ``.value`` before)."""
    return variable[...] if FLAX_0_11 else variable.value


def _set(variable, value):
    """``variable[...] = value`` (flax 0.11; ``.value = value`` before)."""
    if FLAX_0_11:
        variable[...] = value
    else:
        variable.value = value


RNG = np.random.default_rng(0)
FEATURES = jnp.asarray(RNG.standard_normal((2, 10, 12, 3)))
BOXES = jnp.asarray(
    [[[1.0, 2.0, 9.5, 8.0], [0.5, 0.5, 4.0, 6.0]], [[3.0, 1.0, 11.0, 9.0], [2.0, 3.0, 7.0, 4.5]]]
)
ROTATED = jnp.asarray([[[5.0, 4.0, 6.0, 3.0, 30.0]], [[6.0, 5.0, 4.0, 5.0, -15.0]]])
PYRAMID = [jnp.asarray(RNG.standard_normal((2, 16 >> i, 20 >> i, 3))) for i in range(3)]
BIG = jnp.asarray([[[2.0, 3.0, 20.0, 30.0], [10.0, 5.0, 70.0, 60.0]], [[0.0, 0.0, 8.0, 9.0]] * 2])
SCALES = (1 / 4, 1 / 8, 1 / 16)

# (module name, settings, function, features, boxes)
CASES = [
    ("RoIAlign", dict(output_size=(3, 2), spatial_scale=1.0, sampling_ratio=2, aligned=False),
     jr.roi_align, FEATURES, BOXES),
    ("RoIAlign", dict(output_size=2, sampling_ratio=2, mode="max"), jr.roi_align, FEATURES, BOXES),
    ("MultiScaleRoIAlign", dict(output_size=(2, 3), spatial_scales=SCALES, sampling_ratio=2,
     level_mapper="detectron2", canonical_scale=28), jr.multiscale_roi_align, PYRAMID, BIG),
    ("RoIPool", dict(output_size=(2, 3), spatial_scale=1.0), jr.roi_pool, FEATURES, BOXES),
    ("PreciseRoIPool", dict(output_size=2, spatial_scale=1.0), jr.precise_roi_pool, FEATURES,
     BOXES),
    ("RoIAlignRotated", dict(output_size=2, sampling_ratio=2), roi_align_rotated, FEATURES,
     ROTATED),
]  # fmt: skip


@pytest.mark.parametrize("name,settings,fn,features,boxes", CASES)
def test_modules_equal_functions(name, settings, fn, features, boxes):
    nnx_mod = getattr(jnnx, name)(**settings)
    lin = getattr(jlinen, name)(**settings)
    variables = lin.init(jax.random.key(0), features, boxes)
    assert not variables  # no parameters

    @jax.jit
    def all_three(f, b):
        return fn(f, b, **settings), nnx_mod(f, b), lin.apply(variables, f, b)

    want, got_nnx, got_linen = all_three(features, boxes)
    np.testing.assert_array_equal(got_nnx, want)
    np.testing.assert_array_equal(got_linen, want)


def test_box_indices_pass_through():
    flat = BOXES.reshape(4, 4)
    idx = jnp.asarray([0, 0, 1, 1])
    want = jr.roi_align(FEATURES, flat, output_size=2, sampling_ratio=1, box_indices=idx)
    got = jnnx.RoIAlign(output_size=2, sampling_ratio=1)(FEATURES, flat, idx)
    np.testing.assert_array_equal(got, want)
    lin = jlinen.RoIAlign(output_size=2, sampling_ratio=1)
    np.testing.assert_array_equal(lin.apply({}, FEATURES, flat, idx), want)


def test_deformable_starts_as_roi_align_and_uses_its_offsets():
    kw = dict(output_size=(2, 3), spatial_scale=1.0, sampling_ratio=2)
    plain = jr.roi_align(FEATURES, BOXES, aligned=True, **kw)
    mod = jnnx.DeformableRoIAlign(3, rngs=nnx.Rngs(0), **kw)
    np.testing.assert_allclose(mod(FEATURES, BOXES), plain, rtol=0, atol=1e-12)
    lin = jlinen.DeformableRoIAlign(**kw)
    variables = lin.init(jax.random.key(0), FEATURES, BOXES)
    assert variables["params"]["offset_fc"]["kernel"].shape == (2 * 3 * 3, 2 * 3 * 2)
    np.testing.assert_allclose(lin.apply(variables, FEATURES, BOXES), plain, rtol=0, atol=1e-12)
    # With weights set, the module is deform_roi_align with the predicted offsets.
    k = jnp.asarray(RNG.standard_normal((18, 12)) * 0.1, jnp.float32)
    bias = jnp.asarray(RNG.standard_normal(12) * 0.1, jnp.float32)
    _set(mod.offset_fc.kernel, k)
    _set(mod.offset_fc.bias, bias)
    offsets = (plain.reshape(2, 2, -1) @ k + bias).reshape(2, 2, 2, 3, 2)
    want = deform_roi_align(FEATURES, BOXES, offsets, **kw)
    np.testing.assert_allclose(mod(FEATURES, BOXES), want, rtol=0, atol=1e-6)
    variables = {"params": {"offset_fc": {"kernel": k, "bias": bias}}}
    np.testing.assert_allclose(lin.apply(variables, FEATURES, BOXES), want, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------
# Training a tiny box head: filled squares (class 0) against hollow ones (class 1).
# ---------------------------------------------------------------------------


def synthetic_batch(seed: int, n: int = 2, r: int = 6, size: int = 24):
    rng = np.random.default_rng(seed)
    images = rng.normal(0, 0.1, (n, size, size, 1)).astype(np.float32)
    boxes = np.zeros((n, r, 4), np.float32)
    labels = rng.integers(0, 2, (n, r))
    for i in range(n):
        for j in range(r):
            s = int(rng.integers(7, 11))
            y, x = rng.integers(0, size - s, 2)
            patch = np.ones((s, s), np.float32)
            if labels[i, j]:
                patch[2:-2, 2:-2] = 0.0
            images[i, y : y + s, x : x + s, 0] += patch
            boxes[i, j] = [x, y, x + s, y + s]
    return jnp.asarray(images), jnp.asarray(boxes), jnp.asarray(labels)


class NnxHead(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.pool = jnnx.RoIAlign(output_size=6, sampling_ratio=2)
        self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
        self.fc = nnx.Linear(6 * 6 * 4, 2, rngs=rngs)

    def __call__(self, images, boxes):
        x = self.pool(images, boxes)  # [N, R, 6, 6, 1]
        x = x.reshape((-1,) + x.shape[2:])
        x = nnx.relu(self.conv(x))
        return self.fc(x.reshape(x.shape[0], -1))


class LinenHead(nn.Module):
    @nn.compact
    def __call__(self, images, boxes):
        x = jlinen.RoIAlign(output_size=6, sampling_ratio=2)(images, boxes)
        x = x.reshape((-1,) + x.shape[2:])
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _xent(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.reshape(-1)).mean()


def test_nnx_head_trains():
    images, boxes, labels = synthetic_batch(1)
    model = NnxHead(nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, images, boxes, labels):
        loss, grads = nnx.value_and_grad(lambda m: _xent(m(images, boxes), labels))(model)
        if FLAX_0_11:
            opt.update(model, grads)
        else:  # flax < 0.11
            opt.update(grads)
        return loss

    losses = [float(step(model, opt, images, boxes, labels)) for _ in range(25)]
    assert losses[-1] < 0.5 * losses[0], losses


def test_linen_head_trains():
    images, boxes, labels = synthetic_batch(2)
    head = LinenHead()
    params = head.init(jax.random.key(0), images, boxes)["params"]
    tx = optax.adam(3e-2)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(
            lambda p: _xent(head.apply({"params": p}, images, boxes), labels)
        )(params)
        updates, state = tx.update(g, state)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(25):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_deformable_head_gets_offset_gradients():
    images, boxes, labels = synthetic_batch(3)
    mod = jnnx.DeformableRoIAlign(1, output_size=3, sampling_ratio=2, rngs=nnx.Rngs(0))

    def loss(m):
        return jnp.sum(m(images, boxes) ** 2)

    grads = nnx.jit(nnx.grad(loss))(mod)
    assert float(jnp.abs(_get(grads["offset_fc"]["kernel"])).max()) > 0


# ---------------------------------------------------------------------------
# Save and restore.
# ---------------------------------------------------------------------------


def test_nnx_state_round_trip():
    images, boxes, _ = synthetic_batch(4)
    fwd = nnx.jit(lambda m, i, b: m(i, b))
    model = NnxHead(nnx.Rngs(0))
    want = fwd(model, images, boxes)
    graphdef, state = nnx.split(model)
    np.testing.assert_array_equal(fwd(nnx.merge(graphdef, state), images, boxes), want)
    # Through plain nested dicts of arrays (what a checkpointer writes) into a fresh model.
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
    other = NnxHead(nnx.Rngs(1))
    assert not np.array_equal(fwd(other, images, boxes), want)
    state2 = nnx.state(other)
    nnx.replace_by_pure_dict(state2, pure)
    nnx.update(other, state2)
    np.testing.assert_array_equal(fwd(other, images, boxes), want)
    # A deformable module's offset predictor round-trips too.
    mod = jnnx.DeformableRoIAlign(1, output_size=3, sampling_ratio=2, rngs=nnx.Rngs(0))
    _set(mod.offset_fc.kernel, jnp.full_like(_get(mod.offset_fc.kernel), 0.01))
    g, s = nnx.split(mod)
    np.testing.assert_array_equal(fwd(nnx.merge(g, s), images, boxes), fwd(mod, images, boxes))


def test_linen_params_round_trip():
    images, boxes, _ = synthetic_batch(5)
    head = LinenHead()
    apply = jax.jit(head.apply)
    params = head.init(jax.random.key(0), images, boxes)
    want = apply(params, images, boxes)
    blob = serialization.to_bytes(params)
    template = head.init(jax.random.key(1), images, boxes)
    assert not np.array_equal(apply(template, images, boxes), want)
    restored = serialization.from_bytes(template, blob)
    np.testing.assert_array_equal(apply(restored, images, boxes), want)
    # The deformable module's offset predictor.
    lin = jlinen.DeformableRoIAlign(output_size=3, sampling_ratio=2)
    apply = jax.jit(lin.apply)
    v = jax.tree.map(lambda x: x + 0.01, lin.init(jax.random.key(0), images, boxes))
    blob = serialization.to_bytes(v)
    back = serialization.from_bytes(lin.init(jax.random.key(1), images, boxes), blob)
    np.testing.assert_array_equal(apply(back, images, boxes), apply(v, images, boxes))
