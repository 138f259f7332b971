"""roi_pool against torchvision's golden file and the float64 loop reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_pool import load_golden, roi_pool_grad_ref, roi_pool_ref

from jax_roialign import roi_pool
from jax_roialign._pool import FLT_MAX, pool_bins, window_argmax, window_ladder
from jax_roialign._validation import DataFormat

GOLDEN, CONFIGS = load_golden("roi_pool.npz")
SIZES = sorted({tuple(c["output_size"]) for c in CONFIGS})


def _value_and_grad(fn, max_traces=None):
    """One jit: the output and the features' cotangent for a given output cotangent."""

    def run(f, *args):
        out, vjp = jax.vjp(lambda f: fn(f, *args[:-1]), f)
        return out, vjp(args[-1])[0]

    if max_traces is not None:
        run = chex.assert_max_traces(run, n=max_traces)
    return jax.jit(run)


def pool(*args, **kwargs):
    """roi_pool under jit (one compile instead of many small eager ones)."""
    return jax.jit(lambda *a: roi_pool(*a, **kwargs))(*args)


def _in_map_cells(cfg):
    """The config's rois with coordinates times spatial_scale (exact: dyadic scales)."""
    rois = cfg["rois"].copy()
    rois[:, 1:] *= cfg["spatial_scale"]
    return rois


@pytest.mark.parametrize("size", SIZES)
def test_golden_roi_pool_and_argmax_gradient(size):
    """All scales of one output size in one call (boxes pre-scaled, spatial_scale=1):
    output and input gradient equal torchvision's exactly."""
    group = [c for c in CONFIGS if tuple(c["output_size"]) == size]
    rois = np.concatenate([_in_map_cells(c) for c in group])
    cot = np.concatenate([c["grad_output"] for c in group])
    fn = _value_and_grad(lambda f, r: roi_pool(f, r, output_size=size, data_format="NCHW"))
    out, grad = fn(GOLDEN["features"], rois, cot)
    np.testing.assert_array_equal(out, np.concatenate([c["output"] for c in group]))
    np.testing.assert_array_equal(grad, sum(c["grad_input"] for c in group))


def test_golden_spatial_scale():
    """The spatial_scale path itself (image-coordinate boxes), NHWC."""
    cfgs = [c for c in CONFIGS if c["spatial_scale"] == 0.25 and tuple(c["output_size"]) == (3, 5)]
    assert len(cfgs) == 1
    features = jnp.asarray(GOLDEN["features"]).transpose(0, 2, 3, 1)
    for cfg in cfgs:
        out = pool(features, cfg["rois"], output_size=(3, 5), spatial_scale=cfg["spatial_scale"])
        np.testing.assert_array_equal(out, cfg["output"].transpose(0, 2, 3, 1))


def _boxes(rng, k, lo, hi, h, w):
    """Boxes of about ``lo .. hi`` cells, some across the border."""
    size = rng.uniform(lo, hi, (k, 2))
    x1 = rng.uniform(-2, w, k)
    y1 = rng.uniform(-2, h, k)
    return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1)


def _rung(boxes, ladder, size, pooled):
    """Which rung of the ladder the batch needs (what the switch inside picks)."""
    ys, ye = pool_bins(
        boxes[:, 1], boxes[:, 3], pooled=pooled[0], length=size[0], spatial_scale=1.0
    )
    xs, xe = pool_bins(
        boxes[:, 0], boxes[:, 2], pooled=pooled[1], length=size[1], spatial_scale=1.0
    )
    need_y, need_x = int(jnp.max(ye - ys)), int(jnp.max(xe - xs))
    return next(i for i, (ty, tx) in enumerate(ladder) if need_y <= ty and need_x <= tx)


def test_every_window_size_against_reference():
    """Small to huge boxes select every rung of the window ladder; one trace, each
    result equal to the loop reference, for ties too (a map of small integers)."""
    rng = np.random.default_rng(0)
    h, w = 17, 23
    # Few distinct values: many ties, so the first-maximum rule is exercised.
    features = rng.integers(-3, 4, (2, h, w, 3)).astype(np.float64)
    features[1, :4, :, 2] = -np.inf  # bins of -inf only give -FLT_MAX, as torchvision
    ladder = window_ladder(h, w)
    assert ladder == [(5, 5), (10, 10), (17, 20), (17, 23)]
    fn = _value_and_grad(
        lambda f, b, i: roi_pool(f, b, output_size=(3, 2), box_indices=i), max_traces=1
    )
    outs, rungs = [], set()
    for lo, hi in [(0.0, 6.0), (10.0, 18.0), (24.0, 36.0), (50.0, 80.0)]:
        boxes = _boxes(rng, 16, lo, hi, h, w)
        rungs.add(_rung(jnp.asarray(boxes), ladder, (h, w), (3, 2)))
        idx = rng.integers(0, 2, 16)
        cot = rng.standard_normal((16, 3, 2, 3))
        out, grad = fn(features, boxes, idx, cot)
        ref, arg = roi_pool_ref(features, boxes, idx, (3, 2), 1.0)
        np.testing.assert_array_equal(out, ref)
        np.testing.assert_allclose(grad, roi_pool_grad_ref(features, idx, arg, cot), atol=1e-12)
        outs.append(np.asarray(out))
    assert rungs == {0, 1, 2, 3}
    assert np.any(np.concatenate(outs) == -FLT_MAX)


@pytest.mark.parametrize("window", [(5, 5), (10, 10), (17, 23)])
def test_window_argmax_each_rung(window):
    """Each rung of the ladder on its own, for boxes that fit it: torchvision's argmax."""
    rng = np.random.default_rng(1)
    h, w = 17, 23
    features = rng.standard_normal((1, h, w, 2))
    boxes = _boxes(rng, 12, 0.0, 2.0 * min(window), h, w)
    ys, ye = pool_bins(
        jnp.asarray(boxes[:, 1]), jnp.asarray(boxes[:, 3]), pooled=2, length=h, spatial_scale=1.0
    )
    xs, xe = pool_bins(
        jnp.asarray(boxes[:, 0]), jnp.asarray(boxes[:, 2]), pooled=2, length=w, spatial_scale=1.0
    )
    keep = np.asarray(jnp.all(ye - ys <= window[0], 1) & jnp.all(xe - xs <= window[1], 1))
    assert keep.sum() >= 4
    batch = jnp.zeros(12, jnp.int32)
    _, flat = window_argmax(
        jnp.asarray(features), DataFormat.NHWC, batch, ys, ye, xs, xe, window, jnp.float64
    )
    _, arg = roi_pool_ref(features, boxes, np.zeros(12, int), (2, 2), 1.0)
    np.testing.assert_array_equal(np.asarray(flat)[keep], arg[keep])


@pytest.mark.parametrize("h, w", [(17, 23), (61, 73)])
@pytest.mark.slow
def test_tpu_reader_same_numbers_and_gradients(h, w):
    """The TPU path (the window reader, forced here on the CPU) against the loop
    reference and the default path: boxes from one cell to larger than the map
    (one trace, blocks as many as the largest bin needs: one, or on the larger
    map bins of over 18 x 28 cells in several blocks, a tie between blocks
    going to the first), boxes outside the map (empty bins), invalid boxes,
    ties (the gradient to the first maximum), NaN and infinities; output and
    feature gradient equal, and the second order too."""
    rng = np.random.default_rng(4)
    features = rng.integers(-3, 4, (2, h, w, 3)).astype(np.float64)  # many ties
    features[1, :4, :, 2] = -np.inf  # bins of -inf only: -FLT_MAX, no gradient
    features[0, 6, 3:9, 1] = np.inf  # the first +inf wins
    features[0, 10, 5, 0] = np.nan  # never wins
    features[1, 12, :, 0] = -FLT_MAX  # never wins either
    boxes = np.concatenate(
        [_boxes(rng, 8, lo, hi, h, w) for lo, hi in [(0, 3), (4, 12), (14, 30), (40, 90)]]
    )
    boxes[0] = [w + 7.0, h + 8.0, w + 17.0, h + 14.0]  # outside the map: every bin empty
    boxes[1] = [-3.0, 2.0, 1.4, h + 3.0]  # partly outside: some bins empty
    boxes[2] = [-50.0, -60.0, w + 57.0, h + 53.0]  # larger than the map
    idx = rng.integers(0, 2, len(boxes))
    idx[2] = 0  # the box larger than the map reads image 0's +inf
    rows = np.concatenate([idx[:, None].astype(np.float64), boxes], axis=1)
    rows[3, 0] = 7  # batch index out of range: zeros
    rows[4, 1] = np.nan  # non-finite box: zeros
    cot = rng.standard_normal((len(boxes), 3, 2, 3))
    ref, arg = roi_pool_ref(features, boxes, idx, (3, 2), 1.0)
    ref[3:5] = 0.0

    def run(reader):
        def pool(f):
            return roi_pool(f, rows, output_size=(3, 2), implementation=reader)

        out, vjp = jax.vjp(jax.jit(pool), features)
        (grad,) = vjp(cot)
        # Second order: the gradient of <grad, v> (zero, as the op is linear
        # piecewise), and the gradient's own VJP (the output's read again).
        v = np.sin(np.arange(features.size)).reshape(features.shape)
        second = jax.grad(lambda f: jnp.sum(jax.vjp(pool, f)[1](cot)[0] * v))(features)
        _, vjp_of_vjp = jax.vjp(lambda c: jax.vjp(pool, features)[1](c)[0], cot)
        (back,) = vjp_of_vjp(v)
        return out, grad, second, back

    got, want = run("window"), run(None)
    np.testing.assert_array_equal(got[0], ref)
    np.testing.assert_array_equal(got[0], want[0])
    # A cell that wins several bins sums their cotangents in another order.
    arg[3:5] = -1
    np.testing.assert_allclose(got[1], want[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got[1], roi_pool_grad_ref(features, idx, arg, cot), atol=1e-12)
    np.testing.assert_array_equal(got[2], want[2])
    np.testing.assert_array_equal(got[3], want[3])
    if h < 30:  # bins of the -inf rows alone: the smaller map has some
        assert np.any(np.asarray(got[0]) == -FLT_MAX)
    assert np.any(np.asarray(got[0]) == np.inf)
    assert np.all(np.asarray(got[0])[0] == 0) and np.abs(np.asarray(got[3])).max() > 0


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.slow
def test_tpu_reader_layouts_dtypes_and_per_image(data_format):
    """The TPU path for both layouts, per-image boxes and float32 / bfloat16 maps:
    the default path's numbers and gradients (within the rounding of a sum of
    cotangents added in another order)."""
    rng = np.random.default_rng(5)
    features = rng.standard_normal((2, 9, 13, 4)).astype(np.float32)
    if data_format == "NCHW":
        features = features.transpose(0, 3, 1, 2)
    boxes = np.stack([_boxes(rng, 3, 0.5, 12.0, 9, 13), _boxes(rng, 3, 0.5, 12.0, 9, 13)])
    boxes = boxes.astype(np.float32)

    def run(reader, dtype):
        def pool(f):
            kw = dict(output_size=(2, 3), spatial_scale=0.5, data_format=data_format)
            return roi_pool(f, boxes, **kw, implementation=reader)

        f = jnp.asarray(features, dtype)
        out, vjp = jax.vjp(jax.jit(pool), f)
        return out, vjp(jnp.cos(out))[0]

    for dtype in (jnp.float32, jnp.bfloat16):
        got, want = run("window", dtype), run(None, dtype)
        assert got[0].dtype == dtype and got[1].dtype == dtype
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        tol = 1e-6 if dtype == jnp.float32 else 1e-2
        np.testing.assert_allclose(np.asarray(got[1], np.float32), want[1], rtol=tol, atol=tol)


@pytest.mark.slow
def test_tpu_reader_per_device_under_explicit_batch_sharding():
    """Batch-sharded features and per-image boxes (the pod recipe): the TPU path
    pools each device's own images, with the numbers of one device, and its
    program has no collective; the CPU path too."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    rng = np.random.default_rng(6)
    features = rng.standard_normal((8, 9, 13, 3))
    boxes = np.stack([_boxes(rng, 3, 0.5, 15.0, 9, 13) for _ in range(8)])
    mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Explicit,))

    def step(f, b, reader):
        out, vjp = jax.vjp(lambda f: roi_pool(f, b, output_size=(2, 3), implementation=reader), f)
        return out, vjp(jnp.cos(out))[0]

    for reader in ("window", None):
        fn = jax.jit(lambda f, b, reader=reader: step(f, b, reader))
        want = fn(features, boxes)
        with jax.set_mesh(mesh):
            fs, bs = jax.device_put(features, P("b")), jax.device_put(boxes, P("b"))
            got = fn(fs, bs)
            text = fn.lower(fs, bs).compile().as_text()
        assert not any(op in text for op in ("all-gather", "all-reduce", "collective-permute"))
        for g, wnt in zip(got, want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(wnt))


def test_rounding_is_half_away_from_zero():
    """round(2.5) = 3 and round(-0.5) = -1 (numpy would give 2 and -0)."""
    features = np.arange(8 * 8, dtype=np.float64).reshape(1, 8, 8, 1)
    # x in [2.5, 4.5] -> cells 3 .. 5 (numpy: 2 .. 4); y in [-0.5, 0.5] -> cells -1 .. 1.
    out = pool(features, np.array([[2.5, -0.5, 4.5, 0.5]]), output_size=(1, 3))
    np.testing.assert_array_equal(np.asarray(out)[0, 0, :, 0], [8 + 3, 8 + 4, 8 + 5])


def test_box_forms_layouts_and_dtypes():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((2, 9, 13, 4)).astype(np.float32)
    boxes = _boxes(rng, 6, 0.5, 9.0, 9, 13).astype(np.float32)
    idx = np.array([0, 1, 1, 0, 1, 0])
    ref, _ = roi_pool_ref(features, boxes, idx, (2, 3), 0.5, dtype=np.float32)
    out = pool(features, boxes, output_size=(2, 3), spatial_scale=0.5, box_indices=idx)
    assert out.dtype == jnp.float32 and out.shape == (6, 2, 3, 4)
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    rows = np.concatenate([idx[:, None].astype(np.float32), boxes], axis=1)
    nchw = pool(
        features.transpose(0, 3, 1, 2),
        rows,
        output_size=(2, 3),
        spatial_scale=0.5,
        data_format="nchw",
    )
    np.testing.assert_array_equal(nchw, np.asarray(out).transpose(0, 3, 1, 2))
    per_image = np.stack([boxes[:3], boxes[3:]])  # image 0: rows 0-2, image 1: rows 3-5
    out3 = pool(features, per_image, output_size=(2, 3), spatial_scale=0.5)
    ref0, _ = roi_pool_ref(features, boxes, np.array([0, 0, 0, 1, 1, 1]), (2, 3), 0.5, np.float32)
    assert out3.shape == (2, 3, 2, 3, 4)
    np.testing.assert_array_equal(np.asarray(out3).reshape(6, 2, 3, 4), ref0.astype(np.float32))
    bf16 = pool(features.astype(jnp.bfloat16), boxes, output_size=2, box_indices=idx)
    assert bf16.dtype == jnp.bfloat16
    assert pool(features, np.zeros((0, 5), np.float32), output_size=2).shape == (0, 2, 2, 4)


def test_invalid_boxes_give_zeros_and_no_gradient():
    features = np.random.default_rng(3).standard_normal((2, 6, 7, 2))
    rows = np.array(
        [
            [0, 1.0, 1.0, 4.0, 4.0],
            [1, np.nan, 1.0, 4.0, 4.0],
            [5, 1.0, 1.0, 4.0, 4.0],  # batch index out of range
            [-1, 1.0, 1.0, 4.0, 4.0],
            [1, -np.inf, -np.inf, np.inf, np.inf],
        ]
    )

    @jax.jit
    def f(x, r):
        return roi_pool(x, r, output_size=2)

    out = f(features, rows)
    assert np.all(np.asarray(out)[1:] == 0) and np.all(np.asarray(out)[0] != 0)
    grad = jax.grad(lambda x: jnp.sum(f(x, rows[1:])))(features)
    assert np.all(np.asarray(grad) == 0)


def test_errors():
    f = np.zeros((1, 5, 5, 2))
    b = np.zeros((3, 4))
    with pytest.raises(ValueError, match="output_size"):
        roi_pool(f, b, output_size=0)
    with pytest.raises(TypeError, match="output_size"):
        roi_pool(f, b, output_size=(2, 2, 2))
    with pytest.raises(ValueError, match="spatial_scale"):
        roi_pool(f, b, output_size=2, spatial_scale=-1.0)
    with pytest.raises(ValueError, match="data_format"):
        roi_pool(f, b, output_size=2, data_format="HWC")
    with pytest.raises(ValueError, match="4-D"):
        roi_pool(f[0], b, output_size=2)
    with pytest.raises(TypeError, match="floating"):
        roi_pool(f.astype(np.int32), b, output_size=2)
    with pytest.raises(ValueError, match="boxes"):
        roi_pool(f, np.zeros((3, 6)), output_size=2)
    with pytest.raises(ValueError, match="box_indices"):
        roi_pool(np.zeros((2, 5, 5, 2)), b, output_size=2, box_indices=np.array([0, 1, 2]))
