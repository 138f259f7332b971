"""The box-local, gather-free window reader (``implementation="window"``, the TPU path), on CPU.

Its numbers against ONNX Runtime (float64, 1e-9) for every kind of box, including
boxes spanning several tiles of the largest tier, boxes larger than the map and both layouts and box
forms; its gradients against autodiff's scatter-add (``implementation="scatter"``), to
second order; vmap folded into the images; no retracing for new boxes; no
gather or scatter in its compiled CPU program either; FPN levels and the
integral pooling through the same reader.
"""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import window_boxes
from jax.test_util import check_grads
from ort_reference import ort_roi_align

import jax_roialign as jr
from jax_roialign import _window


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    # NCHW, as ONNX Runtime wants. 70 x 90: tiers 16 and 32 x 32 tiles (3 x 3 for
    # the whole map), so boxes take both tiers and span one to nine tiles.
    x = rng.standard_normal((2, 3, 70, 90))
    boxes = window_boxes(rng, 24, 70 / 0.5, 90 / 0.5)
    batch = rng.integers(0, 2, 24)
    return x, boxes, batch


def test_tiers():
    # Tiers double from the base, clipped to the map; on a map larger than the
    # last, a large box is read in tiles of it, as many as its span needs.
    assert _window.tier_sizes(30, 41) == ((16, 16, 1, 1), (30, 32, 1, 2))
    assert _window.tier_sizes(30, 41, tiers=3) == ((16, 16, 1, 1), (30, 32, 1, 1), (30, 41, 1, 1))
    assert _window.tier_sizes(12, 9) == ((12, 9, 1, 1),)
    assert _window.tier_sizes(200, 336) == ((16, 16, 1, 1), (32, 32, 7, 11))
    last = _window.tier_sizes(200, 336)[-1]
    assert _window.tiles_read(last, 32, 32) == 1
    assert _window.tiles_read(last, 33, 32) == 2
    assert _window.tiles_read(last, 200, 336) == 77  # the whole map, once
    assert _window.tiles_read(last, 0, 0) == 1


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.slow
def test_matches_onnxruntime_float64(data, aligned, sampling_ratio, data_format):
    x, boxes, batch = data
    want = ort_roi_align(x, boxes, batch, 3, 4, 0.5, sampling_ratio, aligned)
    feats = x if data_format == "NCHW" else x.transpose(0, 2, 3, 1)
    f = jax.jit(
        lambda f, b: jr.roi_align(
            f,
            b,
            box_indices=jnp.asarray(batch),
            output_size=(3, 4),
            spatial_scale=0.5,
            sampling_ratio=sampling_ratio,
            aligned=aligned,
            data_format=data_format,
            implementation="window",
        )
    )
    got = np.asarray(f(feats, boxes))
    if data_format == "NHWC":
        got = got.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.slow
def test_per_image_boxes_and_vmap_match_flat(data, sampling_ratio):
    x, boxes, _ = data
    feats = jnp.asarray(x.transpose(0, 2, 3, 1))
    per_image = jnp.asarray(boxes.reshape(2, 12, 4))
    kw = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio)
    want = jr.roi_align(feats, per_image, **kw, implementation="gather")
    got = jr.roi_align(feats, per_image, **kw, implementation="window")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    # The user's own vmap over batches of images (folded into the images).
    stacked = jax.vmap(lambda f, b: jr.roi_align(f, b, **kw, implementation="window"))(
        jnp.stack([feats, -feats]), jnp.stack([per_image, per_image[::-1]])
    )
    np.testing.assert_allclose(stacked[0], want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        stacked[1], jr.roi_align(-feats, per_image[::-1], **kw, implementation="gather"), atol=1e-12
    )


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.slow
def test_gradients_match_autodiff(data, sampling_ratio):
    x, boxes, batch = data
    feats = jnp.asarray(x.transpose(0, 2, 3, 1))
    idx = jnp.asarray(batch)

    def grads(method, per_image):
        def loss(f, b):
            if per_image:
                out = jr.roi_align(
                    f,
                    b.reshape(2, 12, 4),
                    output_size=(2, 3),
                    spatial_scale=0.5,
                    sampling_ratio=sampling_ratio,
                    implementation=method,
                )
            else:
                out = jr.roi_align(
                    f,
                    b,
                    box_indices=idx,
                    output_size=(2, 3),
                    spatial_scale=0.5,
                    sampling_ratio=sampling_ratio,
                    implementation=method,
                )
            return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(feats, jnp.asarray(boxes))

    # Flat boxes with fixed sampling, per-image boxes with adaptive sampling (flat
    # boxes' adaptive gradients: test_second_order_numerically, which checks them
    # against finite differences).
    per_image = sampling_ratio == 0
    want = grads("scatter", per_image)
    got = grads("window", per_image)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_second_order_numerically():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 7, 40, 2))
    boxes = np.array([[1.1, 0.7, 37.3, 5.2], [3.3, 1.2, 9.9, 6.1], [0.4, 2.2, 12.8, 4.9]])
    idx = jnp.asarray([0, 1, 1])
    for sr in (2, 0):
        f = jax.jit(
            lambda x, b, sr=sr: jr.roi_align(
                x,
                b,
                box_indices=idx,
                output_size=(2, 5),
                sampling_ratio=sr,
                aligned=False,
                implementation="window",
            )
        )
        check_grads(f, (x, boxes), order=2, modes=["rev"], eps=1e-5, atol=1e-5, rtol=1e-5)


def test_no_retrace_and_deterministic(data):
    x, boxes, batch = data
    feats = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def grad(f, b):
        out = jr.roi_align(
            f, b, box_indices=jnp.asarray(batch), output_size=3, implementation="window"
        )
        return jax.grad(
            lambda f: (
                jnp.sum(out * 0)
                + jnp.sum(
                    jr.roi_align(
                        f, b, box_indices=jnp.asarray(batch), output_size=3, implementation="window"
                    )
                    ** 2
                )
            )
        )(f)

    a = grad(feats, jnp.asarray(boxes, jnp.float32))
    b = grad(feats, jnp.asarray(boxes[::-1].copy(), jnp.float32))  # new values, no retrace
    c = grad(feats, jnp.asarray(boxes, jnp.float32))
    assert np.array_equal(np.asarray(a), np.asarray(c))
    assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_cpu_program_has_no_gather_or_scatter(data):
    x, boxes, batch = data
    feats = jnp.asarray(x.transpose(0, 2, 3, 1), jnp.float32)

    def loss(f, b):
        out = jr.roi_align(
            f,
            b,
            box_indices=jnp.asarray(batch),
            output_size=3,
            sampling_ratio=0,
            implementation="window",
        )
        return jnp.sum(out**2)

    text = (
        jax.jit(jax.grad(loss, argnums=(0, 1)))
        .lower(feats, jnp.asarray(boxes, jnp.float32))
        .compile()
        .as_text()
    )
    assert not re.search(r"\b(gather|scatter)\(", text)


@pytest.mark.slow
def test_multiscale_and_precise_match_gather():
    # Adaptive sampling on the levels (fixed: test_bfloat16_maps_round_once's
    # "levels", against the float32 computation).
    sampling_ratio = 0
    rng = np.random.default_rng(5)
    maps = [jnp.asarray(rng.standard_normal((2, 64 // 2**i, 48 // 2**i, 3))) for i in range(4)]
    k = 20
    side = np.exp(rng.uniform(np.log(4), np.log(600), k))
    xy = rng.uniform(-20, 200, (k, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + side[:, None] * np.array([1, 0.7])], 1))
    per_image = boxes.reshape(2, 10, 4)

    def ms(method):
        def loss(m, b):
            out = jr.multiscale_roi_align(
                m,
                b,
                output_size=(3, 2),
                spatial_scales=(1 / 4, 1 / 8, 1 / 16, 1 / 32),
                sampling_ratio=sampling_ratio,
                implementation=method,
            )
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(maps, per_image)

    want, got = ms("gather"), ms("window")
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-11)

    def pr(method):
        def loss(f, b):
            out = jr.precise_roi_pool(
                f, b, output_size=(3, 4), spatial_scale=0.25, implementation=method
            )
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(maps[0], per_image)

    for g, w in zip(jax.tree.leaves(pr("window")), jax.tree.leaves(pr("scatter")), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-11)


# Each form with one sampling (precise pooling has none).
@pytest.mark.parametrize(
    "sampling_ratio, forms", [(0, ("per_image",)), (2, ("flat", "levels", "precise"))]
)
@pytest.mark.slow
def test_bfloat16_maps_round_once(sampling_ratio, forms):
    # bfloat16 maps: each box's float32 sums are rounded to bfloat16 as the
    # reader writes them (its ``out_dtype``), its cotangent widened box by box,
    # and its feature gradient summed one image at a time in float32 and rounded
    # into that image. The bits must be those of the float32 computation on the
    # same values rounded once at the end: outputs, feature and box gradients,
    # flat boxes, per-image boxes, FPN levels, precise pooling.
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal((3, 40, 70, 8)), jnp.bfloat16)
    small = jnp.asarray(rng.standard_normal((3, 20, 35, 8)), jnp.bfloat16)
    boxes = np.stack([window_boxes(rng, 10, 40, 70) for _ in range(3)]).astype(np.float32)
    flat_batch = np.repeat(np.arange(3), 10)
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, implementation="window")
    ops = {
        "flat": lambda f, b: jr.roi_align(f[0], b.reshape(-1, 4), box_indices=flat_batch, **kw),
        "per_image": lambda f, b: jr.roi_align(f[0], b, **kw),
        "levels": lambda f, b: jr.multiscale_roi_align(
            list(f), b, spatial_scales=(1.0, 0.5), canonical_scale=20, **kw
        ),
        "precise": lambda f, b: jr.precise_roi_pool(
            f[0], b, output_size=(3, 4), spatial_scale=0.9, implementation="window"
        ),
    }
    for name in forms:
        op = ops[name]
        wide = (x.astype(jnp.float32), small.astype(jnp.float32))

        def grads(maps, b, op=op):
            out, vjp = jax.vjp(jax.jit(op), maps, b)
            cot = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
            return out, vjp(cot.astype(jnp.bfloat16).astype(out.dtype))  # the same values

        out, (d_maps, d_boxes) = grads((x, small), boxes)
        want, (w_maps, w_boxes) = grads(wide, boxes)
        assert out.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(out), np.asarray(want.astype(jnp.bfloat16)))
        for got, exp in zip(d_maps, w_maps, strict=True):
            assert got.dtype == jnp.bfloat16, name
            np.testing.assert_array_equal(np.asarray(got), np.asarray(exp.astype(jnp.bfloat16)))
        # Box gradients: through the weights' gradient, the same sums.
        np.testing.assert_array_equal(np.asarray(d_boxes), np.asarray(w_boxes))
