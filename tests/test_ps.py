"""ps_roi_align (and roi_align) against torchvision's golden files and the loop reference."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_pool import load_golden, ps_roi_align_ref

from jax_roialign import ps_roi_align, roi_align

PS, PS_CONFIGS = load_golden("ps_roi_align.npz")
RA, RA_CONFIGS = load_golden("roi_align_tv.npz")


def _in_map_cells(cfg):
    rois = cfg["rois"].copy()
    rois[:, 1:] *= cfg["spatial_scale"]  # exact: dyadic scales
    return rois


def _value_and_grad(fn, max_traces=None):
    def run(f, *args):
        out, vjp = jax.vjp(lambda f: fn(f, *args[:-1]), f)
        return out, vjp(args[-1])[0]

    if max_traces is not None:
        run = chex.assert_max_traces(run, n=max_traces)
    return jax.jit(run)


def _group(configs, **match):
    return [c for c in configs if all(c[k] == v for k, v in match.items())]


# Gradients (torchvision's backward) for every fixed-grid group and one adaptive one;
# the other adaptive groups check the forward only, to keep compile time down.
PS_GROUPS = [
    ((2, 2), 0, False),
    ((3, 2), 0, False),
    ((1, 3), 0, True),
    ((2, 2), 2, True),
    ((3, 2), 2, True),
    ((1, 3), 2, True),
]


def _check_golden(fn, features, group, with_grad):
    rois = np.concatenate([_in_map_cells(c) for c in group])
    expected = np.concatenate([c["output"] for c in group])
    empty = np.isnan(expected)  # torchvision's 0 / 0 for empty adaptive boxes; we give 0
    if with_grad:
        cot = np.concatenate([c["grad_output"] for c in group])
        out, grad = _value_and_grad(fn)(features, rois, cot)
        np.testing.assert_allclose(grad, sum(c["grad_input"] for c in group), rtol=0, atol=1e-12)
    else:
        out = jax.jit(fn)(features, rois)
    np.testing.assert_allclose(out, np.where(empty, 0.0, expected), rtol=0, atol=1e-12)
    return empty


@pytest.mark.parametrize(
    "size, ratio, with_grad",
    [  # every other group in the fast stage
        pytest.param(*g, marks=() if i % 2 == 0 else pytest.mark.slow)
        for i, g in enumerate(PS_GROUPS)
    ],
)
def test_golden_ps_roi_align(size, ratio, with_grad):
    """All scales of one (output size, sampling ratio) in one call, boxes pre-scaled:
    output (and input gradient) match torchvision; NaN for empty adaptive boxes -> 0."""
    group = _group(PS_CONFIGS, output_size=list(size), sampling_ratio=ratio)
    assert len(group) == 3

    def fn(f, r):
        return ps_roi_align(f, r, output_size=size, sampling_ratio=ratio, data_format="NCHW")

    empty = _check_golden(fn, PS[f"features_{size[0]}x{size[1]}"], group, with_grad)
    assert empty.any() == (ratio == 0)  # the golden file holds zero-size adaptive boxes


def test_golden_ps_spatial_scale_nhwc():
    """The spatial_scale path with image-coordinate boxes, NHWC, fixed grid."""
    (cfg,) = _group(PS_CONFIGS, output_size=[3, 2], sampling_ratio=2, spatial_scale=0.25)
    f = jnp.asarray(PS["features_3x2"]).transpose(0, 2, 3, 1)
    out = jax.jit(
        lambda f, r: ps_roi_align(f, r, output_size=(3, 2), spatial_scale=0.25, sampling_ratio=2)
    )(f, cfg["rois"])
    np.testing.assert_allclose(out, cfg["output"].transpose(0, 2, 3, 1), rtol=0, atol=1e-12)


RA_GROUPS = [
    (True, 0),
    (True, 2),
    (False, 0),
    (False, 3),
]


@pytest.mark.parametrize("aligned, ratio", RA_GROUPS)
def test_golden_roi_align_torchvision(aligned, ratio):
    """roi_align against torchvision's own kernel (beside ONNX Runtime); with its input
    gradient for the fixed grids."""
    group = _group(RA_CONFIGS, aligned=aligned, sampling_ratio=ratio)
    assert len(group) == 3
    size = tuple(group[0]["output_size"])

    def fn(f, r):
        return roi_align(
            f, r, output_size=size, sampling_ratio=ratio, aligned=aligned, data_format="NCHW"
        )

    _check_golden(fn, RA["features"], group, with_grad=ratio > 0)


def _boxes(rng, k, lo, hi, h, w):
    size = rng.uniform(lo, hi, (k, 2))
    x1 = rng.uniform(-2, w, k)
    y1 = rng.uniform(-2, h, k)
    return np.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], axis=1)


def test_adaptive_fast_and_dense_paths_against_reference():
    """Small boxes (window taps) and a batch with a huge box (dense fallback): one trace,
    both equal the loop reference."""
    rng = np.random.default_rng(0)
    h, w, size = 11, 14, (2, 3)
    features = rng.standard_normal((2, h, w, 2 * 6))
    fn = chex.assert_max_traces(
        lambda f, b, i: ps_roi_align(f, b, output_size=size, box_indices=i), n=1
    )
    fn = jax.jit(fn)
    for hi in (4.0, 40.0):
        boxes = _boxes(rng, 10, 0.0, hi, h, w)
        idx = rng.integers(0, 2, 10)
        ref = ps_roi_align_ref(features, boxes, idx, size, 1.0, 0)
        np.testing.assert_allclose(fn(features, boxes, idx), ref, rtol=0, atol=1e-12)


def test_channel_groups_and_layouts():
    """Bin (ph, pw) reads channel (c * PH + ph) * PW + pw: a map whose channel k is the
    constant k gives exactly that index in every bin; NCHW and per-image forms agree."""
    size = (2, 3)
    c_out = 2
    n_ch = c_out * 6
    f = np.broadcast_to(np.arange(n_ch, dtype=np.float32), (1, 5, 6, n_ch)).copy()
    boxes = np.array([[1.0, 1.0, 4.0, 3.0], [0.5, 0.5, 5.0, 4.5]], np.float32)

    @jax.jit
    def both(f, b):
        nhwc = ps_roi_align(f, b, output_size=size, sampling_ratio=2)
        nchw = ps_roi_align(
            f.transpose(0, 3, 1, 2), b[None], output_size=size, sampling_ratio=2, data_format="NCHW"
        )
        return nhwc, nchw

    nhwc, nchw = both(f, boxes)
    assert nhwc.dtype == jnp.float32 and nhwc.shape == (2, 2, 3, c_out)
    assert nchw.shape == (1, 2, c_out, 2, 3)
    expect = np.array(
        [[[(c * 2 + p) * 3 + q for c in range(c_out)] for q in range(3)] for p in range(2)]
    )
    np.testing.assert_allclose(nhwc, np.broadcast_to(expect, (2, 2, 3, c_out)), rtol=1e-6)
    np.testing.assert_array_equal(nchw[0], np.asarray(nhwc).transpose(0, 3, 1, 2))


def test_float32_and_gradients():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((1, 7, 8, 8))
    boxes = np.array([[0.3, 0.8, 5.2, 6.1], [-1.5, 2.0, 3.3, 9.0], [2.0, 1.0, 7.5, 3.5]])
    ref = ps_roi_align_ref(features, boxes, np.zeros(3, int), (2, 2), 1.0, 0)
    fn = jax.jit(lambda f, b: ps_roi_align(f, b, output_size=2))
    out32 = fn(features.astype(np.float32), boxes.astype(np.float32))
    assert out32.dtype == jnp.float32
    np.testing.assert_allclose(out32, ref, rtol=0, atol=2e-5)
    fixed = jax.jit(lambda f: ps_roi_align(f, boxes, output_size=2, sampling_ratio=2))
    jax.test_util.check_grads(fixed, (features,), order=1, modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("ratio", [2, 0])
@pytest.mark.slow
def test_tpu_reader_same_numbers_and_gradients(ratio):
    # The box-local window reader (the default on TPU) runs here too: every channel
    # of each bin read through one window per box, each bin's group kept by a
    # mask. Against the default path, float64: outputs, feature and box
    # gradients, both layouts, per-image boxes, a map larger than the windows.
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 40, 70, 2 * 9))
    boxes = rng.uniform(-10, 80, (2, 12, 4))
    boxes[..., 2:] = boxes[..., :2] + rng.uniform(-5, 45, (2, 12, 2))

    def run(reader, data_format):
        f = x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)

        def pool(f, b):
            return ps_roi_align(
                f,
                b,
                output_size=3,
                spatial_scale=0.9,
                sampling_ratio=ratio,
                data_format=data_format,
                implementation=reader,
            )

        out, vjp = jax.vjp(jax.jit(pool), f, boxes)
        return out, *vjp(np.cos(np.arange(out.size)).reshape(out.shape))

    for data_format in ("NHWC", "NCHW"):
        got, want = run("window", data_format), run(None, data_format)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12)
        assert np.abs(np.asarray(got[2])).max() > 0.1  # box gradients flow


def test_invalid_and_empty():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((2, 6, 7, 4))
    rows = np.array(
        [
            [0, 1.0, 1.0, 4.0, 4.0],
            [1, np.nan, 1.0, 4.0, 4.0],
            [2, 1.0, 1.0, 4.0, 4.0],  # batch index out of range
            [1, 3.0, 3.0, 3.0, 5.0],  # zero width, adaptive: torchvision gives NaN
            [1, 5.0, 5.0, 2.0, 2.0],  # negative size, adaptive: no samples
        ]
    )
    fn = jax.jit(lambda f, r: ps_roi_align(f, r, output_size=2))
    out = np.asarray(fn(features, rows))
    assert np.all(out[1:] == 0) and np.all(out[0] != 0) and np.all(np.isfinite(out))
    fixed = jax.jit(
        jax.grad(lambda f: jnp.sum(ps_roi_align(f, rows, output_size=2, sampling_ratio=3)[1:3]))
    )
    assert np.all(np.asarray(fixed(features)) == 0)
    assert ps_roi_align(features, np.zeros((0, 5)), output_size=2).shape == (0, 2, 2, 1)


def test_errors():
    f = np.zeros((1, 5, 5, 8))
    b = np.zeros((3, 4))
    with pytest.raises(ValueError, match="multiple of PH \\* PW"):
        ps_roi_align(f, b, output_size=(2, 3))
    with pytest.raises(TypeError, match="sampling_ratio"):
        ps_roi_align(f, b, output_size=2, sampling_ratio=1.5)
    with pytest.raises(ValueError, match="data_format"):
        ps_roi_align(f, b, output_size=2, data_format="CHW")
    with pytest.raises(ValueError, match="spatial_scale"):
        ps_roi_align(f, b, output_size=2, spatial_scale=0.0)
    with pytest.raises(ValueError, match="boxes"):
        ps_roi_align(f, np.zeros((3, 3)), output_size=2)
    with pytest.raises(TypeError, match="floating"):
        ps_roi_align(f, b.astype(np.int32), output_size=2)
