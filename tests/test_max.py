"""roi_align(mode="max") against the float64 loop reference (mmcv's max mode)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference import bilinear, roi_align_ref

import jax_roialign as jr

N, C, H, W = 2, 3, 9, 13


def random_boxes(rng: np.random.Generator, k: int) -> np.ndarray:
    """Tiny, small, map-sized, huge, zero, negative-size and far-outside boxes."""
    kinds = rng.integers(0, 6, k)
    ctr = rng.uniform(-0.2, 1.2, (k, 2)) * np.array([W, H])
    base = rng.uniform(0.0, 1.0, (k, 2)) * np.array([W, H])
    factor = np.select([kinds[:, None] == i for i in range(6)], [0.02, 0.3, 1.0, 12.0, 0.0, -0.4])
    size = base * factor
    boxes = np.concatenate([ctr - size / 2, ctr + size / 2], axis=1)
    boxes[rng.random(k) < 0.1] += np.array([3 * W, -2 * H, 3 * W, -2 * H])
    return boxes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, H, W, C))
    boxes = random_boxes(rng, 48)
    batch = rng.integers(0, N, len(boxes))
    return x, boxes, batch


_STATIC = ("output_size", "spatial_scale", "sampling_ratio", "aligned", "mode", "data_format")
roi_align = jax.jit(jr.roi_align, static_argnames=_STATIC)


def _max_fn(**kw):
    return lambda x, b, i: roi_align(x, b, box_indices=i, mode="max", **kw)


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_loop_reference(data, aligned, sampling_ratio):
    x, boxes, batch = data
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, aligned=aligned)
    ours = np.asarray(_max_fn(**kw)(x, boxes, batch))
    ref = roi_align_ref(x, boxes, batch, (3, 4), 1.0, sampling_ratio, aligned, mode="max")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


def test_scale_and_huge_boxes_need_several_tiles():
    """Bins far larger than the search tile: the while loop must scan them all."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, H, W, C))
    boxes = np.array([[-40.0, -30.0, 90.0, 70.0], [4.0, 2.0, 60.0, 8.0], [1.0, 1.0, 5.0, 6.0]])
    boxes = boxes / 0.5
    ours = np.asarray(
        roi_align(x, boxes, output_size=2, spatial_scale=0.5, mode="max", sampling_ratio=0)
    )
    ref = roi_align_ref(x, boxes, np.zeros(3, int), (2, 2), 0.5, 0, True, mode="max")
    # The first box has ~60 valid samples per axis and bin: far more than one tile.
    # (the search scans 2 x 2 samples per step)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)


def test_samples_outside_the_map_take_part_as_zero():
    """All-negative features: a bin with samples beyond [-1, H] has max exactly 0."""
    rng = np.random.default_rng(3)
    x = -1.0 - np.abs(rng.standard_normal((1, H, W, 2)))
    boxes = np.array([[-6.0, 2.0, 6.0, 6.0], [2.0, 2.0, 8.0, 6.0], [-30.0, -30.0, -20.0, -20.0]])
    for sr in (0, 2):
        ours = np.asarray(roi_align(x, boxes, output_size=(2, 2), sampling_ratio=sr, mode="max"))
        ref = roi_align_ref(x, boxes, np.zeros(3, int), (2, 2), 1.0, sr, True, mode="max")
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)
        assert np.all(ours[0, :, 0] == 0.0) and np.all(ours[0, :, 1] < 0)
        assert np.all(ours[1] < 0) and np.all(ours[2] == 0.0)


def test_empty_adaptive_grid_gives_zero():
    x = np.full((1, H, W, 1), -3.0)
    boxes = np.array([[4.0, 4.0, 4.0, 8.0], [5.0, 5.0, 3.0, 3.0]])  # zero width, negative size
    out = np.asarray(roi_align(x, boxes, output_size=2, sampling_ratio=0, mode="max"))
    assert np.all(out == 0.0)


def _argmax_gradient(x, boxes, batch, pooled, sampling_ratio):
    """Reference d sum(out) / d features: bilinear weights of each bin's first arg-max sample."""
    grad = np.zeros_like(x)
    ph_n, pw_n = pooled
    for k, (x1, y1, x2, y2) in enumerate(boxes):
        fmap = x[batch[k]]
        sx, sy = x1 - 0.5, y1 - 0.5
        bh, bw = (y2 - y1) / ph_n, (x2 - x1) / pw_n
        g = sampling_ratio
        for ph in range(ph_n):
            for pw in range(pw_n):
                pts = [
                    (sy + ph * bh + (i + 0.5) * bh / g, sx + pw * bw + (j + 0.5) * bw / g)
                    for i in range(g)
                    for j in range(g)
                ]
                vals = np.stack([bilinear(fmap, y, xx) for y, xx in pts])
                for c in range(x.shape[-1]):
                    y, xx = pts[int(np.argmax(vals[:, c]))]
                    one = np.zeros((H, W, 1))
                    for r in range(H):
                        for q in range(W):
                            one[r, q, 0] = 1.0
                            grad[batch[k], r, q, c] += bilinear(one, y, xx)[0]
                            one[r, q, 0] = 0.0
    return grad


def test_a_boxs_numbers_do_not_depend_on_the_other_boxes():
    """The adaptive search scans each box's own tiles (the boxes sorted by how
    many they need, in chunks): a box among boxes of every size, huge and far
    outside the map among them, has the output it has alone, bit for bit, and
    its box gradient (summed over the bins as XLA blocks a call of that many
    boxes: within a few ulps)."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((N, H, W, C)), jnp.float32)
    boxes = random_boxes(rng, 40)
    boxes[7] = [-3 * W, -2 * H, 4 * W, 3 * H]
    rows = jnp.asarray(np.concatenate([rng.integers(0, N, (40, 1)), boxes], axis=1), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((40, 3, 4, C)), jnp.float32)

    @jax.jit
    def out_and_box_grad(rows, cot):
        def loss(r):
            out = jr.roi_align(x, r, output_size=(3, 4), sampling_ratio=0, mode="max")
            return jnp.sum(out * cot), out

        return jax.grad(loss, has_aux=True)(rows)[::-1]

    out, grad = out_and_box_grad(rows, cot)
    out_1, grad_1 = map(
        np.concatenate,
        zip(*(out_and_box_grad(rows[i : i + 1], cot[i : i + 1]) for i in range(40)), strict=True),
    )
    np.testing.assert_array_equal(np.asarray(out), out_1)
    np.testing.assert_allclose(np.asarray(grad), grad_1, rtol=1e-5, atol=1e-5)


def test_feature_gradient_goes_to_the_argmax_neighbours():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((N, H, W, 2))
    boxes = np.array([[1.0, 1.5, 7.0, 6.0], [-2.0, 3.0, 6.5, 12.0], [3.3, 0.2, 12.5, 4.1]])
    batch = np.array([0, 1, 0])
    grad = jax.grad(
        lambda f: jnp.sum(
            roi_align(f, boxes, output_size=(2, 3), sampling_ratio=2, mode="max", box_indices=batch)
        )
    )(x)
    ref = _argmax_gradient(x, boxes, batch, (2, 3), 2)
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_gradients_features_and_boxes(sampling_ratio):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, H, W, 2))
    boxes = np.array([[1.1, 1.7, 7.3, 6.2], [-2.2, 3.1, 6.6, 11.7], [2.3, 0.4, 30.5, 16.1]])

    def f(feat, b):
        return roi_align(feat, b, output_size=(2, 2), sampling_ratio=sampling_ratio, mode="max")

    check_grads(f, (x, boxes), order=1, modes=["rev", "fwd"], eps=1e-6, atol=1e-5, rtol=1e-5)


def test_layouts_forms_dtypes_and_invalid_boxes(data):
    x, boxes, batch = data
    boxes = boxes[:16]
    batch = batch[:16]
    kw = dict(output_size=(3, 2), sampling_ratio=0, mode="max")
    ref = np.asarray(roi_align(x, boxes, box_indices=batch, **kw))
    nchw = roi_align(x.transpose(0, 3, 1, 2), boxes, box_indices=batch, data_format="NCHW", **kw)
    np.testing.assert_array_equal(np.asarray(nchw).transpose(0, 2, 3, 1), ref)
    rows = np.concatenate([batch[:, None], boxes], axis=1)
    np.testing.assert_array_equal(np.asarray(roi_align(x, rows, **kw)), ref)
    per_image = np.stack([boxes[:8], boxes[8:]])
    out = roi_align(x, per_image, **kw)
    assert out.shape == (2, 8, 3, 2, C)
    np.testing.assert_array_equal(np.asarray(out[1]), np.asarray(roi_align(x[1:], boxes[8:], **kw)))
    for dt, tol in ((jnp.bfloat16, 0.05), (jnp.float16, 5e-3)):
        low = roi_align(x.astype(dt), boxes.astype(dt), box_indices=batch, **kw)
        assert low.dtype == dt
        ref_low = roi_align(
            np.asarray(x.astype(dt)).astype(np.float64),
            np.asarray(boxes.astype(dt)).astype(np.float64),
            box_indices=batch,
            **kw,
        )
        np.testing.assert_allclose(np.asarray(low, np.float64), ref_low, atol=tol * 4, rtol=tol)
    bad = rows.copy()
    bad[0, 2] = np.nan
    bad[1, 0] = 7.0
    out = np.asarray(roi_align(x, bad, **kw))
    assert np.all(out[:2] == 0.0) and np.isfinite(out).all()
    np.testing.assert_array_equal(out[2:], ref[2:])


# Each value of both options.
@pytest.mark.parametrize(
    ("aligned", "sampling_ratio"), [(True, 2), (False, 0)], ids=["True-fixed", "False-adaptive"]
)
@pytest.mark.slow
def test_tpu_reader_matches_reference_and_default_gradients(aligned, sampling_ratio):
    # implementation="window" (what ``auto`` lowers to on TPU): the samples read through the
    # box-local windows in blocks, each box's block folded into the running maximum
    # and its first winner. A map larger than the reader's windows, every kind of
    # box (adaptive bins of hundreds of samples: many blocks), flat and per image.
    # Image 1 has no positive value: many bins' largest samples are exact zeros,
    # ties on both paths, and the first winner must be the gather path's (the
    # gradients say so).
    rng = np.random.default_rng(8)
    h, w = 40, 70
    x = rng.standard_normal((N, h, w, C))
    x[1] = np.minimum(x[1], 0.0)
    boxes = random_boxes(rng, 32) * np.array([w / W, h / H, w / W, h / H])
    boxes[16:18] = [[-5.0, -3.0, 75.0, 44.0], [10.0, 5.0, 60.0, 35.0]]  # image 1, large
    batch = np.repeat(np.arange(N), 16)
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, aligned=aligned, mode="max")

    def pool(method, per_image=False):
        if per_image:
            return jax.jit(
                lambda f, b: jr.roi_align(f, b.reshape(N, 16, 4), implementation=method, **kw)
            )
        return jax.jit(
            lambda f, b: jr.roi_align(f, b, box_indices=batch, implementation=method, **kw)
        )

    out = pool("window")(x, boxes)
    ref = roi_align_ref(x, boxes, batch, (3, 4), 1.0, sampling_ratio, aligned, mode="max")
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-12)
    per_image = pool("window", per_image=True)(x, boxes)
    np.testing.assert_allclose(np.asarray(per_image).reshape(out.shape), out, rtol=0, atol=1e-12)
    cot = np.cos(np.arange(out.size)).reshape(out.shape)

    def grads(fn):
        loss = lambda f, b: jnp.sum(fn(f, b).reshape(cot.shape) * cot)  # noqa: E731
        return jax.grad(loss, argnums=(0, 1))(x, boxes)

    got, want = grads(pool("window")), grads(pool(None))
    for g, w_ in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=0, atol=1e-10)
    assert np.abs(np.asarray(got[1])).max() > 0.01  # box gradients flow
    got_i = grads(pool("window", per_image=True))
    for g, w_ in zip(got_i, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=0, atol=1e-10)


@pytest.mark.parametrize("sampling_ratio", [2, 0], ids=["fixed", "adaptive"])
@pytest.mark.slow
def test_tpu_reader_non_finite_features(sampling_ratio):
    # The window is contracted whole: a NaN or an infinity in the cells a box's
    # window reads makes that box's bins NaN (documented), never a finite wrong
    # value, never -inf; boxes whose windows hold none are exact.
    rng = np.random.default_rng(9)
    h, w = 40, 70
    x = rng.standard_normal((N, h, w, C))
    x[0, 3:9, 4:20] = np.nan
    x[1, 30:, 60:, 1] = -np.inf
    boxes = random_boxes(rng, 32) * np.array([w / W, h / H, w / W, h / H])
    batch = np.repeat(np.arange(N), 16)
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, mode="max", box_indices=batch)
    got = np.asarray(jr.roi_align(x, boxes, implementation="window", **kw))
    want = np.asarray(jr.roi_align(x, boxes, implementation="gather", **kw))
    assert not np.isinf(got).any()
    finite = ~np.isnan(got)
    np.testing.assert_allclose(got[finite], want[finite], rtol=0, atol=1e-12)
    assert finite.mean() > 0.5  # most boxes are far from the non-finite cells
    assert np.isnan(got).any()


def test_traces_once():
    x = np.zeros((1, H, W, 1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, b):
        return roi_align(x, b, output_size=2, mode="max")

    f(x, np.array([[0.0, 0.0, 4.0, 4.0]]))
    f(x, np.array([[1.0, 0.0, 400.0, 4.0]]))
