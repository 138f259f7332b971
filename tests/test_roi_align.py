"""roi_align against live ONNX Runtime (float64), NumPy loop references and golden values."""

from __future__ import annotations

import functools
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sampled
from jax.experimental import checkify
from jax.test_util import check_grads
from ort_reference import ort_roi_align
from reference import roi_align_ref

import jax_roialign as jr

N, C, H, W = 2, 3, 9, 13


def random_boxes(rng: np.random.Generator, k: int, h: int, w: int, scale: float = 1.0):
    """Boxes of every kind, in image coordinates for a map of (h, w) at ``scale``."""
    kinds = rng.integers(0, 6, k)
    ctr = rng.uniform(-0.2, 1.2, (k, 2)) * np.array([w, h]) / scale
    base = rng.uniform(0.0, 1.0, (k, 2)) * np.array([w, h]) / scale
    factor = np.select(
        [kinds[:, None] == i for i in range(6)],
        [0.02, 0.3, 1.0, 3.0, 12.0, 0.0],  # tiny, small, map-sized, larger, huge, zero
    )
    size = base * factor
    boxes = np.concatenate([ctr - size / 2, ctr + size / 2], axis=1)
    far = rng.random(k) < 0.08
    boxes[far] += np.array([3 * w, -2 * h, 3 * w, -2 * h]) / scale  # far outside
    return boxes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, H, W, C))
    boxes = random_boxes(rng, 160, H, W)
    batch = rng.integers(0, N, len(boxes))
    return x, boxes, batch


def _ort_nhwc(x, boxes, batch, output_size, scale, sampling_ratio, aligned):
    """ONNX Runtime's RoiAlign (float64) on NHWC features, returned as NHWC."""
    out = ort_roi_align(
        x.transpose(0, 3, 1, 2), boxes, batch, *output_size, scale, sampling_ratio, aligned
    )
    return out.transpose(0, 2, 3, 1)


@functools.cache
def _jitted(**kw):
    return jax.jit(functools.partial(jr.roi_align, **kw))


def _ours(x, boxes, batch, **kw):
    return np.asarray(_jitted(**kw)(jnp.asarray(x), jnp.asarray(boxes), box_indices=batch))


@pytest.mark.parametrize(
    "aligned, sampling_ratio, output_size, scale",
    sampled([True, False], [0, 1, 2, 3], [(2, 2), (3, 5), (7, 4)], [1.0, 0.125], fast=12, slow=12),
)
def test_matches_onnxruntime_float64(data, aligned, sampling_ratio, output_size, scale):
    x, boxes, batch = data
    boxes = boxes / scale
    ref = ort_roi_align(
        x.transpose(0, 3, 1, 2), boxes, batch, *output_size, scale, sampling_ratio, aligned
    )
    kw = dict(
        output_size=output_size,
        spatial_scale=scale,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
    )
    out = _ours(x, boxes, batch, **kw)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("variant", ["matmul", "NCHW"])
def test_matmul_path_and_nchw_match_onnxruntime(data, aligned, sampling_ratio, variant):
    x, boxes, batch = data
    boxes = boxes * 2.0
    ref = ort_roi_align(x.transpose(0, 3, 1, 2), boxes, batch, 3, 5, 0.5, sampling_ratio, aligned)
    kw = dict(output_size=(3, 5), spatial_scale=0.5, sampling_ratio=sampling_ratio, aligned=aligned)
    if variant == "matmul":
        out = _ours(x, boxes, batch, implementation="matmul", **kw).transpose(0, 3, 1, 2)
    else:
        out = _ours(x.transpose(0, 3, 1, 2), boxes, batch, data_format="NCHW", **kw)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_onnxruntime_under_jit_with_huge_boxes(aligned, sampling_ratio):
    """Boxes hundreds of times the map: adaptive grids of thousands of samples, exact."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, 6, 7, 2))
    lo = rng.uniform(-400, 5, (40, 2))
    hi = lo + rng.uniform(1, 900, (40, 2))
    boxes = np.concatenate([lo, hi], 1)
    batch = np.zeros(40, np.int64)
    ref = ort_roi_align(x.transpose(0, 3, 1, 2), boxes, batch, 3, 3, 1.0, sampling_ratio, aligned)
    f = jax.jit(
        lambda x, b: jr.roi_align(
            x, b, output_size=3, sampling_ratio=sampling_ratio, aligned=aligned
        )
    )
    out = np.asarray(f(x, boxes))
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sampling_ratio", [0, 2, 3])
def test_negative_and_zero_sizes_match_loop_reference(sampling_ratio):
    """ONNX Runtime rejects negative adaptive grids; the float64 loop reference has the rule."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, H, W, C))
    lo = rng.uniform(-2, 12, (30, 2))
    boxes = np.concatenate([lo, lo - rng.uniform(0, 4, (30, 2))], 1)
    boxes[::3, 2:] = boxes[::3, :2]  # zero size
    batch = np.zeros(30, np.int64)
    for aligned in (True, False):
        ref = roi_align_ref(x, boxes, batch, (3, 2), 1.0, sampling_ratio, aligned)
        out = _ours(
            x, boxes, batch, output_size=(3, 2), sampling_ratio=sampling_ratio, aligned=aligned
        )
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)


def test_loop_reference_agrees_with_onnxruntime(data):
    """The NumPy reference used for what ORT lacks is itself checked against ORT."""
    x, boxes, batch = data
    small = np.max(boxes[:, 2:] - boxes[:, :2], axis=1) < 2 * W  # keep the Python loop short
    boxes, batch = boxes[small][:40], batch[small][:40]
    ref = ort_roi_align(x.transpose(0, 3, 1, 2), boxes, batch, 3, 2, 1.0, 0, True)
    ours = roi_align_ref(x, boxes, batch, (3, 2), 1.0, 0, True)
    np.testing.assert_allclose(ours.transpose(0, 3, 1, 2), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "aligned,expected",
    [
        (
            False,
            [[7.5, 8, 8.5, 9], [10, 10.5, 11, 11.5], [12.5, 13, 13.5, 14], [15, 15.5, 16, 16.5]],
        ),
        (True, [[4.5, 5, 5.5, 6], [7, 7.5, 8, 8.5], [9.5, 10, 10.5, 11], [12, 12.5, 13, 13.5]]),
    ],
)
def test_detectron2_golden_values(aligned, expected):
    x = jnp.arange(25.0).reshape(1, 5, 5, 1)
    out = jr.roi_align(
        x, jnp.array([[0.0, 1, 1, 3, 3]]), output_size=4, sampling_ratio=0, aligned=aligned
    )
    np.testing.assert_allclose(out[0, :, :, 0], np.array(expected), atol=1e-12)


def test_seed_article_worked_example():
    """RoI (0.8, 0, 2.4, 4.5), 2x2 bins of 0.8 x 2.25, adaptive grid 1 x 3."""
    rng = np.random.default_rng(3)
    fmap = rng.standard_normal((1, 6, 4, 1))
    box = jnp.array([[0.0, 0.8, 0.0, 2.4, 4.5]])
    out = jr.roi_align(fmap, box, output_size=2, sampling_ratio=0, aligned=False)
    samples = [(1.2, 0.375), (1.2, 1.125), (1.2, 1.875)]  # (x, y) in the top-left bin
    from reference import bilinear

    expected = np.mean([bilinear(fmap[0], y, x) for x, y in samples], axis=0)
    np.testing.assert_allclose(out[0, 0, 0], expected, atol=1e-12)


# ---------------------------------------------------------------- formats, layouts


def test_box_formats_agree(data):
    x, boxes, batch = data
    # Jitted: the forms are parsed at trace time (op-by-op, each call would
    # compile every primitive of the adaptive path again for its shapes).
    op = _jitted(output_size=(3, 4), spatial_scale=0.5, sampling_ratio=0)
    a = op(x, boxes, box_indices=batch)
    b = op(x, np.concatenate([batch[:, None], boxes], 1))
    np.testing.assert_array_equal(a, b)
    per_image = boxes[:80].reshape(N, 40, 4)
    c = op(x, per_image)
    d = op(x, boxes[:80], box_indices=np.repeat(np.arange(N), 40))
    assert c.shape == (N, 40, 3, 4, C)
    np.testing.assert_allclose(c.reshape(d.shape), d, atol=1e-12)
    single = op(x[:1], boxes)
    np.testing.assert_allclose(single, op(x, boxes, box_indices=0 * batch))


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_nchw_matches_nhwc(data, sampling_ratio):
    x, boxes, batch = data
    kw = dict(output_size=(2, 3), sampling_ratio=sampling_ratio, box_indices=batch)
    a = jr.roi_align(x, boxes, **kw)
    b = jr.roi_align(x.transpose(0, 3, 1, 2), boxes, data_format="NCHW", **kw)
    assert b.shape == (len(boxes), C, 2, 3)
    np.testing.assert_allclose(a, b.transpose(0, 2, 3, 1), atol=1e-12)


def test_empty_boxes_give_empty_output():
    x = jnp.ones((2, 5, 6, 3))
    assert jr.roi_align(x, jnp.zeros((0, 5)), output_size=(2, 3)).shape == (0, 2, 3, 3)
    assert jr.roi_align(
        x, jnp.zeros((0, 4)), box_indices=jnp.zeros((0,), jnp.int32), output_size=2
    ).shape == (0, 2, 2, 3)
    assert jr.roi_align(x, jnp.zeros((2, 0, 4)), output_size=2).shape == (2, 0, 2, 2, 3)
    out = jr.roi_align(x, jnp.zeros((0, 5)), output_size=2, data_format="NCHW")
    assert out.shape == (0, 5, 2, 2)


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "dtype,tol", [(jnp.float32, 2e-5), (jnp.bfloat16, 3e-2), (jnp.float16, 3e-3)]
)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_low_precision_dtypes(data, dtype, tol, sampling_ratio):
    x, boxes, batch = data
    kw = dict(output_size=3, sampling_ratio=sampling_ratio, box_indices=batch)
    ref = _ort_nhwc(x, boxes, batch, (3, 3), 1.0, sampling_ratio, True)
    out = jr.roi_align(jnp.asarray(x, dtype), jnp.asarray(boxes, jnp.float32), **kw)
    assert out.dtype == dtype
    # Error relative to the features' magnitude (they are ~N(0, 1)), incl. input rounding.
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=0, atol=tol * 4)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("aligned", [True, False])
def test_float32_at_least_as_accurate_as_the_float32_kernel(data, sampling_ratio, aligned):
    """Against float64 on the same (float32-rounded) inputs, our float32 error is no larger
    than that of the C++ kernel run in float32 (ONNX Runtime's, equal to torchvision's)."""
    x, boxes, batch = data
    x32, b32 = x.astype(np.float32), boxes.astype(np.float32)
    args = (batch, (3, 3), 1.0, sampling_ratio, aligned)
    exact = _ort_nhwc(x32.astype(np.float64), b32.astype(np.float64), *args)
    kernel32 = _ort_nhwc(x32, b32, *args)
    ours = jr.roi_align(
        x32, b32, output_size=3, box_indices=batch, sampling_ratio=sampling_ratio, aligned=aligned
    )
    assert ours.dtype == jnp.float32
    err_ours = np.abs(np.asarray(ours, np.float64) - exact).max()
    err_kernel = np.abs(kernel32.astype(np.float64) - exact).max()
    assert err_ours <= err_kernel, (err_ours, err_kernel)


def test_float64_boxes_with_float32_features_return_float32():
    x = np.random.default_rng(4).standard_normal((1, 5, 5, 2)).astype(np.float32)
    b = np.array([[0.3, 0.7, 3.9, 4.2]])
    out = jr.roi_align(x, b, output_size=2)
    assert out.dtype == jnp.float32


# ---------------------------------------------------------------- transformations


@pytest.mark.slow
class TestTransformations(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True, with_device=True)
    def test_variants(self):
        rng = np.random.default_rng(5)
        x = rng.standard_normal((N, H, W, C))
        boxes = random_boxes(rng, 20, H, W)
        batch = rng.integers(0, N, 20)
        f = self.variant(functools.partial(jr.roi_align, output_size=(2, 3), sampling_ratio=0))
        out = f(x, boxes, box_indices=batch)
        ref = _ort_nhwc(x, boxes, batch, (2, 3), 1.0, 0, True)
        np.testing.assert_allclose(out, ref, atol=1e-9)

    def test_new_box_values_do_not_retrace(self):
        rng = np.random.default_rng(6)
        x = jnp.asarray(rng.standard_normal((N, H, W, C)))

        @jax.jit
        @chex.assert_max_traces(n=1)
        def f(x, b, i):
            return jr.roi_align(x, b, output_size=3, box_indices=i)

        for seed in range(4):
            r = np.random.default_rng(seed)
            f(x, jnp.asarray(random_boxes(r, 12, H, W)), jnp.asarray(r.integers(0, N, 12)))

    def test_vmap_over_feature_batches(self):
        rng = np.random.default_rng(7)
        xs = rng.standard_normal((3, 1, H, W, C))
        boxes = random_boxes(rng, 10, H, W)
        f = jax.vmap(lambda x: jr.roi_align(x, boxes, output_size=2))
        out = f(xs)
        for i in range(3):
            np.testing.assert_allclose(
                out[i], jr.roi_align(xs[i], boxes, output_size=2), atol=1e-12
            )

    def test_vmap_over_boxes(self):
        rng = np.random.default_rng(8)
        x = rng.standard_normal((1, H, W, C))
        boxes = random_boxes(rng, 12, H, W).reshape(3, 4, 4)
        out = jax.jit(jax.vmap(lambda b: jr.roi_align(x, b, output_size=2)))(boxes)
        ref = _jitted(output_size=2)(x, boxes.reshape(12, 4))
        np.testing.assert_allclose(out.reshape(ref.shape), ref, atol=1e-12)

    def test_deterministic(self):
        rng = np.random.default_rng(9)
        x = jnp.asarray(rng.standard_normal((N, H, W, C)), jnp.float32)
        boxes = jnp.asarray(random_boxes(rng, 50, H, W), jnp.float32)
        batch = jnp.asarray(rng.integers(0, N, 50))
        g = jax.jit(
            jax.grad(
                lambda x, b: jnp.sum(jr.roi_align(x, b, output_size=3, box_indices=batch) ** 2),
                (0, 1),
            )
        )
        first = g(x, boxes)
        for _ in range(3):
            again = g(x, boxes)
            for a, b in zip(first, again, strict=True):
                np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- gradients


def _interior_boxes(rng, k):
    """Boxes whose samples avoid the kinks of the bilinear weights (for finite differences)."""
    lo = rng.uniform(0.3, 3.0, (k, 2))
    size = rng.uniform(2.0, 5.0, (k, 2))
    return np.concatenate([lo, lo + size], 1)


# Each value of both options (second-order programs of adaptive grids are large).
@pytest.mark.parametrize(
    "aligned, sampling_ratio", [(True, 2), pytest.param(False, 0, marks=pytest.mark.slow)]
)
def test_gradients_features_and_boxes(sampling_ratio, aligned):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 8, 9, 2))
    boxes = _interior_boxes(rng, 4) + 0.013

    def f(method):
        return jax.jit(
            lambda x, b: jr.roi_align(
                x,
                b,
                output_size=(2, 3),
                sampling_ratio=sampling_ratio,
                aligned=aligned,
                implementation=method,
            )
        )

    # "gather" (the default): the row-window custom VJP, reverse mode to second order.
    check_grads(f("gather"), (x, boxes), order=2, modes=["rev"], eps=1e-5, atol=1e-5, rtol=1e-5)
    # "scatter" keeps plain autodiff, so forward mode works too.
    check_grads(f("scatter"), (x, boxes), order=1, modes=["fwd"], eps=1e-5, atol=1e-5, rtol=1e-5)
    check_grads(f("matmul"), (x, boxes), order=1, modes=["fwd"], eps=1e-5, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_forward_mode_on_every_implementation():
    # The op is linear in the features: its tangent along the features is the op.
    x = jnp.asarray(np.random.default_rng(3).standard_normal((1, 8, 9, 2)))
    boxes = jnp.asarray([[1.0, 1.0, 5.0, 6.0]])
    for impl in (None, "gather", "scatter", "window", "matmul"):
        g = lambda x, impl=impl: jr.roi_align(
            x, boxes, box_indices=jnp.zeros(1, int), output_size=2, implementation=impl
        )
        np.testing.assert_allclose(jax.jvp(g, (x,), (x,))[1], g(x), rtol=0, atol=1e-12)


def test_box_gradient_direction():
    """Moving a box towards brighter pixels raises the pooled value."""
    x = jnp.tile(jnp.arange(10.0)[None, :], (10, 1))[None, :, :, None]  # brighter to the right
    box = jnp.array([[2.0, 2.0, 5.0, 5.0]])
    g = jax.grad(lambda b: jr.roi_align(x, b, output_size=2).sum())(box)
    assert g[0, 0] > 0 and g[0, 2] > 0
    np.testing.assert_allclose(g[0, 1], 0.0, atol=1e-12)


@pytest.mark.slow
def test_gradients_finite_for_degenerate_boxes():
    x = jnp.asarray(np.random.default_rng(11).standard_normal((1, 6, 6, 2)))
    boxes = jnp.array(
        [
            [2.0, 2.0, 2.0, 2.0],
            [1.0, 1.0, 0.0, 0.0],
            [0.0, 0.0, 1e-7, 3.0],
            [-50, -50, 80, 80],
            [5.0, 5.0, 6.0, 6.0],
            [1.0, 1.0, 3.0, 3.0],
        ]
    )
    for sr in (0, 2):
        for aligned in (True, False):
            f = functools.partial(jr.roi_align, output_size=2, sampling_ratio=sr, aligned=aligned)
            gx, gb = jax.jit(jax.grad(lambda x, b, f=f: f(x, b).sum(), (0, 1)))(x, boxes)
            assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gb))


# ---------------------------------------------------------------- what jit cannot check


def test_nonfinite_boxes_and_bad_indices_give_zeros(data):
    x, boxes, batch = data
    bad = np.array(
        [[np.nan, 1, 3, 3], [1, 1, np.inf, 3], [-np.inf, 0, 2, 2], [1, 1, 4, 4], [1, 1, 4, 4]]
    )
    idx = np.array([0, 0, 0, 5, -1])

    @jax.jit
    def f(x, b, i):
        return jr.roi_align(x, b, output_size=2, box_indices=i)

    out = f(x, bad, idx)
    np.testing.assert_array_equal(out, 0.0)
    grads = jax.grad(lambda x, b: f(x, b, idx).sum(), (0, 1))(x, bad)
    assert np.all(grads[0] == 0) and np.all(np.isfinite(grads[1]))
    rows = np.concatenate([[[np.nan], [2.0], [1.7]], np.tile([[1.0, 1, 4, 4]], (3, 1))], 1)
    op = _jitted(output_size=2)
    np.testing.assert_array_equal(op(x, rows)[:2], 0.0)
    np.testing.assert_allclose(  # a fractional index truncates, as torchvision's int cast
        op(x, rows)[2], op(x, rows[2:, 1:], box_indices=np.array([1]))[0]
    )


def test_checkify_reports_bad_values(data):
    x, boxes, _ = data
    f = checkify.checkify(
        lambda x, b, i: jr.roi_align(x, b, output_size=2, box_indices=i, checks=True)
    )
    err, _ = jax.jit(f)(x, jnp.asarray(boxes[:3]), jnp.array([0, 1, 0]))
    err.throw()  # no error
    err, _ = jax.jit(f)(x, jnp.asarray(boxes[:3]), jnp.array([0, 7, 0]))
    with pytest.raises(checkify.JaxRuntimeError, match="batch index out of range"):
        err.throw()
    bad = np.array(boxes[:3])
    bad[1, 2] = np.nan
    err, _ = jax.jit(f)(x, jnp.asarray(bad), jnp.array([0, 1, 0]))
    with pytest.raises(checkify.JaxRuntimeError, match="non-finite"):
        err.throw()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(output_size=0), ValueError, "output_size"),
        (dict(output_size=(2, -1)), ValueError, "output_size"),
        (dict(output_size=(2, 2, 2)), TypeError, "output_size"),
        (dict(output_size=2.5), TypeError, "output_size"),
        (dict(sampling_ratio=2.0), TypeError, "sampling_ratio"),
        (dict(sampling_ratio=True), TypeError, "sampling_ratio"),
        (dict(spatial_scale=0.0), ValueError, "spatial_scale"),
        (dict(spatial_scale=float("nan")), ValueError, "spatial_scale"),
        (dict(spatial_scale="1"), TypeError, "spatial_scale"),
        (dict(data_format="NWHC"), ValueError, "data_format"),
        (dict(mode="mean"), ValueError, "mode"),
        (dict(implementation="fast"), ValueError, "implementation"),
        (dict(aligned=1), TypeError, "aligned"),
    ],
)
def test_bad_options(kwargs, exc, match):
    x = jnp.ones((1, 5, 5, 2))
    b = jnp.array([[0.0, 0, 0, 2, 2]])
    kw = dict(output_size=2) | kwargs
    with pytest.raises(exc, match=match):
        jr.roi_align(x, b, **kw)


def test_bad_arrays():
    x = jnp.ones((2, 5, 5, 3))
    with pytest.raises(ValueError, match=r"features must be 4-D.*\(5, 5, 3\)"):
        jr.roi_align(x[0], jnp.zeros((1, 5)), output_size=2)
    with pytest.raises(TypeError, match="features must be floating"):
        jr.roi_align(x.astype(jnp.int32), jnp.zeros((1, 5)), output_size=2)
    with pytest.raises(ValueError, match=r"boxes must be .*got shape \(3, 6\)"):
        jr.roi_align(x, jnp.zeros((3, 6)), output_size=2)
    with pytest.raises(ValueError, match=r"boxes must be .*got shape \(3,\)"):
        jr.roi_align(x, jnp.zeros((3,)), output_size=2)
    with pytest.raises(TypeError, match="boxes must be floating"):
        jr.roi_align(x, jnp.zeros((3, 5), jnp.int32), output_size=2)
    with pytest.raises(ValueError, match="need box_indices"):
        jr.roi_align(x, jnp.zeros((3, 4)), output_size=2)
    with pytest.raises(ValueError, match=r"box_indices must have shape"):
        jr.roi_align(x, jnp.zeros((3, 4)), box_indices=jnp.zeros((2,), jnp.int32), output_size=2)
    with pytest.raises(TypeError, match="box_indices must be integers"):
        jr.roi_align(x, jnp.zeros((3, 4)), box_indices=jnp.zeros((3,)), output_size=2)
    with pytest.raises(ValueError, match="do not pass box_indices"):
        jr.roi_align(x, jnp.zeros((3, 5)), box_indices=jnp.zeros((3,), jnp.int32), output_size=2)
    with pytest.raises(ValueError, match="batch size 2"):
        jr.roi_align(x, jnp.zeros((3, 7, 4)), output_size=2)
    with pytest.raises(ValueError, match=r"box_indices must lie in \[0, 2\)"):
        jr.roi_align(x, jnp.zeros((2, 4)), box_indices=np.array([0, 2]), output_size=2)
    with pytest.raises(ValueError, match="features must be 4-D"):
        jr.roi_align(jnp.ones((1, 2, 5, 5, 3)), jnp.zeros((1, 5)), output_size=2)


# Each value of both options.
@pytest.mark.parametrize(
    "aligned, sampling_ratio", [(False, 3), pytest.param(True, 0, marks=pytest.mark.slow)]
)
def test_samples_exactly_on_the_boundary(aligned, sampling_ratio):
    """Integer and half-integer boxes put samples exactly on -1 and on H (or W), where the
    boundary rule flips: the count must follow the reference's float arithmetic."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 9, 13, 2))
    lo = rng.integers(-60, 8, (300, 2)) + rng.choice([0.0, 0.5], (300, 2))
    hi = lo + rng.integers(1, 120, (300, 2)) + rng.choice([0.0, 0.5], (300, 2))
    boxes = np.concatenate([lo, hi], 1)
    batch = np.zeros(300, np.int64)
    for output_size in [(2, 2), (3, 4), (7, 5)]:
        ref = _ort_nhwc(x, boxes, batch, output_size, 1.0, sampling_ratio, aligned)
        for method in ("gather", "matmul"):
            out = _ours(
                x,
                boxes,
                batch,
                output_size=output_size,
                sampling_ratio=sampling_ratio,
                aligned=aligned,
                implementation=method,
            )
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)


# Each value of both options.
@pytest.mark.parametrize(("sampling_ratio", "per_image"), [(0, False), (2, True)])
@pytest.mark.slow
def test_matmul_path_is_gather_and_scatter_free(sampling_ratio, per_image):
    """The TPU path: dense interpolation matrices, no gather or scatter forward or backward."""
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.standard_normal((2, 12, 14, 3)))
    boxes = random_boxes(rng, 8, 12, 14).reshape(2, 4, 4)
    if not per_image:
        boxes = np.concatenate([np.repeat([0.0, 1.0], 4)[:, None], boxes.reshape(8, 4)], 1)

    def f(x, b):
        out = jr.roi_align(
            x, b, output_size=3, sampling_ratio=sampling_ratio, implementation="matmul"
        )
        return jnp.sum(out**2)

    for fn in (f, jax.grad(f, (0, 1))):
        hlo = jax.jit(fn).lower(x, boxes).compile().as_text()
        assert not re.search(r"\b(gather|scatter)\(", hlo), "matmul path reads with a gather"
    gather = jax.jit(lambda x, b: jr.roi_align(x, b, output_size=3, sampling_ratio=sampling_ratio))(
        x, boxes
    )
    np.testing.assert_allclose(
        jax.jit(
            lambda x, b: jr.roi_align(
                x, b, output_size=3, sampling_ratio=sampling_ratio, implementation="matmul"
            )
        )(x, boxes),
        gather,
        atol=1e-12,
    )
    grads = jax.jit(jax.grad(f, (0, 1)))(x, boxes)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.slow
def test_adaptive_window_tiers_match_onnxruntime(aligned):
    """``"scatter"`` reads adaptive grids through the narrowest window that every
    bin of the call fits (a box of FPN size, half the map, any box in the map),
    else the dense weights; ``"gather"`` (the default here) each box through its
    own (tests/test_window_classes.py). Each choice is exact; the boxes below
    make each one be taken."""
    from jax_roialign import _sampling, _separable
    from jax_roialign._dispatch import Implementation
    from jax_roialign._tuning import TUNING
    from jax_roialign._validation import parse_boxes

    h, w = 96, 128
    rows, cols = TUNING.window_tiers(h, w, (7, 7))
    assert len(rows) == len(cols) == 3, (rows, cols)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, h, w, 2))

    def boxes_of(side_lo, side_hi, k):
        size = rng.uniform(side_lo, side_hi, (k, 2))
        lo = rng.uniform(0, 1, (k, 2)) * (np.array([w, h]) - 1 - size)
        return np.concatenate([lo, lo + size], 1)

    # 42 boxes in every case, so that the op compiles once for all four.
    typical = boxes_of(6, 40, 42)
    cases = [
        typical,
        np.concatenate([typical[:40], boxes_of(44, 47, 2)]),  # half the map
        np.concatenate([typical[:41], [[0.5, 0.0, w - 1.0, h - 1.5]]]),  # the whole map
        np.concatenate([typical[:41], [[-60.0, -40.0, w + 50.0, h + 70.0]]]),  # beyond it
    ]
    for expect, boxes in enumerate(cases):
        batch = rng.integers(0, 2, len(boxes))
        rois = parse_boxes(jnp.asarray(boxes), jnp.asarray(batch), 2)
        gy, gx = _sampling.box_grids(
            rois.coords,
            rois.ok,
            (7, 7),
            (h, w),
            spatial_scale=1.0,
            sampling_ratio=0,
            aligned=aligned,
            dtype=jnp.float64,
        )
        ok = rois.ok.astype(jnp.float64)[:, None, None]
        choice = int(_separable.Weights(gy, gx, ok, Implementation.SCATTER).choice)
        assert choice == expect, (choice, expect)
        ref = _ort_nhwc(x, boxes, batch, (7, 7), 1.0, 0, aligned)
        for impl in ("scatter", None):
            out = _ours(
                x,
                boxes,
                batch,
                output_size=7,
                sampling_ratio=0,
                aligned=aligned,
                implementation=impl,
            )
            np.testing.assert_allclose(out, ref, rtol=0, atol=1e-9)


# Per-box map lengths in float64, one map length in float32.
@pytest.mark.parametrize(("dtype", "per_box"), [(jnp.float64, True), (jnp.float32, False)])
@pytest.mark.slow
def test_joint_closed_form_equals_per_axis(dtype, per_box):
    """The adaptive weights of both axes (window taps and dense rows) come from one
    evaluation of the closed form over the bins of both grids stacked. Each number
    is the per-axis function's, bit for bit, and so are the box gradients (to
    rounding of their sums): with per-box map lengths (FPN levels), boxes larger
    than the map, flipped, degenerate and without samples."""
    from jax_roialign import _sampling

    rng = np.random.default_rng(11)
    k = 60
    boxes = rng.uniform(-40, 140, (k, 4)).astype(dtype)
    boxes[:5, 2:] = boxes[:5, :2]  # zero size
    boxes[5:10] *= 6.0  # far beyond the map
    extent_y = jnp.asarray(rng.choice([50.0, 25.0, 13.0], k), dtype)
    extent_x = jnp.asarray(rng.choice([84.0, 42.0, 21.0], k), dtype)

    def grids(b, per_box):
        x1, y1, x2, y2 = (b[:, i] for i in range(4))
        common = dict(spatial_scale=0.5, offset=0.5, min_size=None, sampling_ratio=0)
        ey, ex = (extent_y, extent_x) if per_box else (None, None)
        gy = _sampling.axis_grid(y1, y2, pooled=7, length=50, extent=ey, **common)
        gx = _sampling.axis_grid(x1, x2, pooled=5, length=84, extent=ex, **common)
        return gy, gx

    def per_axis(b, per_box):
        gy, gx = (_sampling.with_valid_range(g) for g in grids(b, per_box))
        return (
            _sampling.window_taps(gy, 6),
            _sampling.window_taps(gx, 9),
            _sampling.dense_weights(gy),
            _sampling.dense_weights(gx),
            _sampling.row_window(gy),
            _sampling.row_window(gx),
        )

    def joint(b, per_box):
        # Taps and dense rows together, as roi_align asks for them.
        gy, gx = _sampling.with_geometry(*grids(b, per_box))
        (ty, tx), (dy, dx) = _sampling.closed_form((gy, gx), taps=(6, 9), dense=True)
        return ty, tx, dy, dx, _sampling.row_window(gy), _sampling.row_window(gx)

    def apart(b, per_box):
        # One part at a time, as the ops' branches ask for them.
        gy, gx = _sampling.with_geometry(*grids(b, per_box))
        (ty, tx), (dy, dx) = _sampling.both_taps(gy, gx, (6, 9)), _sampling.both_dense(gy, gx)
        return ty, tx, dy, dx, _sampling.row_window(gy), _sampling.row_window(gx)

    def loss(fn, per_box):
        def f(b):
            leaves = jax.tree.leaves(fn(b, per_box))
            return sum(jnp.sum(x**2) for x in leaves if x.dtype == dtype)

        return f

    b = jnp.asarray(boxes)
    tol = 1e-12 if dtype == jnp.float64 else 2e-5
    want = jax.jit(per_axis, static_argnums=1)(b, per_box)
    g_want = jax.jit(jax.grad(loss(per_axis, per_box)))(b)
    for fn in (joint, apart):
        got = jax.jit(fn, static_argnums=1)(b, per_box)
        for a, c in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
            np.testing.assert_array_equal(np.asarray(c), np.asarray(a))
        g_got = jax.jit(jax.grad(loss(fn, per_box)))(b)
        np.testing.assert_allclose(g_got, g_want, rtol=tol, atol=tol)
