"""Compiled memory of the op inside a program: a loss on the output must not
change how the op itself is computed (XLA:CPU's reduction fusion once pulled
the sum of gathered terms into itself and stored every tap's term)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_roialign as jr


def _temp(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _boxes(k: int, size: float, extent: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    side = rng.uniform(0.5, 1.0, (k, 2)) * size
    lo = rng.uniform(0.0, extent - size, (k, 2))
    xy = np.concatenate([lo, lo + side], axis=1)
    return np.concatenate([(np.arange(k) % 2)[:, None], xy], axis=1).astype(np.float32)


def _programs(op, x, g):
    """The op alone, a reducing loss of its output, and value_and_grad of that loss."""

    def loss(x):
        return jnp.sum(op(x).astype(jnp.float32) * g)

    def with_grad(x):
        out, vjp = jax.vjp(op, x)
        return out, vjp(g.astype(out.dtype))

    return {
        "alone": op,
        "loss": loss,
        "sum": lambda x: op(x).sum(),
        "mean_sq": lambda x: jnp.mean(op(x).astype(jnp.float32) ** 2),
        "with_grad": with_grad,
        "value_and_grad": jax.value_and_grad(loss),
    }


def _check(op, x, out_shape, dtype):
    g = jnp.asarray(np.random.default_rng(1).standard_normal(out_shape), jnp.float32)
    out_bytes = int(np.prod(out_shape)) * jnp.dtype(dtype).itemsize
    temps = {name: _temp(fn, x) for name, fn in _programs(op, x, g).items()}
    slack = 64 * 1024
    # A loss stores at most the output it reads (plus the cast of it), never the taps.
    # float32 cotangent: the loss's own cast of a 16-bit output is up to 2x its bytes.
    cast = 2 if jnp.dtype(dtype).itemsize < 4 else 1
    for name in ("loss", "sum", "mean_sq"):
        assert temps[name] <= temps["alone"] + cast * out_bytes + slack, (name, temps)
    assert temps["value_and_grad"] <= temps["with_grad"] + cast * out_bytes + slack, temps
    return temps, out_bytes


# NHWC with both samplings (adaptive: the default), NCHW with fixed sampling.
@pytest.mark.parametrize(("data_format", "sampling_ratio"), [("NHWC", 2), ("NHWC", 0), ("NCHW", 2)])
@pytest.mark.slow
def test_roi_align_loss_stores_no_taps(sampling_ratio, data_format):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 64, 32)), jnp.float32)
    if data_format == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    rois = jnp.asarray(_boxes(64, 20.0, 48.0))

    def op(x):
        return jr.roi_align(
            x, rois, output_size=7, sampling_ratio=sampling_ratio, data_format=data_format
        )

    shape = jax.eval_shape(op, x).shape
    temps, out_bytes = _check(op, x, shape, jnp.float32)
    if sampling_ratio > 0 and data_format == "NHWC":
        # One gather loop: the loss's temporaries are its input.
        assert temps["loss"] <= 1.1 * out_bytes, temps
        assert temps["value_and_grad"] <= 1.1 * out_bytes + 0.1 * x.nbytes, temps


@pytest.mark.parametrize("dtype", [jnp.bfloat16])
@pytest.mark.slow
def test_roi_align_loss_stores_no_taps_16bit(dtype):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 64, 32)), dtype)
    rois = jnp.asarray(_boxes(64, 20.0, 48.0))

    def op(x):
        return jr.roi_align(x, rois, output_size=7, sampling_ratio=2)

    _check(op, x, jax.eval_shape(op, x).shape, dtype)


@pytest.mark.slow
def test_multiscale_loss_stores_no_taps():
    rng = np.random.default_rng(0)
    feats = [
        jnp.asarray(rng.standard_normal((2, 64 // s, 96 // s, 16)), jnp.float32) for s in (1, 2)
    ]
    rois = jnp.asarray(_boxes(64, 48.0, 64.0))

    def op(feats):
        return jr.multiscale_roi_align(
            feats, rois, output_size=7, spatial_scales=(1.0, 0.5), sampling_ratio=2
        )

    _check(op, feats, jax.eval_shape(op, feats).shape, jnp.float32)


@pytest.mark.slow
def test_multilevel_crop_loss_stores_no_corners():
    # Model Garden's pyramid: four corner terms per sample; a loss on the output
    # once stored each of them (4x the output).
    rng = np.random.default_rng(0)
    feats = {
        str(lv): jnp.asarray(rng.standard_normal((2, 256 >> lv, 256 >> lv, 16)), jnp.float32)
        for lv in range(2, 5)
    }
    side = rng.uniform(16.0, 200.0, (2, 48, 1))
    lo = rng.uniform(0.0, 200.0, (2, 48, 2))
    boxes = jnp.asarray(np.concatenate([lo, lo + side], -1), jnp.float32)

    def op(feats):
        return jr.multilevel_crop_and_resize(feats, boxes, output_size=7)

    _check(op, feats, jax.eval_shape(op, feats).shape, jnp.float32)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.slow
def test_box_gradient_stores_no_taps(sampling_ratio):
    """value_and_grad in the boxes too: the weights' gradient reads every tap pair
    and sums over the channels; XLA:CPU stores such reads, so they go in chunks of
    boxes (autodiff stored them all: 16x the output for 2 x 2 samples, over 100x
    for adaptive windows)."""

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 48, 64, 64)), jnp.float32)
    rois = jnp.asarray(_boxes(256, 20.0, 48.0))

    def op(x, rois):
        return jr.roi_align(x, rois, output_size=7, sampling_ratio=sampling_ratio)

    shape = jax.eval_shape(op, x, rois).shape
    out_bytes = int(np.prod(shape)) * 4
    g = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)

    def loss(x, rois, g):
        return jnp.sum(op(x, rois) * g)

    features_only = _temp(jax.value_and_grad(loss), x, rois, g)
    both = _temp(jax.value_and_grad(loss, argnums=(0, 1)), x, rois, g)
    # The rest of the difference is the geometry's gradient (adaptive sampling:
    # dense weights per box and map side), which does not grow with the channels.
    assert both <= features_only + 4 * out_bytes + (4 << 20), (
        both,
        features_only,
        out_bytes,
    )


def test_fixed_sampling_box_gradient_builds_no_dense_weights():
    """With fixed sampling only the TPU window path reads dense per-box weights
    (``[K, PH, H]`` and ``[K, PW, W]``). Under ``auto`` the CPU program's box
    gradient must not build or differentiate them: on a large map with few
    channels they were 6x everything else it stores."""
    side, k = 384, 128
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, side, side, 4)), jnp.float32)
    rois = jnp.asarray(_boxes(k, 80.0, float(side)))

    def op(x, rois):
        return jr.roi_align(x, rois, output_size=7, sampling_ratio=2)

    shape = jax.eval_shape(op, x, rois).shape
    out_bytes = int(np.prod(shape)) * 4
    g = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)

    def loss(x, rois, g):
        return jnp.sum(op(x, rois) * g)

    boxes_only = _temp(jax.value_and_grad(loss, argnums=1), x, rois, g)
    reads = 20 * out_bytes  # the 16 tap pairs' reads of 2 x 2 samples, and sums
    dense_bytes = k * 7 * 2 * side * 4
    assert boxes_only <= reads + dense_bytes // 4, (boxes_only, out_bytes, dense_bytes)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_fence_changes_no_bit(dtype):
    """The ops' outputs pass through ``_validation.fence`` (a ``reduce_precision``
    to the dtype's own format, so that a following loss cannot pull the sum of
    taps into a YNNPACK fusion): every bit survives, NaN, infinities, signed
    zeros and subnormals included, and its derivative is the identity."""
    from jax_roialign._validation import fence

    dt = jnp.dtype(dtype)
    if dt == jnp.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs jax_enable_x64")
    info = jnp.finfo(dt)
    edge = [0.0, -0.0, np.inf, -np.inf, np.nan, float(info.tiny), float(info.tiny) / 4]
    edge += [float(info.max), -float(info.max), float(info.eps), 1 / 3]
    rng = np.random.default_rng(0)
    spread = rng.standard_normal(4096) * 10.0 ** rng.uniform(-30, 30, 4096)
    with np.errstate(over="ignore"):  # float16 overflows to inf: kept as a case
        x = jnp.asarray(np.concatenate([edge, spread]).astype(dt))
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[dt.itemsize]
    y = jax.jit(fence)(x)
    np.testing.assert_array_equal(np.asarray(y).view(uint), np.asarray(x).view(uint))
    t = jnp.asarray(rng.standard_normal(x.shape), dt)
    _, tangent = jax.jvp(fence, (x,), (t,))
    np.testing.assert_array_equal(np.asarray(tangent).view(uint), np.asarray(t).view(uint))


@pytest.mark.parametrize("op_name", ["multiscale_roi_align", "multilevel_crop_and_resize"])
def test_level_loop_output_not_copied(op_name):
    """On CPU the FPN ops read each level's boxes in a loop whose output is
    stored once; a fence after it (needed only behind vectorized reads) would be
    a copy of the whole output. The loop's own buffers are a chunk of boxes."""
    rng = np.random.default_rng(0)
    n, k = 2, 256  # per image; chunks of at most 64 boxes: 1/8 of the output
    if op_name == "multiscale_roi_align":
        feats = [
            jnp.asarray(rng.standard_normal((n, 64 >> i, 96 >> i, 16)), jnp.float32)
            for i in range(2)
        ]
        lo = rng.uniform(0.0, 40.0, (n, k, 2))
        boxes = jnp.asarray(
            np.concatenate([lo, lo + rng.uniform(4.0, 48.0, (n, k, 2))], -1), jnp.float32
        )

        def op(feats):
            return jr.multiscale_roi_align(
                feats, boxes, output_size=7, spatial_scales=(1.0, 0.5), sampling_ratio=2
            )

    else:
        feats = {
            str(lv): jnp.asarray(rng.standard_normal((n, 256 >> lv, 256 >> lv, 16)), jnp.float32)
            for lv in range(2, 5)
        }
        lo = rng.uniform(0.0, 200.0, (n, k, 2))
        side = rng.uniform(16.0, 200.0, (n, k, 1))
        boxes = jnp.asarray(np.concatenate([lo, lo + side], -1), jnp.float32)

        def op(feats):
            return jr.multilevel_crop_and_resize(feats, boxes, output_size=7)

    out = jax.eval_shape(op, feats)
    out_bytes = int(np.prod(out.shape)) * out.dtype.itemsize
    assert _temp(op, feats) < out_bytes / 2, (_temp(op, feats), out_bytes)
