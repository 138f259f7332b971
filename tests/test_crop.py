"""crop_and_resize and multilevel_crop_and_resize: TensorFlow's numbers (golden file from
tools/make_golden_tf.py, and live when TensorFlow is importable), float64 NumPy loop
references, gradients, transformations, bad input, Flax modules."""

from __future__ import annotations

import json
import pathlib
import sys

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads
from reference_tf import crop_and_resize_ref, multilevel_crop_and_resize_ref

from jax_roialign import crop_and_resize, multilevel_crop_and_resize, roi_align
from jax_roialign import linen as jlinen
from jax_roialign import nnx as jnnx
from jax_roialign._crop import model_garden_levels

GOLDEN = pathlib.Path(__file__).parent / "golden" / "tf_crop.npz"
TOOLS = pathlib.Path(__file__).resolve().parent.parent / "tools"


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    return z, json.loads(str(z["configs"]))


def _with_vjp(f, argnums):
    """``jit`` of ``(out, grads of argnums)`` for a cotangent: one compilation."""

    def run(*args):
        g = args[-1]
        args = args[:-1]
        diff = [args[i] for i in argnums]

        def part(*d):
            full = list(args)
            for i, v in zip(argnums, d, strict=True):
                full[i] = v
            return f(*full)

        out, vjp = jax.vjp(part, *diff)
        return (out, *vjp(g))

    return jax.jit(run)


def _check_rev(f, args, order=2, eps=1e-6):
    """``check_grads(f, args, order, modes=["rev"])`` with the second-order
    function jitted too (check_grads runs it op by op: several times slower)."""
    check_grads(f, args, order=1, modes=["rev"], eps=eps)
    if order == 2:

        def f_vjp(*a):
            out, vjp = jax.vjp(f, *a)
            return vjp(out)

        check_grads(jax.jit(f_vjp), args, order=1, modes=["rev"], eps=eps)


def _grad_close(got, want):
    # Gradients sum the same products in another order: float32 rounding only.
    scale = max(float(np.abs(want).max()), 1.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-6 * scale)


# ---------------------------------------------------------------- golden: TensorFlow


@pytest.mark.parametrize("i", range(14))
def test_crop_and_resize_golden(golden, i):
    z, meta = golden
    cfg = meta["crop"][i]
    image = z[f"image_{cfg['image']}"]
    idx = z[f"crop_indices_{cfg['image']}"]
    boxes = z["crop_boxes"]

    def f(im, b):
        return crop_and_resize(
            im,
            b,
            idx,
            tuple(cfg["crop"]),
            method=cfg["method"],
            extrapolation_value=cfg["extrapolation"],
        )

    g = jnp.asarray(z[f"c{i}_grad_output"])
    if image.dtype == np.float32:
        out, grad_image, grad_boxes = _with_vjp(f, (0, 1))(image, boxes, g)
        _grad_close(grad_image, z[f"c{i}_grad_image"])
    else:
        out, grad_boxes = _with_vjp(f, (1,))(image, boxes, g)
    assert out.dtype == jnp.float32
    # float32: TensorFlow's bits, extrapolation masks included.
    np.testing.assert_array_equal(np.asarray(out), z[f"c{i}_output"])
    if cfg["method"] == "bilinear":
        _grad_close(grad_boxes, z[f"c{i}_grad_boxes"])
    else:  # nearest: zero (TensorFlow returns the bilinear box gradient there)
        assert not np.any(np.asarray(grad_boxes))
    if cfg["method"] == "bilinear":
        # The float64 loop reference agrees with TensorFlow up to float32 rounding
        # (nearest is discontinuous at half-cells, where the rounding decides).
        ref = crop_and_resize_ref(
            image, boxes, idx, cfg["crop"], cfg["method"], cfg["extrapolation"]
        )
        scale = max(float(np.abs(image).max()), 1.0)
        np.testing.assert_allclose(z[f"c{i}_output"], ref, rtol=0, atol=2e-6 * scale)


def _mg_inputs(z, cfg, i):
    feats = {str(level): z[f"m{i}_l{level}"] for level in cfg["levels"]}
    return feats, z[f"m{i}_boxes"]


@pytest.mark.parametrize("i", range(4))
def test_multilevel_golden(golden, i):
    z, meta = golden
    cfg = meta["model_garden"][i]
    feats, boxes = _mg_inputs(z, cfg, i)

    def f(fe, b):
        return multilevel_crop_and_resize(fe, b, cfg["output_size"], cfg["sample_offset"])

    g = jnp.asarray(z[f"m{i}_grad_output"])
    out, grad_feats, grad_boxes = _with_vjp(f, (0, 1))(feats, boxes, g)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out), z[f"m{i}_output"])
    levels = jax.jit(model_garden_levels, static_argnums=(1, 2))(
        jnp.asarray(boxes), cfg["levels"][0], cfg["levels"][-1]
    )
    np.testing.assert_array_equal(np.asarray(levels), z[f"m{i}_levels"])
    for key in feats:
        _grad_close(grad_feats[key], z[f"m{i}_grad_l{key}"])
    _grad_close(grad_boxes, z[f"m{i}_grad_boxes"])
    # The TensorFlow-ops reproduction in tools/ agrees with the float64 loop reference.
    ref = multilevel_crop_and_resize_ref(feats, boxes, cfg["output_size"], cfg["sample_offset"])
    scale = max(float(np.abs(ref).max()), 1.0)
    np.testing.assert_allclose(z[f"m{i}_output"], ref, rtol=0, atol=1e-6 * scale)


# ---------------------------------------------------------------- float64 references


def _boxes(rng, k, lo=-0.3, hi=1.3):
    return rng.uniform(lo, hi, (k, 4))


@pytest.mark.parametrize("method", ["bilinear", "nearest"])
@pytest.mark.parametrize("crop", [(1, 1), (1, 3), (4, 1), (6, 5)])
def test_crop_matches_reference_float64(method, crop):
    rng = np.random.default_rng(1)
    image = rng.standard_normal((3, 7, 5, 2))
    boxes = _boxes(rng, 25)
    idx = rng.integers(0, 3, 25)
    out = jax.jit(
        lambda x, b: crop_and_resize(x, b, idx, crop, method=method, extrapolation_value=-3.0)
    )(image, boxes)
    assert out.dtype == jnp.float64
    ref = crop_and_resize_ref(image, boxes, idx, crop, method, -3.0)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-12)


def test_multilevel_matches_reference_float64():
    rng = np.random.default_rng(2)
    feats = {lv: rng.standard_normal((2, 32 >> (lv - 2), 40 >> (lv - 2), 3)) for lv in (2, 3, 4)}
    size = np.exp(rng.uniform(np.log(3.0), np.log(600.0), (2, 20)))
    cy, cx = rng.uniform(-20, 150, (2, 2, 20))
    boxes = np.stack([cy - size / 2, cx - size / 3, cy + size / 2, cx + size / 3], axis=-1)
    out = jax.jit(lambda fe, b: multilevel_crop_and_resize(fe, b, 5, 0.3))(feats, boxes)
    assert out.shape == (2, 20, 5, 5, 3) and out.dtype == jnp.float64
    ref = multilevel_crop_and_resize_ref(feats, boxes, 5, 0.3)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-10)


def test_zero_area_and_reversed_boxes_take_the_lowest_level():
    boxes = jnp.asarray([[3.0, 4.0, 3.0, 90.0], [50.0, 10.0, 10.0, 900.0], [0, 0, 448.0, 448.0]])
    np.testing.assert_array_equal(np.asarray(model_garden_levels(boxes, 2, 6)), [2, 2, 5])


def test_crop_and_resize_is_roi_align_with_one_centred_sample():
    # README, Coming from TensorFlow: roi_align(sampling_ratio=1, aligned=True) on
    # boxes in map cells equals crop_and_resize on the box grown by half a bin,
    # y1_tf = (y1 + s/2 - 1/2) / (H - 1), y2_tf = (y2 - s/2 - 1/2) / (H - 1), s = (y2 - y1) / P,
    # while every sample lies inside the map.
    rng = np.random.default_rng(9)
    h, w, k = 9, 11, 16
    f = rng.standard_normal((2, h, w, 2))
    y1, x1 = rng.uniform(0.5, h / 2, k), rng.uniform(0.5, w / 2, k)
    y2, x2 = y1 + rng.uniform(0.5, h / 2 - 0.5, k), x1 + rng.uniform(0.5, w / 2 - 0.5, k)
    idx = rng.integers(0, 2, k)
    for p, q in [(1, 1), (4, 3)]:
        want = jax.jit(
            lambda f, b, p=p, q=q: roi_align(
                f, b, output_size=(p, q), sampling_ratio=1, aligned=True, box_indices=idx
            )
        )(f, np.stack([x1, y1, x2, y2], 1))
        sy, sx = (y2 - y1) / p, (x2 - x1) / q
        tf_boxes = np.stack(
            [
                (y1 + 0.5 * sy - 0.5) / (h - 1),
                (x1 + 0.5 * sx - 0.5) / (w - 1),
                (y2 - 0.5 * sy - 0.5) / (h - 1),
                (x2 - 0.5 * sx - 0.5) / (w - 1),
            ],
            1,
        )
        got = jax.jit(lambda f, b, p=p, q=q: crop_and_resize(f, b, idx, (p, q)))(f, tf_boxes)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-12)


# ---------------------------------------------------------------- gradients


def test_crop_gradients_float64():
    rng = np.random.default_rng(3)
    image = rng.standard_normal((2, 4, 5, 1))
    boxes = rng.uniform(0.05, 0.95, (3, 4))
    # Partly outside, flipped (no sample on an integer: a kink, where the gradient
    # is TensorFlow's one-sided choice).
    boxes[1] = [1.23, 0.93, 0.41, 0.1]
    idx = jnp.asarray([0, 1, 1])
    # (1, 1): the box centre; (3, 2): the corner-aligned grid, also to second order.
    # Bilinear (image and boxes) and nearest (image) in one function: one compilation.
    for crop, order in [((1, 1), 1), ((3, 2), 2)]:
        f = jax.jit(
            lambda x, b, crop=crop: (
                crop_and_resize(x, b, idx, crop),
                crop_and_resize(x, boxes, idx, crop, method="nearest"),
            )
        )
        _check_rev(f, (image, boxes), order)


def test_multilevel_gradients_float64():
    rng = np.random.default_rng(4)
    feats = {str(lv): rng.standard_normal((1, 16 >> (lv - 2), 12 >> (lv - 2), 2)) for lv in (2, 3)}
    boxes = np.asarray(
        [[[-5.0, 3.3, 20.7, 30.1], [10.2, 7.1, 80.3, 50.6], [40.1, 30.2, 90.6, 70.4]]]
    )
    f = jax.jit(lambda fe, b: multilevel_crop_and_resize(fe, b, output_size=3))
    _check_rev(f, (feats, boxes), order=2)


@pytest.mark.slow
def test_tpu_reader_same_numbers_and_gradients():
    # The box-local window reader (the default on TPU) runs here too: the same sums
    # as dense weights over one window per box, against the default path
    # (TensorFlow's bits), float64: outputs, image/feature and box gradients, the
    # extrapolation value's; bilinear and nearest, every kind of box.
    rng = np.random.default_rng(12)
    image = rng.standard_normal((2, 33, 65, 3))  # larger than the reader's windows
    # Samples on rows 3, 7, ..., 19 and columns 5, 9, ..., 21 exactly (17 rows and
    # columns: one more than the small window), a point, a flipped box, boxes
    # across the border, a NaN box.
    exact = [3 / 32, 5 / 64, 19 / 32, 21 / 64]
    boxes = np.concatenate([_boxes(rng, 9), [exact, [0.2, 0.3, 0.2, 0.3], [0.9, 0.8, 0.1, 0.3]]])
    boxes[3] = [np.nan, 0.1, 0.5, 0.5]
    idx = rng.integers(0, 2, len(boxes))
    feats = {lv: rng.standard_normal((2, 32 >> (lv - 2), 40 >> (lv - 2), 2)) for lv in (2, 3, 4)}
    size = np.exp(rng.uniform(np.log(3.0), np.log(600.0), (2, 8)))
    cy, cx = rng.uniform(-20, 150, (2, 2, 8))
    mboxes = np.stack([cy - size / 2, cx - size / 3, cy + size / 2, cx + size / 3], axis=-1)

    def run(reader):
        def both(image, boxes, extra, feats, mboxes):
            return (
                crop_and_resize(
                    image, boxes, idx, (5, 5), extrapolation_value=extra, implementation=reader
                ),
                crop_and_resize(image, boxes, idx, (1, 3), method="nearest", implementation=reader),
                multilevel_crop_and_resize(feats, mboxes, output_size=3, implementation=reader),
            )

        args = (image, boxes, np.float64(0.7), feats, mboxes)
        out, vjp = jax.vjp(jax.jit(both), *args)
        return out, vjp(jax.tree.map(lambda o: np.cos(np.arange(o.size)).reshape(o.shape), out))

    got, want = run("window"), run(None)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12)
    assert np.abs(np.asarray(got[1][1])).max() > 0.1  # the box gradient is not all zeros


def test_integer_image_box_gradient():
    rng = np.random.default_rng(5)
    image = rng.integers(0, 255, (1, 5, 6, 2)).astype(np.uint8)
    boxes = jnp.asarray(rng.uniform(0.1, 0.9, (3, 4)), jnp.float32)
    idx = jnp.zeros(3, jnp.int32)
    g = jax.jit(jax.grad(lambda b: crop_and_resize(image, b, idx, (3, 3)).sum()))(boxes)
    want = jax.jit(
        jax.grad(lambda b: crop_and_resize(image.astype(np.float64), b, idx, (3, 3)).sum())
    )(boxes.astype(jnp.float64))
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-4, atol=1e-3)
    out = jax.eval_shape(lambda b: crop_and_resize(image, b, idx, (3, 3)), boxes)
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("shape", [(2, 7, 5), (1, 1, 6), (1, 4, 1)])
def test_few_and_many_channels_read_alike(shape):
    """Few channels read each sample's 2 x 2 cells in one gather, more channels one
    gather per neighbour: the same float32 bits, edges and one-pixel images included."""
    rng = np.random.default_rng(11)
    n, h, w = shape
    c = 19  # more than 8 channels (one gather per neighbour); pairs read as few
    image = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    corners = [[0, 0, 1, 1], [1, 1, 0, 0], [1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5], [0, 1, 1, 0]]
    boxes = jnp.asarray(np.concatenate([corners, _boxes(rng, 40)]), jnp.float32)
    idx = jnp.asarray(rng.integers(0, n, len(boxes)), jnp.int32)
    f = jax.jit(lambda x: crop_and_resize(x, boxes, idx, (5, 4), extrapolation_value=0.5))
    many = f(image)
    few = jnp.concatenate([f(image[..., i : i + 2]) for i in range(0, c, 2)], axis=-1)
    np.testing.assert_array_equal(np.asarray(few), np.asarray(many))


# ---------------------------------------------------------------- transformations


def test_vmap_and_no_retrace():
    rng = np.random.default_rng(6)
    image = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(b, i):
        return crop_and_resize(image, b, i, (3, 2))

    for seed in range(3):
        r = np.random.default_rng(seed)
        f(jnp.asarray(_boxes(r, 8), jnp.float32), jnp.asarray(r.integers(0, 2, 8), jnp.int32))
    boxes = jnp.asarray(_boxes(rng, 12), jnp.float32).reshape(3, 4, 4)
    idx = jnp.zeros((3, 4), jnp.int32)
    out = jax.jit(jax.vmap(lambda b, i: crop_and_resize(image, b, i, (3, 2))))(boxes, idx)
    ref = jax.jit(lambda b, i: crop_and_resize(image, b, i, (3, 2)))(
        boxes.reshape(12, 4), idx.reshape(12)
    )
    np.testing.assert_array_equal(np.asarray(out).reshape(ref.shape), np.asarray(ref))
    # vmap of the gradient (the row-window transpose's batching rule).
    gv = jax.jit(jax.vmap(jax.grad(lambda x, b: crop_and_resize(x, b, idx[0], (3, 2)).sum())))(
        jnp.stack([image, image * 2]), jnp.stack([boxes[0], boxes[1]])
    )
    g0 = jax.jit(jax.grad(lambda x: crop_and_resize(x, boxes[0], idx[0], (3, 2)).sum()))(image)
    np.testing.assert_allclose(np.asarray(gv[0]), np.asarray(g0), atol=1e-6)


def test_empty():
    image = jnp.ones((1, 4, 4, 3))
    out = crop_and_resize(image, jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32), (2, 5))
    assert out.shape == (0, 2, 5, 3)
    feats = {"2": jnp.ones((2, 8, 8, 3)), "3": jnp.ones((2, 4, 4, 3))}
    assert multilevel_crop_and_resize(feats, jnp.zeros((2, 0, 4))).shape == (2, 0, 7, 7, 3)


def test_bad_input():
    image = jnp.ones((1, 4, 4, 3))
    b = jnp.zeros((2, 4))
    i = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="crop_size must be at least 1"):
        crop_and_resize(image, b, i, (0, 3))
    with pytest.raises(TypeError, match="crop_size"):
        crop_and_resize(image, b, i, (2.0, 3))
    with pytest.raises(ValueError, match="method must be 'bilinear' or 'nearest'"):
        crop_and_resize(image, b, i, (2, 2), method="bicubic")
    with pytest.raises(ValueError, match=r"image must be 4-D"):
        crop_and_resize(jnp.ones((4, 4, 3)), b, i, (2, 2))
    with pytest.raises(TypeError, match="image must be a real"):
        crop_and_resize(image.astype(bool), b, i, (2, 2))
    with pytest.raises(ValueError, match=r"boxes must be \[K, 4\]"):
        crop_and_resize(image, jnp.zeros((2, 5)), i, (2, 2))
    with pytest.raises(TypeError, match="boxes must be floating"):
        crop_and_resize(image, jnp.zeros((2, 4), jnp.int32), i, (2, 2))
    with pytest.raises(ValueError, match=r"box_indices must have shape \[K\]"):
        crop_and_resize(image, b, jnp.zeros((3,), jnp.int32), (2, 2))
    with pytest.raises(TypeError, match="box_indices must be integers"):
        crop_and_resize(image, b, jnp.zeros((2,)), (2, 2))
    with pytest.raises(ValueError, match="box_indices must lie in"):
        crop_and_resize(image, b, jnp.asarray([0, 1]), (2, 2))
    with pytest.raises(ValueError, match="extrapolation_value must be a scalar"):
        crop_and_resize(image, b, i, (2, 2), extrapolation_value=jnp.zeros(2))
    feats = {"2": jnp.ones((1, 8, 8, 3)), "3": jnp.ones((1, 4, 4, 3))}
    mb = jnp.zeros((1, 2, 4))
    with pytest.raises(TypeError, match="features must be a non-empty dict"):
        multilevel_crop_and_resize([feats["2"]], mb)
    with pytest.raises(ValueError, match="consecutive levels"):
        multilevel_crop_and_resize({"2": feats["2"], "4": feats["3"]}, mb)
    with pytest.raises(ValueError, match="pyramid levels"):
        multilevel_crop_and_resize({"p2": feats["2"]}, mb)
    with pytest.raises(ValueError, match=r"boxes must be \[B, N, 4\]"):
        multilevel_crop_and_resize(feats, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="output_size must be positive"):
        multilevel_crop_and_resize(feats, mb, output_size=0)
    with pytest.raises(ValueError, match="batch size and channels"):
        multilevel_crop_and_resize({"2": feats["2"], "3": jnp.ones((1, 4, 4, 2))}, mb)


def test_traced_out_of_range_index_gives_zeros():
    image = jnp.ones((1, 4, 4, 1))
    b = jnp.asarray([[0.0, 0.0, 1.0, 1.0]] * 2)
    out = jax.jit(lambda i: crop_and_resize(image, b, i, (2, 2)))(jnp.asarray([0, 3]))
    np.testing.assert_array_equal(np.asarray(out[:, :, :, 0]), [[[1, 1], [1, 1]], [[0, 0], [0, 0]]])


# ---------------------------------------------------------------- Flax


def test_modules_equal_functions():
    rng = np.random.default_rng(7)
    image = jnp.asarray(rng.standard_normal((2, 5, 6, 3)))
    boxes = jnp.asarray(_boxes(rng, 4))
    idx = jnp.asarray([0, 1, 1, 0])
    want = jax.jit(
        lambda *a: crop_and_resize(*a, (3, 2), method="nearest", extrapolation_value=2.0)
    )(image, boxes, idx)
    m = jnnx.CropAndResize((3, 2), method="nearest", extrapolation_value=2.0)
    got = nnx.jit(lambda m, *a: m(*a))(m, image, boxes, idx)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    lm = jlinen.CropAndResize((3, 2), method="nearest", extrapolation_value=2.0)
    got = jax.jit(lambda *a: lm.apply({}, *a))(image, boxes, idx)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    feats = {"2": jnp.asarray(rng.standard_normal((1, 8, 8, 2))), "3": jnp.ones((1, 4, 4, 2))}
    mb = jnp.asarray([[[0.0, 0.0, 30.0, 30.0], [1.0, 2.0, 300.0, 200.0]]])
    want = jax.jit(lambda *a: multilevel_crop_and_resize(*a, 3, 0.25))(feats, mb)
    got = nnx.jit(lambda m, *a: m(*a))(
        jnnx.MultilevelCropAndResize(3, sample_offset=0.25), feats, mb
    )
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    got = jax.jit(jlinen.MultilevelCropAndResize(3, 0.25).apply)({}, feats, mb)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert isinstance(lm, nn.Module)


# ---------------------------------------------------------------- live TensorFlow


def test_live_tensorflow():
    tf = pytest.importorskip("tensorflow")
    sys.path.insert(0, str(TOOLS))
    from make_golden_tf import model_garden_tf

    rng = np.random.default_rng(8)
    image = (rng.standard_normal((2, 9, 11, 3)) * 10).astype(np.float32)
    boxes = rng.uniform(-0.5, 1.5, (40, 4)).astype(np.float32)
    idx = rng.integers(0, 2, 40).astype(np.int32)
    for crop, method in [((1, 1), "bilinear"), ((7, 5), "bilinear"), ((6, 4), "nearest")]:
        g = rng.integers(-3, 4, (40, *crop, 3)).astype(np.float32)
        ti, tb = tf.constant(image), tf.constant(boxes)
        with tf.GradientTape() as tape:
            tape.watch([ti, tb])
            want = tf.image.crop_and_resize(ti, tb, idx, crop, method=method)
        want_gi, want_gb = tape.gradient(want, [ti, tb], output_gradients=tf.constant(g))
        got, vjp = jax.vjp(
            lambda im, b, crop=crop, method=method: crop_and_resize(
                im, b, idx, crop, method=method
            ),
            image,
            boxes,
        )
        np.testing.assert_array_equal(np.asarray(got), want.numpy())
        got_gi, got_gb = vjp(jnp.asarray(g))
        _grad_close(got_gi, want_gi.numpy())
        if method == "bilinear":  # nearest: 0 here, the bilinear one in TensorFlow
            _grad_close(got_gb, want_gb.numpy())
    feats = {str(lv): rng.standard_normal((2, 40 >> (lv - 2), 24 >> (lv - 2), 2)).astype(np.float32)
             for lv in (2, 3, 4, 5)}  # fmt: skip
    size = np.exp(rng.uniform(np.log(4.0), np.log(800.0), (2, 25)))
    cy, cx = rng.uniform(-20, 170, (2, 2, 25))
    mb = np.stack([cy - size / 2, cx - size / 3, cy + size / 2, cx + size / 3], -1)
    mb = mb.astype(np.float32)
    tfeats, tmb = {k: tf.constant(v) for k, v in feats.items()}, tf.constant(mb)
    g = rng.integers(-3, 4, (2, 25, 7, 7, 2)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch([*tfeats.values(), tmb])
        want, _ = model_garden_tf(tfeats, tmb, 7, 0.5)
    want_g = tape.gradient(want, [*tfeats.values(), tmb], output_gradients=tf.constant(g))
    got, vjp = jax.vjp(lambda fe, b: multilevel_crop_and_resize(fe, b), feats, mb)
    np.testing.assert_array_equal(np.asarray(got), want.numpy())
    got_g = jax.tree.leaves(vjp(jnp.asarray(g)))
    # Far past the boundary the two weights 1 - t, t (|t| >> 1) of one edge cell
    # cancel, and TensorFlow's float32 sum of them can be off by more than 2e-6 of
    # the largest gradient (a cell whose exact gradient is 3.0 gets 3.00015): ours
    # is checked against the float64 gradient, and may differ from TensorFlow's
    # by no more than TensorFlow's own error.
    f64 = {k: v.astype(np.float64) for k, v in feats.items()}
    _, vjp64 = jax.vjp(lambda fe, b: multilevel_crop_and_resize(fe, b), f64, mb.astype(np.float64))
    exact = jax.tree.leaves(vjp64(jnp.asarray(g, jnp.float64)))
    for ours, theirs, ex in zip(got_g, want_g, exact, strict=True):
        ours, theirs, ex = np.asarray(ours), theirs.numpy(), np.asarray(ex)
        _grad_close(ours, ex)
        tol = 2e-6 * max(float(np.abs(ex).max()), 1.0)
        assert np.all(np.abs(ours - theirs) <= np.abs(theirs - ex) + tol)
