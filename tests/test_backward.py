"""The row-window feature gradient (``implementation="gather"``, the default off TPU).

Its numbers are checked against autodiff's scatter-add of the same taps
(``implementation="scatter"``) and against the dense matmul path, for every kind of box,
both layouts, every box form, under vmap and for FPN levels; its compiled HLO
has no scatter; it is bitwise deterministic; its compiled temporary memory stays
below the size of the map.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jax_roialign as jr
from jax_roialign import _compat
from jax_roialign._multiscale import fpn_levels

SCATTER = re.compile(r"\bscatter\(")


def _boxes(rng, k, h, w):
    """Every kind of box: inside, across the border, far outside, tiny, wider than
    a run of columns, the whole map and beyond, reversed."""
    kinds = []
    for i in range(k):
        kind = i % 7
        if kind == 0:  # inside, small
            x1, y1 = rng.uniform(0, w - 6), rng.uniform(0, h - 6)
            box = [x1, y1, x1 + rng.uniform(1, 6), y1 + rng.uniform(1, 6)]
        elif kind == 1:  # wider than a run of columns of the transpose (32)
            x1 = rng.uniform(-2, 4)
            box = [x1, rng.uniform(0, 4), x1 + rng.uniform(40, w), rng.uniform(5, h)]
        elif kind == 2:  # across the border
            box = [rng.uniform(-5, 2), rng.uniform(-5, 2), rng.uniform(w - 3, w + 5), h + 2]
        elif kind == 3:  # far outside
            box = [w + 5, h + 5, w + 20, h + 9]
        elif kind == 4:  # tiny
            x1, y1 = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
            box = [x1, y1, x1 + 0.1, y1 + 0.2]
        elif kind == 5:  # much larger than the map
            box = [-3 * w, -2 * h, 4 * w, 3 * h]
        else:  # reversed
            x1, y1 = rng.uniform(5, w), rng.uniform(5, h)
            box = [x1, y1, x1 - 3, y1 - 2]
        kinds.append(box)
    return np.asarray(kinds, np.float64)


def _grads(method, x, boxes, idx, **kw):
    def loss(x, b):
        out = jr.roi_align(x, b, box_indices=idx, implementation=method, **kw)
        return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape)))

    return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, boxes)


# Every pair of the three options' values, in 6 of the 12 combinations.
@pytest.mark.parametrize(
    "sampling_ratio, data_format, aligned",
    [
        (1, "NHWC", True),
        (1, "NCHW", False),
        (2, "NHWC", False),
        (2, "NCHW", True),
        (0, "NHWC", True),
        (0, "NCHW", False),
    ],
)
@pytest.mark.slow
def test_same_gradient_as_autodiff_scatter(sampling_ratio, data_format, aligned):
    rng = np.random.default_rng(sampling_ratio + 3 * aligned)
    n, h, w, c = 2, 23, 71, 3
    x = rng.standard_normal((n, h, w, c))
    if data_format == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    boxes = jnp.asarray(_boxes(rng, 21, h, w))
    idx = jnp.asarray(rng.integers(0, n, 21))
    kw = dict(
        output_size=(3, 5),
        sampling_ratio=sampling_ratio,
        aligned=aligned,
        data_format=data_format,
        spatial_scale=1.0,
    )
    got = _grads("gather", x, boxes, idx, **kw)
    want = _grads("scatter", x, boxes, idx, **kw)
    dense = _grads("matmul", x, boxes, idx, **kw)
    for g, s, d in zip(got, want, dense, strict=True):
        np.testing.assert_allclose(g, s, rtol=0, atol=1e-12)
        np.testing.assert_allclose(g, d, rtol=0, atol=1e-12)
    assert np.abs(got[0]).max() > 0.1


@pytest.mark.slow
def test_wide_boxes_take_several_runs_of_columns():
    # A map 200 columns wide: one box covers every column, so its gradient is
    # added in several runs of 32 columns, the last one clamped to the edge.
    w = 200
    x = jnp.zeros((1, 3, w, 2))
    boxes = jnp.asarray([[0.0, 0.0, w - 0.5, 2.0], [7.3, 0.2, 151.9, 1.7]])
    idx = jnp.zeros(2, jnp.int32)
    for sr in (1, 4, 0):
        kw = dict(output_size=(2, 9), sampling_ratio=sr, aligned=False)
        got = _grads("gather", x, boxes, idx, **kw)[0]
        want = _grads("scatter", x, boxes, idx, **kw)[0]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        if sr == 0:  # about 22 samples per bin: every column is read
            assert np.count_nonzero(np.asarray(got)[0, 0, :, 0]) > 150


@pytest.mark.slow
def test_wide_outputs_take_slices_of_output_columns():
    # More output columns than one slice of the transpose (32): it cuts them into slices,
    # the last one overlapping the one before it (its shared columns weighted 0).
    # Every kind of box (narrower and wider than the output, flipped, across
    # and beyond the map), each output column added exactly once.
    rng = np.random.default_rng(11)
    pw = 2 * 32 + 13
    n, h, w, c = 2, 9, 150, 2
    x = jnp.asarray(rng.standard_normal((n, h, w, c)))
    boxes = jnp.asarray(_boxes(rng, 14, h, w))
    idx = jnp.asarray(rng.integers(0, n, 14))
    for sr in (1, 2, 0):
        kw = dict(output_size=(3, pw), sampling_ratio=sr, aligned=True)
        got = _grads("gather", x, boxes, idx, **kw)
        want = _grads("scatter", x, boxes, idx, **kw)
        for g_, s_ in zip(got, want, strict=True):
            np.testing.assert_allclose(g_, s_, rtol=0, atol=1e-12)
        assert np.count_nonzero(np.asarray(got[0])) > w


def test_invalid_boxes_and_indices_give_zero_gradient():
    x = jnp.ones((2, 6, 7, 1))
    boxes = jnp.asarray([[1.0, 1.0, 4.0, 4.0], [np.nan, 0, 3, 3], [0, 0, np.inf, 2], [1, 1, 3, 3]])
    idx = jnp.asarray([0, 0, 1, 5])  # the last index is out of range (unknown under jit)

    def grads(x, boxes, idx):
        out = jr.roi_align(x, boxes, box_indices=idx, output_size=2, sampling_ratio=2)
        return jnp.sum(out * jnp.arange(1.0, 1 + out.size).reshape(out.shape))

    grads = jax.jit(jax.grad(grads, argnums=(0, 1)))
    gx, gb = grads(x, boxes, idx)
    only_first = grads(x, boxes[:1], idx[:1])[0]
    np.testing.assert_array_equal(gx, only_first)
    np.testing.assert_array_equal(gb[1:], 0.0)
    assert np.all(np.isfinite(gb))


# Each form with each sampling: per-image boxes both ways; the user's vmap over
# flat-box calls (adaptive) and over per-image calls (fixed).
@pytest.mark.parametrize(
    "sampling_ratio, forms", [(0, ("per_image", "vmap")), (2, ("per_image", "nested"))]
)
@pytest.mark.slow
def test_per_image_boxes_and_vmap(sampling_ratio, forms):
    rng = np.random.default_rng(7)
    n, h, w, c, r = 3, 17, 40, 2, 6
    x = jnp.asarray(rng.standard_normal((n, h, w, c)))
    boxes = jnp.asarray(_boxes(rng, n * r, h, w).reshape(n, r, 4))
    kw = dict(output_size=(4, 3), sampling_ratio=sampling_ratio)

    def grad(method, form):
        if form == "per_image":
            f = lambda x: jr.roi_align(x, boxes, implementation=method, **kw)
        elif form == "vmap":  # the user's own vmap over images
            f = jax.vmap(
                lambda xi, bi: jr.roi_align(
                    xi[None], bi, box_indices=jnp.zeros(r, jnp.int32), implementation=method, **kw
                ),
                in_axes=(0, 0),
            )
            f = (lambda f: lambda x: f(x, boxes))(f)
        else:  # nested: vmap over two halves of a doubled batch
            f = lambda x: jax.vmap(
                lambda xx, bb: jr.roi_align(xx, bb, implementation=method, **kw)
            )(jnp.stack([x, 2 * x]), jnp.stack([boxes, boxes[::-1]]))
        return jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(f(x)))))(x)

    for form in forms:
        np.testing.assert_allclose(
            grad("gather", form), grad("scatter", form), rtol=0, atol=1e-12, err_msg=form
        )


@pytest.mark.slow
def test_multiscale_gradient():
    # Three levels of an image of 128 x 192: boxes of 4 to 250 pixels, on every
    # level, some across the image's border.
    rng = np.random.default_rng(3)
    maps = [jnp.asarray(rng.standard_normal((2, 32 // s, 48 // s, 3))) for s in (1, 2, 4)]
    scales = (1 / 4, 1 / 8, 1 / 16)
    xy = rng.uniform(0, 150, (2, 9, 2))
    size = np.exp(rng.uniform(np.log(4), np.log(250), (2, 9, 2)))
    size[:, 0] = [[300.0, 240.0], [260.0, 230.0]]  # the coarsest level's
    boxes = jnp.asarray(np.concatenate([xy, xy + size], -1))
    levels, _ = fpn_levels(boxes.reshape(-1, 4), k_min=2, k_max=4)
    assert set(np.asarray(levels).tolist()) == {0, 1, 2}
    for sr in (2, 0):

        def grad(method=None, boxes=boxes, sr=sr, **kw):
            f = lambda m: jr.multiscale_roi_align(
                m,
                boxes,
                output_size=5,
                spatial_scales=scales,
                sampling_ratio=sr,
                implementation=method,
                **kw,
            )
            return jax.jit(jax.grad(lambda m: jnp.sum(jnp.cos(f(m)))))(maps)

        # Against the dense path, and against the same boxes flat with their image
        # indices (the form test_multiscale's golden gradients check; autodiff's
        # scatter-add on levels: test_multiscale's test_vmapped_and_second_order).
        gather = grad("gather")
        dense = grad("matmul")
        g_flat = grad(boxes=boxes.reshape(-1, 4), box_indices=jnp.repeat(jnp.arange(2), 9))
        for got in (dense, g_flat):
            for g, s in zip(got, gather, strict=True):
                np.testing.assert_allclose(g, s, rtol=0, atol=1e-12)
        assert max(float(jnp.abs(g).max()) for g in gather) > 0.1


@pytest.mark.slow
def test_second_order_and_box_gradients_numerically():
    # A box wider than a run of 32 columns (adaptive grids to second order:
    # test_roi_align's test_gradients_features_and_boxes).
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 7, 40, 2))
    boxes = np.array([[1.1, 0.7, 37.3, 5.2], [3.3, 1.2, 9.9, 6.1], [0.4, 2.2, 12.8, 4.9]])
    idx = jnp.asarray([0, 1, 1])
    f = jax.jit(
        lambda x, b: jr.roi_align(
            x, b, box_indices=idx, output_size=(2, 5), sampling_ratio=2, aligned=False
        )
    )
    check_grads(f, (x, boxes), order=2, modes=["rev"], eps=1e-5, atol=1e-5, rtol=1e-5)


def _fwd_bwd(method, sampling_ratio, data_format="NHWC", shape=(2, 48, 64, 16), k=40):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    xy = rng.uniform(0, 40, (k, 2))
    rois = np.concatenate(
        [rng.integers(0, 2, (k, 1)), xy, xy + rng.uniform(4, 20, (k, 2))], 1
    ).astype(np.float32)
    g = jnp.asarray(rng.standard_normal((k, 7, 7, shape[-1])), jnp.float32)
    if data_format == "NCHW":
        x = x.transpose(0, 3, 1, 2)
        g = g.transpose(0, 3, 1, 2)

    def f(x, rois, g):
        out, vjp = jax.vjp(
            lambda x: jr.roi_align(
                x,
                rois,
                output_size=7,
                sampling_ratio=sampling_ratio,
                implementation=method,
                data_format=data_format,
            ),
            x,
        )
        return out, vjp(g)[0]

    return jax.jit(f), (x, jnp.asarray(rois), g)


@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.slow
def test_backward_has_no_scatter_and_little_memory(sampling_ratio, data_format):
    f, args = _fwd_bwd("gather", sampling_ratio, data_format)
    compiled = f.lower(*args).compile()
    assert not SCATTER.search(compiled.as_text())
    x, _, g = args
    temp = compiled.memory_analysis().temp_size_in_bytes
    f_s, _ = _fwd_bwd("scatter", sampling_ratio, data_format)
    lowered_s = f_s.lower(*args)
    compiled_s = lowered_s.compile()
    if _compat.JAX_VERSION >= (0, 6, 0):
        assert SCATTER.search(compiled_s.as_text())
    else:  # jaxlib < 0.6: XLA:CPU expands a scatter into a loop when compiling
        assert "stablehlo.scatter" in lowered_s.as_text()
    # Nothing the size of the taps (autodiff's scatter stores one update per tap).
    assert temp <= 0.25 * compiled_s.memory_analysis().temp_size_in_bytes
    # (adaptive sampling adds the dense branch's blocks; before jax 0.9, XLA keeps
    # NCHW's temporaries at 1.3x the map and cotangent.)
    if sampling_ratio > 0 and (data_format == "NHWC" or _compat.JAX_VERSION >= (0, 9, 0)):
        assert temp <= 0.6 * (x.nbytes + g.nbytes), temp


def test_backward_is_deterministic():
    f, args = _fwd_bwd("gather", 2)
    first = np.asarray(f(*args)[1])
    for _ in range(3):
        np.testing.assert_array_equal(np.asarray(f(*args)[1]), first)
    g = jax.jit(jax.vmap(lambda x, r, g: f(x, r, g)[1], in_axes=(None, None, 0)))
    both = np.asarray(g(args[0], args[1], jnp.stack([args[2], args[2]])))
    np.testing.assert_array_equal(both[0], first)
    np.testing.assert_array_equal(both[1], first)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_low_precision_gradient(dtype):
    f, (x, rois, g) = _fwd_bwd("gather", 2, shape=(2, 24, 40, 4), k=12)
    got = f(x.astype(dtype), rois, g.astype(dtype))[1]
    assert got.dtype == dtype
    want = f(x.astype(jnp.float64), rois, g.astype(jnp.float64))[1]
    scale = float(np.abs(want).max())
    tol = {jnp.bfloat16: 2e-2, jnp.float16: 2e-3, jnp.float32: 1e-5}[dtype]
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=0, atol=tol * scale)


@pytest.mark.slow
def test_precise_roi_pool_methods_agree():
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 12, 45, 2)))
    boxes = jnp.asarray(
        [[0.3, 0.2, 40.1, 9.7], [2.2, 3.1, 7.9, 8.4], [-4.0, -2.0, 60.0, 20.0], [5, 5, 4, 6]]
    )
    idx = jnp.asarray([0, 1, 1, 0])

    def grads(method):
        def loss(x, b):
            out = jr.precise_roi_pool(
                x, b, box_indices=idx, output_size=(3, 4), implementation=method
            )
            return jnp.sum(jnp.sin(out))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))(x, boxes)

    want = grads("scatter")
    for method in ("gather", "matmul"):
        for g, s in zip(grads(method), want, strict=True):
            np.testing.assert_allclose(g, s, rtol=0, atol=1e-12)
    f = lambda x: jr.precise_roi_pool(
        x, boxes, box_indices=idx, output_size=2, implementation="scatter"
    )
    np.testing.assert_allclose(jax.jvp(f, (x,), (x,))[1], f(x), rtol=0, atol=1e-12)


def test_default_implementation_by_lowering_platform():
    # The default is decided when the program is lowered: the window reader (no gather)
    # for TPU, per-tap gathers for CPU, autodiff's scatter-add for GPU.
    x = jnp.ones((1, 16, 20, 8), jnp.float32)
    boxes = jnp.asarray([[0, 1.0, 2.0, 9.0, 11.0]], jnp.float32)

    def loss(x, b):
        return jnp.sum(jr.roi_align(x, b, output_size=2, sampling_ratio=2) ** 2)

    grad = jax.jit(jax.grad(loss))

    def text(platform):
        return grad.trace(x, boxes).lower(lowering_platforms=(platform,)).as_text()

    def count(t, op):
        return len(re.findall(rf"stablehlo\.{op}\b|\b{op}\(", t))

    tpu, cpu, cuda = text("tpu"), text("cpu"), text("cuda")
    assert "dynamic_slice" in tpu
    assert count(cpu, "gather") > 0
    assert count(cuda, "scatter") > 0
    if _compat.JAX_VERSION >= (0, 6, 0):
        # (jax 0.5 still lowers the other platforms' branches of some nested
        # choices, selected at run time: dead code for the platform, not read.)
        assert count(tpu, "gather") == 0 and count(tpu, "scatter") == 0
        assert count(cpu, "scatter") == 0
    with pytest.raises(ValueError, match="'gather', 'scatter', 'window'"):
        jr.roi_align(x, boxes, output_size=2, implementation="atomic")


@pytest.mark.slow
def test_tall_bins_add_one_row_per_step():
    # Adaptive bins of ~100 rows: more y-taps per bin than one step of the
    # transpose unrolls (32), so it loops over single rows.
    x = jnp.zeros((1, 200, 3, 2))
    boxes = jnp.asarray([[0.0, 0.0, 2.5, 199.0], [0.3, 12.2, 2.0, 187.9]])
    idx = jnp.zeros(2, jnp.int32)
    kw = dict(output_size=(2, 1), sampling_ratio=0, aligned=False)
    got = _grads("gather", x, boxes, idx, **kw)
    want = _grads("scatter", x, boxes, idx, **kw)
    for g, s in zip(got, want, strict=True):
        np.testing.assert_allclose(g, s, rtol=0, atol=1e-12)
    assert np.count_nonzero(np.asarray(got[0])[0, :, 0, 0]) > 2 * 32
