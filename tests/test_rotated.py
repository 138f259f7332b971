"""roi_align_rotated against float64 loop references (detectron2 and mmcv conventions)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference_sampled import roi_align_rotated_ref

import jax_roialign as jr
from jax_roialign import _rotated

N, C, H, W = 2, 3, 9, 13
_STATIC = (
    "output_size",
    "spatial_scale",
    "sampling_ratio",
    "aligned",
    "clockwise",
    "angle_unit",
    "data_format",
)
rotated = jax.jit(jr.roi_align_rotated, static_argnames=_STATIC)


def random_rotated(rng: np.random.Generator, k: int) -> np.ndarray:
    """(cx, cy, w, h, angle in degrees): tiny to huge, zero-size, far outside, any angle."""
    ctr = rng.uniform(-0.2, 1.2, (k, 2)) * np.array([W, H])
    factor = rng.choice([0.03, 0.3, 1.0, 4.0, 0.0], size=(k, 1))
    size = rng.uniform(0.2, 1.0, (k, 2)) * np.array([W, H]) * factor
    angle = rng.uniform(-200.0, 200.0, (k, 1))
    angle[rng.random(k) < 0.2] = 0.0
    boxes = np.concatenate([ctr, size, angle], axis=1)
    boxes[rng.random(k) < 0.1, :2] += np.array([4 * W, -3 * H])
    return boxes


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, H, W, C))
    boxes = random_rotated(rng, 40)
    boxes[0] = [6.03, 4.07, 70.3, 90.1, 33.0]  # needs a long scan (many samples per bin)
    boxes[1] = [6.1, 4.2, 200.3, 3.1, -71.0]
    batch = rng.integers(0, N, len(boxes))
    return x, boxes, batch


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_detectron2_convention(data, sampling_ratio):
    x, boxes, batch = data
    ours = rotated(x, boxes, box_indices=batch, output_size=(3, 4), sampling_ratio=sampling_ratio)
    ref = roi_align_rotated_ref(x, boxes, batch, (3, 4), 1.0, sampling_ratio)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("sampling_ratio", [0, 3])
def test_mmcv_convention(data, sampling_ratio):
    """Radians, clockwise, aligned=False (no shift, min size 1), spatial_scale 0.5."""
    x, boxes, batch = data
    boxes = boxes.copy()
    boxes[:, :4] /= 0.5
    boxes[:, 4] = np.deg2rad(boxes[:, 4])
    ours = rotated(
        x,
        boxes,
        box_indices=batch,
        output_size=(2, 3),
        spatial_scale=0.5,
        sampling_ratio=sampling_ratio,
        aligned=False,
        clockwise=True,
        angle_unit="radians",
    )
    ref = roi_align_rotated_ref(
        x, boxes, batch, (2, 3), 0.5, sampling_ratio, aligned=False, clockwise=True, degrees=False
    )
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-13)


# Each value of both options.
@pytest.mark.parametrize(
    ("data_format", "sampling_ratio"),
    [("NHWC", 0), ("NCHW", 3)],
    ids=["NHWC-adaptive", "NCHW-fixed"],
)
@pytest.mark.slow
def test_tpu_reader_same_numbers_and_gradients(data, data_format, sampling_ratio):
    # The box-local window reader (the default on TPU) runs here too: every sample
    # a point of one window per box (tiles when larger); adaptive grids in blocks
    # of samples (the module's huge boxes: many blocks). Float64, against the
    # reference (the module's boxes: huge, zero-size, far outside) and, per image
    # on a map larger than the windows, against the default path: outputs and
    # gradients in the features and the boxes.
    x, boxes, batch = data
    f = x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, data_format=data_format)
    window = jr.roi_align_rotated(f, boxes, box_indices=batch, **kw, implementation="window")
    ours = np.asarray(window)
    ref = roi_align_rotated_ref(x, boxes, batch, (3, 4), 1.0, sampling_ratio)
    ours = ours if data_format == "NHWC" else ours.transpose(0, 2, 3, 1)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-13)

    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 40, 70, 3))
    f = x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)
    per_image = np.concatenate(
        [
            rng.uniform(-10, 80, (2, 12, 2)),
            rng.uniform(0, 40, (2, 12, 2)),
            rng.uniform(-180, 180, (2, 12, 1)),
        ],
        -1,
    )
    per_image[0, 0] = [35.0, 20.0, 150.0, 120.0, 30.0]  # larger than the map
    per_image[0, 1] = [10.0, 10.0, 0.0, 20.0, 10.0]  # zero width
    per_image[1, 0] = [65.0, 5.0, 30.0, 30.0, 45.0]  # partly outside
    per_image[1, 1] = [20.0, 20.0, -5.0, 10.0, 20.0]  # negative width: an empty grid

    def run(reader):
        def pool(f, b):
            ratio = min(sampling_ratio, 2)
            kw_r = dict(kw, sampling_ratio=ratio, implementation=reader)
            return jr.roi_align_rotated(f, b, spatial_scale=0.9, **kw_r)

        out, vjp = jax.vjp(jax.jit(pool), f, per_image)
        return out, *vjp(np.cos(np.arange(out.size)).reshape(out.shape))

    got, want = run("window"), run(None)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12)
    assert np.abs(np.asarray(got[2])).max() > 0.1  # box gradients flow


def test_tiers_cover_the_static_bound():
    """The longest scan covers every sample that can land on the map."""
    bound = _rotated._max_window(H, W)
    diag = np.hypot(H + 1, W + 1)
    assert bound >= 2 * diag + 4
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, H, W, 1))
    # Bins of ~40 cells: ceil(40) samples per axis, of which ~2 * diag can be valid.
    boxes = np.array([[6.0, 4.0, 160.0, 160.0, 45.0], [6.0, 4.0, 160.0, 160.0, 0.0]])
    ours = rotated(x, boxes, output_size=(4, 4), sampling_ratio=0)
    ref = roi_align_rotated_ref(x, boxes, np.zeros(2, int), (4, 4), 1.0, 0)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-13)


def test_a_boxs_numbers_do_not_depend_on_the_other_boxes(data):
    """Adaptive grids: each box scans as many samples as its own bins need (the
    boxes sorted by that count, in chunks). A box among boxes of every size,
    huge and far outside the map among them, has the output and the box
    gradient it has alone (the same bits with jax 0.10; the XLA of older
    versions may round a chunk of 16 boxes and a chunk of one differently)."""
    x, boxes, batch = data
    rng = np.random.default_rng(9)
    x = jnp.asarray(x, jnp.float32)
    rows = jnp.asarray(np.concatenate([batch[:, None], boxes], axis=1), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((len(rows), 3, 4, C)), jnp.float32)

    @jax.jit
    def out_and_box_grad(rows, cot):
        def loss(r):
            out = jr.roi_align_rotated(x, r, output_size=(3, 4), sampling_ratio=0)
            return jnp.sum(out * cot), out

        return jax.grad(loss, has_aux=True)(rows)[::-1]

    out, grad = out_and_box_grad(rows, cot)
    alone = [out_and_box_grad(rows[i : i + 1], cot[i : i + 1]) for i in range(len(rows))]
    out_1, grad_1 = map(np.concatenate, zip(*alone, strict=True))
    np.testing.assert_allclose(np.asarray(out), out_1, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), grad_1, rtol=1e-5, atol=1e-5)


def test_samples_exactly_on_the_border():
    """Integer boxes put samples exactly on -1 and H: they read the edge, not 0."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, H, W, 2))
    boxes = np.array([[6.0, 4.0, 70.0, 90.0, 0.0], [6.0, 4.0, 90.0, 70.0, 90.0]])
    ours = rotated(x, boxes, output_size=(3, 4), sampling_ratio=0)
    ref = roi_align_rotated_ref(x, boxes, np.zeros(2, int), (3, 4), 1.0, 0)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_angle_zero_equals_roi_align(data, sampling_ratio):
    x, boxes, batch = data
    b = boxes.copy()
    b[:, 4] = 0.0
    ours = rotated(x, b, box_indices=batch, output_size=(3, 4), sampling_ratio=sampling_ratio)
    corners = np.concatenate([b[:, :2] - b[:, 2:4] / 2, b[:, :2] + b[:, 2:4] / 2], axis=1)
    ref = jax.jit(jr.roi_align, static_argnames=("output_size", "sampling_ratio"))(
        x, corners, box_indices=batch, output_size=(3, 4), sampling_ratio=sampling_ratio
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-12)


def test_quarter_and_half_turns(data):
    """Turning the map a quarter (with the box) leaves the output; a half turn flips it."""
    x, boxes, batch = data
    # x'[i, j] = x[j, W - 1 - i]: a map point (y, x) moves to (W - 1 - x, y).
    turned = np.rot90(x, k=1, axes=(1, 2))
    b = boxes.copy()
    b[:, 0], b[:, 1] = boxes[:, 1], W - boxes[:, 0]  # centre (cx, cy) -> (cy, W - cx)
    b[:, 4] = boxes[:, 4] + 90.0
    kw = dict(box_indices=batch, output_size=(3, 4), sampling_ratio=0)
    out = np.asarray(rotated(x, boxes, **kw))
    np.testing.assert_allclose(np.asarray(rotated(turned, b, **kw)), out, rtol=0, atol=1e-12)
    half = boxes.copy()
    half[:, 4] += 180.0
    flipped = np.asarray(rotated(x, half, **kw))[:, ::-1, ::-1]
    np.testing.assert_allclose(flipped, out, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_gradients_features_and_boxes(sampling_ratio):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, H, W, 2))
    boxes = np.array(
        [[5.3, 4.1, 6.2, 3.7, 27.0], [1.2, 7.6, 9.1, 5.3, -113.0], [6.7, 3.9, 30.2, 17.7, 61.0]]
    )

    @jax.jit
    def f(feat, b):
        return jr.roi_align_rotated(feat, b, output_size=(2, 2), sampling_ratio=sampling_ratio)

    check_grads(f, (x, boxes), order=1, modes=["rev", "fwd"], eps=1e-6, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_angle_gradient_matches_finite_difference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, H, W, 1))
    box = np.array([[6.1, 4.3, 7.9, 4.6, 20.0]])

    @jax.jit
    def f(angle):
        b = jnp.asarray(box).at[0, 4].set(angle)
        return jnp.sum(jr.roi_align_rotated(x, b, output_size=2, sampling_ratio=0) ** 2)

    g = jax.grad(f)(20.0)
    fd = (f(20.0 + 1e-6) - f(20.0 - 1e-6)) / 2e-6
    assert abs(g) > 1e-3
    np.testing.assert_allclose(g, fd, rtol=1e-5)


def test_forms_layouts_dtypes_and_invalid_boxes(data):
    x, boxes, batch = data
    boxes, batch = boxes[2:18], batch[2:18]
    kw = dict(output_size=(2, 3), sampling_ratio=0)
    ref = np.asarray(rotated(x, boxes, box_indices=batch, **kw))
    rows = np.concatenate([batch[:, None], boxes], axis=1)
    np.testing.assert_array_equal(np.asarray(rotated(x, rows, **kw)), ref)
    nchw = rotated(x.transpose(0, 3, 1, 2), rows, data_format="NCHW", **kw)
    np.testing.assert_array_equal(np.asarray(nchw).transpose(0, 2, 3, 1), ref)
    per_image = rotated(x, np.stack([boxes[batch == 0][:3], boxes[batch == 1][:3]]), **kw)
    assert per_image.shape == (2, 3, 2, 3, C)
    np.testing.assert_array_equal(np.asarray(per_image[1]), ref[batch == 1][:3])
    low = rotated(x.astype(jnp.bfloat16), rows.astype(jnp.float32), **kw)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float64), ref, atol=0.05, rtol=0.02)
    bad = rows.copy()
    bad[0, 5] = np.inf
    bad[1, 0] = -1.0
    out = np.asarray(rotated(x, bad, **kw))
    assert np.all(out[:2] == 0.0)
    np.testing.assert_array_equal(out[2:], ref[2:])
    empty = rotated(x, np.zeros((0, 6)), **kw)
    assert empty.shape == (0, 2, 3, C)


def test_traces_once():
    x = np.zeros((1, H, W, 1))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(x, b):
        return jr.roi_align_rotated(x, b, output_size=2)

    f(x, np.array([[2.0, 2.0, 4.0, 4.0, 10.0]]))
    f(x, np.array([[2.0, 2.0, 400.0, 4.0, 80.0]]))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(angle_unit="grad"), ValueError, "angle_unit"),
        (dict(clockwise=1), TypeError, "clockwise"),
        (dict(aligned="yes"), TypeError, "aligned"),
        (dict(output_size=0), ValueError, "output_size"),
        (dict(spatial_scale=-1.0), ValueError, "spatial_scale"),
        (dict(sampling_ratio=1.5), TypeError, "sampling_ratio"),
    ],
)
def test_bad_options(kwargs, exc, match):
    kw = dict(output_size=2)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        jr.roi_align_rotated(np.zeros((1, 4, 4, 1)), np.zeros((1, 6)), **kw)


def test_bad_boxes():
    x = np.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="cx, cy, w, h, angle"):
        jr.roi_align_rotated(x, np.zeros((3, 4)), output_size=2)
    with pytest.raises(ValueError, match="box_indices"):
        jr.roi_align_rotated(x, np.zeros((3, 5)), output_size=2)
    with pytest.raises(ValueError, match="box_indices"):
        jr.roi_align_rotated(x, np.zeros((3, 5)), box_indices=np.array([0, 1, 2]), output_size=2)
