"""precise_roi_pool against the per-cell loop reference, quadrature, and finite differences."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference_pool import precise_quadrature_ref, precise_roi_pool_ref

from jax_roialign import precise_roi_pool
from jax_roialign._precise import bin_edges, integral_window
from jax_roialign._tuning import TUNING


def _boxes(rng, k, lo, hi, h, w):
    size = rng.uniform(lo, hi, (k, 2))
    x1 = rng.uniform(-3, w + 1, k)
    y1 = rng.uniform(-3, h + 1, k)
    return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1)


def test_against_references_fast_and_dense():
    """Small boxes (window taps) and batches with huge boxes (dense fallback), one trace:
    equal to the literal per-cell formula and to Gauss-Legendre quadrature of the
    bilinear surface (zero outside the map), within 1e-12."""
    rng = np.random.default_rng(0)
    h, w, size, scale = 9, 13, (3, 4), 0.5
    features = rng.standard_normal((2, h, w, 3))
    fn = jax.jit(
        chex.assert_max_traces(
            lambda f, b, i: precise_roi_pool(
                f, b, output_size=size, spatial_scale=scale, box_indices=i
            ),
            n=1,
        )
    )
    windows_needed = []
    for hi in (5.0, 40.0):
        boxes = _boxes(rng, 12, 0.0, hi, h, w)
        boxes[0] = [3.0, 2.0, 1.0, 6.0]  # negative width: zero area
        boxes[1] = [-40.0, -30.0, -20.0, -10.0]  # far outside
        idx = rng.integers(0, 2, 12)
        out = fn(features, boxes / scale, idx)
        ref = precise_roi_pool_ref(features, boxes / scale, idx, size, scale)
        quad = precise_quadrature_ref(features, boxes / scale, idx, size, scale)
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
        np.testing.assert_allclose(out, quad, rtol=0, atol=1e-12)
        assert np.all(np.asarray(out)[:2] == 0)
        b = jnp.asarray(boxes)
        need = [
            int(
                jnp.max(
                    integral_window(
                        *bin_edges(b[:, i], b[:, i + 2], pooled=p, spatial_scale=1.0), n
                    )[1]
                )
            )
            - min(n, TUNING.half_map_window(n, p) + 1)
            for i, p, n in ((1, size[0], h), (0, size[1], w))
        ]
        windows_needed.append(max(need))
    assert windows_needed[0] <= 0 < windows_needed[1]  # the fast branch, then the dense one


def test_known_values():
    """A map of ones: 1 for any bin inside [0, H-1] x [0, W-1]; over [-1, 0] in y the
    surface rises linearly from 0 to 1, so the average is 1/2; beyond [-1, H] it is 0."""
    f = np.ones((1, 5, 6, 1))
    boxes = np.array(
        [[1.0, 1.0, 4.0, 3.5], [1.0, -1.0, 4.0, 0.0], [1.0, -3.0, 4.0, -1.0], [0.5, 3.5, 2.5, 5.0]]
    )
    out = jax.jit(lambda f, b: precise_roi_pool(f, b, output_size=1))(f, boxes)
    # last box: y in [3.5, 5]: 1 on [3.5, 4], then 1 - t on [4, 5] -> (0.5 + 0.5) / 1.5
    np.testing.assert_allclose(np.asarray(out)[:, 0, 0, 0], [1.0, 0.5, 0.0, 2.0 / 3.0], atol=1e-15)


def test_gradients_features_and_boxes():
    """check_grads (float64, reverse mode) with respect to features and box coordinates,
    through both branches (a batch with a huge box takes the dense one)."""
    rng = np.random.default_rng(1)
    f = rng.standard_normal((1, 6, 7, 2))
    boxes = np.array([[1.3, 0.7, 5.2, 4.9], [-1.7, -0.6, 3.3, 2.1], [0.4, 0.3, 0.9, 0.8]])
    small = np.concatenate([boxes, [[2.6, 3.1, 4.4, 5.3]]])
    huge = np.concatenate([boxes, [[-9.1, -8.3, 15.2, 13.7]]])  # same shapes: one compile
    fn = jax.jit(lambda f, b: precise_roi_pool(f, b, output_size=(2, 3)))
    for b in (small, huge):
        check_grads(fn, (f, b), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_layouts_forms_dtype_and_invalid():
    rng = np.random.default_rng(2)
    f = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)
    rows = np.array(
        [
            [0, 1.0, 1.5, 6.0, 5.5],
            [1, -2.0, 0.5, 3.0, 9.0],
            [1, np.nan, 1.0, 4.0, 4.0],
            [3, 1.0, 1.0, 4.0, 4.0],  # batch index out of range
        ],
        np.float32,
    )

    @jax.jit
    def run(f, rows):
        nhwc = precise_roi_pool(f, rows, output_size=(2, 2))
        nchw = precise_roi_pool(
            f.transpose(0, 3, 1, 2), rows, output_size=(2, 2), data_format="NCHW"
        )
        split = precise_roi_pool(
            f, rows[:, 1:], output_size=(2, 2), box_indices=rows[:, 0].astype(jnp.int32)
        )
        per_image = precise_roi_pool(f, rows[:2, 1:][:, None], output_size=(2, 2))
        return nhwc, nchw, split, per_image

    nhwc, nchw, split, per_image = run(f, rows)
    assert nhwc.dtype == jnp.float32 and nhwc.shape == (4, 2, 2, 3)
    ref = precise_roi_pool_ref(
        f.astype(np.float64), rows[:2, 1:].astype(np.float64), [0, 1], (2, 2), 1.0
    )
    np.testing.assert_allclose(nhwc[:2], ref, rtol=0, atol=1e-5)
    assert np.all(np.asarray(nhwc)[2:] == 0)
    np.testing.assert_allclose(nchw, np.asarray(nhwc).transpose(0, 3, 1, 2), rtol=0, atol=1e-6)
    np.testing.assert_allclose(split, nhwc, rtol=0, atol=1e-6)  # float32: fusion may differ
    assert per_image.shape == (2, 1, 2, 2, 3)
    np.testing.assert_allclose(per_image[:, 0], nhwc[:2], rtol=0, atol=1e-6)
    grad = jax.jit(jax.grad(lambda f, r: jnp.sum(precise_roi_pool(f, r, output_size=2)), (0, 1)))
    gf, gb = grad(f, rows[2:])
    assert np.all(np.asarray(gf) == 0) and np.all(np.asarray(gb)[:, 1:] == 0)
    assert precise_roi_pool(f, np.zeros((0, 5), np.float32), output_size=2).shape == (0, 2, 2, 3)


def test_errors():
    f = np.zeros((1, 5, 5, 2))
    b = np.zeros((3, 4))
    with pytest.raises(ValueError, match="output_size"):
        precise_roi_pool(f, b, output_size=(0, 2))
    with pytest.raises(ValueError, match="spatial_scale"):
        precise_roi_pool(f, b, output_size=2, spatial_scale=float("inf"))
    with pytest.raises(ValueError, match="4-D"):
        precise_roi_pool(np.zeros((5, 5, 2)), b, output_size=2)
    with pytest.raises(ValueError, match="boxes"):
        precise_roi_pool(f, np.zeros((2, 3, 4)), output_size=2)
    with pytest.raises(TypeError, match="box_indices"):
        precise_roi_pool(f, b, output_size=2, box_indices=np.zeros(3))
