"""deform_roi_align against the float64 loop reference of mmcv's DeformRoIPool."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from reference_sampled import deform_roi_align_ref

import jax_roialign as jr

N, C, H, W = 2, 3, 9, 13
_STATIC = ("output_size", "spatial_scale", "sampling_ratio", "gamma", "data_format")
deform = jax.jit(jr.deform_roi_align, static_argnames=_STATIC)
roi_align = jax.jit(
    jr.roi_align, static_argnames=("output_size", "spatial_scale", "sampling_ratio")
)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, H, W, C))
    k = 32
    ctr = rng.uniform(-0.2, 1.2, (k, 2)) * np.array([W, H])
    size = (
        rng.uniform(0.0, 1.0, (k, 2)) * np.array([W, H]) * rng.choice([0.05, 0.4, 1.0, 0.0], (k, 1))
    )
    boxes = np.concatenate([ctr - size / 2, ctr + size / 2], axis=1)
    boxes[0] = [-40.3, -30.1, 60.2, 50.7]  # bins larger than the fast window: dense path
    boxes[1] = [5.2, 4.1, 3.3, 2.2]  # negative size
    batch = rng.integers(0, N, k)
    offsets = rng.normal(0.0, 1.0, (k, 3, 4, 2))
    mask = rng.uniform(0.0, 1.0, (k, 3, 4))
    return x, boxes, batch, offsets, mask


@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_matches_loop_reference(data, sampling_ratio):
    x, boxes, batch, offsets, mask = data
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio, gamma=0.3)
    ours = deform(x, boxes / 0.5, offsets, box_indices=batch, mask=mask, spatial_scale=0.5, **kw)
    ref = deform_roi_align_ref(
        x, boxes / 0.5, batch, offsets, (3, 4), 0.5, sampling_ratio, 0.3, mask
    )
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=0, atol=1e-13)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_zero_offsets_equal_roi_align(data, sampling_ratio):
    x, boxes, batch, offsets, _ = data
    kw = dict(output_size=(3, 4), sampling_ratio=sampling_ratio)
    ours = deform(x, boxes, np.zeros_like(offsets), box_indices=batch, **kw)
    ref = roi_align(x, boxes, box_indices=batch, **kw)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-13)


@pytest.mark.slow
def test_constant_offset_equals_shifted_box(data):
    x, boxes, batch, offsets, _ = data
    boxes, batch = boxes[2:], batch[2:]
    d = np.array([0.7, -0.4])  # (dx, dy)
    off = np.broadcast_to(d, (len(boxes), 3, 4, 2))
    ours = deform(x, boxes, off, box_indices=batch, output_size=(3, 4), gamma=0.1)
    size = boxes[:, 2:] - boxes[:, :2]  # spatial_scale 1: the roi size on the map
    shift = np.tile(0.1 * size * d, 2)
    ref = roi_align(x, boxes + shift, box_indices=batch, output_size=(3, 4))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-12)


def test_mask_multiplies_each_bin(data):
    x, boxes, batch, offsets, mask = data
    kw = dict(box_indices=batch, output_size=(3, 4))
    plain = np.asarray(deform(x, boxes, offsets, **kw))
    masked = np.asarray(deform(x, boxes, offsets, mask=mask, **kw))
    np.testing.assert_allclose(masked, plain * mask[..., None], rtol=1e-15, atol=0)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_gradients_features_boxes_offsets_mask(sampling_ratio):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, H, W, 2))
    boxes = np.array([[1.1, 1.7, 7.3, 6.2], [-2.2, 3.1, 6.6, 11.7], [2.3, 0.4, 30.5, 16.1]])
    offsets = rng.normal(0.0, 0.5, (3, 2, 2, 2))
    mask = rng.uniform(0.2, 1.0, (3, 2, 2))

    @jax.jit
    def f(feat, b, o, m):
        return jr.deform_roi_align(
            feat, b, o, mask=m, output_size=(2, 2), sampling_ratio=sampling_ratio
        )

    check_grads(
        f, (x, boxes, offsets, mask), order=1, modes=["rev", "fwd"], eps=1e-6, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("sampling_ratio, data_format", [(2, "NHWC"), (0, "NCHW")])
@pytest.mark.slow
def test_tpu_reader_same_numbers_and_gradients(sampling_ratio, data_format):
    # The box-local window reader (the default on TPU) runs here too: each bin a
    # point of one window per box. Against the default path, float64: outputs and
    # gradients in the features, boxes, offsets and mask; per-image boxes, a map
    # larger than the windows, a box larger than the map, one partly outside, a
    # zero-size one, a bin with a non-finite offset.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 40, 70, 3))
    boxes = rng.uniform(-10, 80, (2, 12, 4))
    boxes[..., 2:] = boxes[..., :2] + rng.uniform(-5, 45, (2, 12, 2))
    boxes[0, 0] = [-60.0, -50.0, 130.0, 90.0]  # larger than the map
    boxes[0, 1] = [10.0, 10.0, 10.0, 20.0]  # zero width
    boxes[1, 0] = [60.0, 30.0, 90.0, 60.0]  # partly outside
    offsets = rng.normal(0.0, 1.0, (2, 12, 3, 4, 2))
    mask = rng.uniform(0.0, 1.0, (2, 12, 3, 4))
    f = x if data_format == "NHWC" else x.transpose(0, 3, 1, 2)

    def run(reader, offsets):
        def pool(f, b, o, m):
            return jr.deform_roi_align(
                f,
                b,
                o,
                mask=m,
                output_size=(3, 4),
                spatial_scale=0.9,
                sampling_ratio=sampling_ratio,
                gamma=0.3,
                data_format=data_format,
                implementation=reader,
            )

        out, vjp = jax.vjp(jax.jit(pool), f, boxes, offsets, mask)
        return out, *vjp(np.cos(np.arange(out.size)).reshape(out.shape))

    got = run("window", offsets)
    ref = deform_roi_align_ref(
        x,
        boxes.reshape(-1, 4),
        np.repeat([0, 1], 12),
        offsets.reshape(-1, 3, 4, 2),
        (3, 4),
        0.9,
        sampling_ratio,
        0.3,
        mask.reshape(-1, 3, 4),
    )
    out = np.asarray(got[0]).reshape(-1, 3, 4, 3) if data_format == "NHWC" else None
    if out is None:
        out = np.asarray(got[0]).reshape(-1, 3, 3, 4).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    assert np.abs(np.asarray(got[2])).max() > 0.1  # box gradients flow
    offsets[1, 2, 0, 1, 0] = np.nan  # that bin gives 0
    got, want = run("window", offsets), run(None, offsets)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-12)


def test_forms_layouts_dtypes_and_invalid(data):
    x, boxes, batch, offsets, mask = data
    boxes, batch, offsets, mask = boxes[:16], batch[:16], offsets[:16], mask[:16]
    kw = dict(output_size=(3, 4))
    ref = np.asarray(deform(x, boxes, offsets, box_indices=batch, mask=mask, **kw))
    rows = np.concatenate([batch[:, None], boxes], axis=1)
    np.testing.assert_array_equal(np.asarray(deform(x, rows, offsets, mask=mask, **kw)), ref)
    nchw = deform(x.transpose(0, 3, 1, 2), rows, offsets, mask=mask, data_format="NCHW", **kw)
    # Equal bit for bit on current XLA; jax 0.5.3's fuses the NCHW read into a sum
    # ordered otherwise (one ulp on one of 576 values).
    np.testing.assert_allclose(np.asarray(nchw).transpose(0, 2, 3, 1), ref, rtol=1e-15, atol=0)
    sel = [np.flatnonzero(batch == i)[:3] for i in range(N)]
    per_image = deform(
        x,
        np.stack([boxes[s] for s in sel]),
        np.stack([offsets[s] for s in sel]),
        mask=np.stack([mask[s] for s in sel]),
        **kw,
    )
    assert per_image.shape == (N, 3, 3, 4, C)
    np.testing.assert_array_equal(np.asarray(per_image[1]), ref[sel[1]])
    low = deform(
        x.astype(jnp.bfloat16), rows.astype(jnp.float32), offsets.astype(jnp.bfloat16), **kw
    )
    assert low.dtype == jnp.bfloat16
    full = np.asarray(deform(x, rows, offsets, **kw))
    np.testing.assert_allclose(np.asarray(low, np.float64), full, atol=0.1, rtol=0.05)
    bad_rows = rows.copy()
    bad_rows[0, 1] = np.nan
    bad_rows[1, 0] = 5.0
    bad_off = offsets.copy()
    bad_off[2, 1, 2, 0] = np.inf
    out = np.asarray(deform(x, bad_rows, bad_off, mask=mask, **kw))
    assert np.all(out[:2] == 0.0) and np.all(out[2, 1, 2] == 0.0)
    keep = np.ones(out.shape[:3], bool)
    keep[:2] = False
    keep[2, 1, 2] = False
    np.testing.assert_allclose(out[keep], ref[keep], rtol=0, atol=1e-13)


def test_bad_arguments():
    x = np.zeros((1, 5, 5, 1))
    boxes = np.zeros((2, 4))
    off = np.zeros((2, 2, 2, 2))
    with pytest.raises(ValueError, match="offsets must have shape"):
        jr.deform_roi_align(x, boxes, np.zeros((2, 2, 2)), output_size=2)
    with pytest.raises(ValueError, match="offsets must have shape"):
        jr.deform_roi_align(x, boxes, off, output_size=3)
    with pytest.raises(ValueError, match="mask must have shape"):
        jr.deform_roi_align(x, boxes, off, mask=np.zeros((2, 2)), output_size=2)
    with pytest.raises(TypeError, match="offsets must be floating"):
        jr.deform_roi_align(x, boxes, off.astype(int), output_size=2)
    with pytest.raises(TypeError, match="gamma"):
        jr.deform_roi_align(x, boxes, off, output_size=2, gamma="0.1")
    with pytest.raises(ValueError, match="gamma"):
        jr.deform_roi_align(x, boxes, off, output_size=2, gamma=float("nan"))
