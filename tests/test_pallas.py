"""``implementation="pallas"``: the window reader's forward as a Pallas TPU kernel, on CPU.

Off TPU the kernel runs in Pallas' interpreter, the same program (its grid, its
box table in SMEM, its copies of windows with aligned columns, its extra
windows for boxes larger than one). Its numbers against ONNX Runtime (float64,
1e-9) for every kind of box; its gradients, per-image boxes and vmap against
the window reader's; FPN levels (the boxes visited level by level), precise
pooling and max mode through it; and layouts the kernel does not take (NCHW)
falling back to the XLA window reader. The TPU compile checks are in
``test_tpu.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import window_boxes
from ort_reference import ort_roi_align

import jax_roialign as jr
from jax_roialign import _pallas, _window
from jax_roialign._validation import DataFormat

# The Pallas kernels run in the interpreter on the CPU: CI's slow stage.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    # 37 x 45: odd sides, so copies of windows end at the map's edge from
    # aligned columns (45 - cols a multiple of 8); boxes span one to nine windows.
    x = rng.standard_normal((2, 3, 37, 45))
    boxes = window_boxes(rng, 12, 37 / 0.5, 45 / 0.5)
    batch = rng.integers(0, 2, 12)
    return x, boxes, batch


def test_windows_start_at_aligned_columns():
    for width in (7, 16, 21, 24, 25, 45, 84, 336):
        for dtype, align in ((jnp.float32, 8), (jnp.bfloat16, 16)):
            plan = _window.Plan(DataFormat.NHWC, [(1, 20, width, 8)], [dtype], jnp.float32)
            (side,) = _pallas._sides(plan)
            assert side.align == align and side.h == 16 and side.w == min(16, width)
            # Copies span a multiple of 8 columns, or the whole width.
            assert side.block % 8 == 0 or side.block == width
            assert side.strip == (side.block < width and width % align != 0)
            for x0 in range(width - side.w + 1):
                first = int(_pallas._first_col(jnp.int32(x0), width, side.block, align))
                # Aligned (or the whole width), inside the map, from column x0 or before.
                assert first % align == 0 or side.block == width
                assert 0 <= first <= x0 and first + side.block <= width
                # It holds the window's columns, except at a ragged far edge
                # (where the kernel copies whole rows).
                assert x0 + side.w <= first + side.block or side.strip


# Each value of both options.
@pytest.mark.parametrize(("aligned", "sampling_ratio"), [(True, 2), (False, 0)])
def test_matches_onnxruntime_float64(data, aligned, sampling_ratio):
    x, boxes, batch = data
    want = ort_roi_align(x, boxes, batch, 3, 4, 0.5, sampling_ratio, aligned)
    got = jr.roi_align(
        jnp.asarray(x.transpose(0, 2, 3, 1)),
        jnp.asarray(boxes),
        box_indices=jnp.asarray(batch),
        output_size=(3, 4),
        spatial_scale=0.5,
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        implementation="pallas",
    )
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0, atol=1e-9)


def test_gradients_per_image_and_vmap_match_window(data, sampling_ratio=0):
    # Adaptive sampling (fixed grids go through the same kernels: the ONNX test).
    x, boxes, _ = data
    feats = jnp.asarray(x.transpose(0, 2, 3, 1))
    per_image = jnp.asarray(boxes.reshape(2, 6, 4))
    kw = dict(output_size=(2, 3), spatial_scale=0.5, sampling_ratio=sampling_ratio)

    def run(method):
        def loss(f, b):
            out = jr.roi_align(f, b, **kw, implementation=method)
            return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(feats, per_image)

    for g, w in zip(jax.tree.leaves(run("pallas")), jax.tree.leaves(run("window")), strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-10)
    # The user's vmap over batches of images: folded into the images.
    stacked = jax.vmap(lambda f, b: jr.roi_align(f, b, **kw, implementation="pallas"))(
        jnp.stack([feats, -feats]), jnp.stack([per_image, per_image[::-1]])
    )
    want = jr.roi_align(-feats, per_image[::-1], **kw, implementation="window")
    np.testing.assert_allclose(stacked[1], want, rtol=0, atol=1e-12)


def test_levels_precise_and_max_match_window():
    rng = np.random.default_rng(5)
    maps = [jnp.asarray(rng.standard_normal((2, 48 // 2**i, 40 // 2**i, 3))) for i in range(3)]
    k = 12
    side = np.exp(rng.uniform(np.log(4), np.log(400), k))
    xy = rng.uniform(-20, 150, (k, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + side[:, None] * np.array([1, 0.7])], 1))
    per_image = boxes.reshape(2, 6, 4)

    def ms(method):
        def loss(m, b):
            out = jr.multiscale_roi_align(
                m,
                b,
                output_size=(3, 2),
                spatial_scales=(1 / 4, 1 / 8, 1 / 16),
                sampling_ratio=0,
                implementation=method,
            )
            return jnp.sum(jnp.sin(out)), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(maps, per_image)

    def precise(method):
        return jr.precise_roi_pool(
            maps[0], per_image, output_size=(3, 4), spatial_scale=0.25, implementation=method
        )

    def max_mode(method):
        return jax.value_and_grad(
            lambda f: jnp.sum(
                jr.roi_align(
                    f,
                    per_image,
                    output_size=3,
                    spatial_scale=0.25,
                    sampling_ratio=2,
                    mode="max",
                    implementation=method,
                )
            )
        )(maps[0])

    for fn in (ms, precise):
        got, want = fn("pallas"), fn("window")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=0, atol=1e-11)
    # Max mode has no kernel: asking for one is an error, not the window reader.
    with pytest.raises(ValueError, match="cannot use implementation='pallas'"):
        max_mode("pallas")


def test_kernel_is_used_and_nchw_falls_back(data):
    x, boxes, batch = data
    kw = dict(box_indices=jnp.asarray(batch), output_size=2, spatial_scale=0.5)
    nhwc = jax.jit(lambda f: jr.roi_align(f, boxes, **kw, implementation="pallas"))
    nchw = jax.jit(
        lambda f: jr.roi_align(f, boxes, **kw, data_format="NCHW", implementation="pallas")
    )
    feats = x.transpose(0, 2, 3, 1)

    def for_tpu(boxes, layout, x):  # the program lowered for a TPU (float32)
        fn = lambda f: jr.roi_align(  # noqa: E731
            f, boxes, **kw, data_format=layout, implementation="pallas"
        )
        lowered = jax.jit(fn).trace(x).lower(lowering_platforms=("tpu",))
        return lowered.as_text()

    b32, f32 = jnp.asarray(boxes, jnp.float32), jnp.float32
    assert "tpu_custom_call" in for_tpu(b32, "NHWC", feats.astype(f32))
    assert "tpu_custom_call" not in for_tpu(b32, "NCHW", x.astype(f32))
    np.testing.assert_allclose(
        np.asarray(nchw(x)).transpose(0, 2, 3, 1), nhwc(feats), rtol=0, atol=1e-12
    )


def test_parse():
    x, boxes = jnp.ones((1, 8, 8, 2)), jnp.asarray([[0, 1.0, 1.0, 5.0, 5.0]])
    a = jr.roi_align(x, boxes, output_size=2, implementation="Pallas")
    np.testing.assert_array_equal(a, jr.roi_align(x, boxes, output_size=2))
    with pytest.raises(ValueError, match="'pallas'"):
        jr.roi_align(x, boxes, output_size=2, implementation="mosaic")
