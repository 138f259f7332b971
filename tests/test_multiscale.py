"""multiscale_roi_align: torchvision's MultiScaleRoIAlign (golden file), detectron2's
ROIPooler (NumPy float64 reference), level boundaries, gradients, bad input."""

from __future__ import annotations

import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_except
from jax.test_util import check_grads
from reference import roi_align_ref

from jax_roialign import _dispatch, multiscale_roi_align, roi_align
from jax_roialign._multiscale import LevelMapper, _pool, fpn_levels
from jax_roialign._validation import DataFormat, parse_boxes

try:
    from jax.extend.core import jaxprs_in_params
except ImportError:  # jax < 0.10

    def jaxprs_in_params(params):
        for value in params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(getattr(v, "jaxpr", v), "eqns"):  # a Jaxpr or a ClosedJaxpr
                    yield getattr(v, "jaxpr", v)


GOLDEN = pathlib.Path(__file__).parent / "golden" / "multiscale.npz"
SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)


@pytest.fixture(scope="module")
def golden():
    z = np.load(GOLDEN)
    meta = json.loads(str(z["configs"]))
    maps = [z[f"features_l{i}"] for i in range(4)]  # NCHW float64
    return z, meta, maps


def _cfg_kwargs(cfg):
    return dict(
        output_size=tuple(cfg["output_size"]),
        spatial_scales=SCALES,
        sampling_ratio=cfg["sampling_ratio"],
        aligned=False,
        canonical_scale=cfg.get("canonical_scale", 224),
        canonical_level=cfg.get("canonical_level", 4),
    )


@pytest.mark.parametrize("i", slow_except(range(5), {0, 2}))
def test_torchvision_golden(golden, i):
    z, meta, maps = golden
    cfg = meta["configs"][i]
    dt = np.dtype(cfg["dtype"])
    rois = z[f"c{i}_rois"].astype(dt)
    want = z[f"c{i}_output"]
    kw = _cfg_kwargs(cfg)
    nhwc = [jnp.asarray(m.transpose(0, 2, 3, 1), dt) for m in maps]
    got = jax.jit(lambda f, b: multiscale_roi_align(f, b, **kw))(nhwc, rois)
    assert got.dtype == dt
    # float32: torchvision's sample positions round differently (FMA) by an ulp or so.
    tol = 1e-12 if dt == np.float64 else 2e-5
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, rtol=0, atol=tol)
    if cfg["sampling_ratio"] > 0:
        # NCHW gives the same numbers without a transpose.
        nchw = jax.jit(lambda f, b: multiscale_roi_align(f, b, data_format="NCHW", **kw))
        got_nchw = nchw([jnp.asarray(m, dt) for m in maps], rois)
        np.testing.assert_allclose(np.asarray(got_nchw), want, rtol=0, atol=tol)
    # Level choice: identical to torchvision's LevelMapper (computed in the boxes' dtype).
    levels, has = fpn_levels(
        jnp.asarray(rois[:, 1:]),
        k_min=2,
        k_max=5,
        canonical_scale=kw["canonical_scale"],
        canonical_level=kw["canonical_level"],
    )
    tv = z[f"c{i}_levels"]
    tv_has = (tv >= 0) & (tv < 4)
    np.testing.assert_array_equal(np.asarray(has), tv_has)
    np.testing.assert_array_equal(np.asarray(levels)[tv_has], tv[tv_has])
    # The negative-area box (no level in torchvision) gives zeros.
    assert not tv_has.all()
    assert np.all(np.asarray(got)[~tv_has] == 0)


@pytest.mark.parametrize("i", slow_except([0, 1], {0}))
def test_torchvision_golden_grads(golden, i):
    z, meta, maps = golden
    kw = _cfg_kwargs(meta["configs"][i])
    rois = z[f"c{i}_rois"]
    g = z[f"c{i}_grad_output"].transpose(0, 2, 3, 1)
    nhwc = [jnp.asarray(m.transpose(0, 2, 3, 1)) for m in maps]
    grads = jax.jit(
        lambda f, g: jax.vjp(lambda f: multiscale_roi_align(f, rois, **kw), f)[1](g)[0]
    )(nhwc, jnp.asarray(g))
    for j, gj in enumerate(grads):
        np.testing.assert_allclose(
            np.asarray(gj).transpose(0, 3, 1, 2), z[f"c{i}_grad_l{j}"], rtol=0, atol=1e-11
        )


@pytest.mark.parametrize("path", ["fast", "exact"])
def test_both_adaptive_paths_match_golden(golden, path):
    """The windowed read and the dense per-level fallback give torchvision's numbers."""
    z, meta, maps = golden
    i = 1
    kw = _cfg_kwargs(meta["configs"][i])
    rois = z[f"c{i}_rois"]
    want = z[f"c{i}_output"].transpose(0, 2, 3, 1)
    # The last two boxes are long and thin: they need more rows than the fast window,
    # so the fast path is exact only without them (and the auto path takes the dense one).
    sides = np.abs(np.stack([rois[:, 3] - rois[:, 1], rois[:, 4] - rois[:, 2]]))
    thin = (sides.min(0) > 0) & (sides.max(0) > 20 * sides.min(0))
    assert thin.sum() == 2
    nhwc = [jnp.asarray(m.transpose(0, 2, 3, 1)) for m in maps]
    got = np.asarray(_run_path(nhwc, rois, kw, path))
    np.testing.assert_allclose(got[~thin], want[~thin], rtol=0, atol=1e-12)
    if path == "exact":
        np.testing.assert_allclose(got[thin], want[thin], rtol=0, atol=1e-12)
    else:
        assert np.abs(got[thin] - want[thin]).max() > 1e-3


@functools.partial(jax.jit, static_argnums=(2, 3))
def _run_path_jit(maps, rois, output_size, path):
    parsed = parse_boxes(jnp.asarray(rois), None, maps[0].shape[0])
    level, has = fpn_levels(parsed.coords, k_min=2, k_max=5)
    return _pool(
        maps,
        DataFormat.NHWC,
        parsed,
        level,
        has,
        [m.shape[1:3] for m in maps],
        list(SCALES),
        output_size,
        sampling_ratio=0,
        aligned=False,
        dtype=jnp.float64,
        path=path,
    )


def _run_path(maps, rois, kw, path):
    assert kw["sampling_ratio"] == 0 and not kw["aligned"]
    return _run_path_jit(maps, jnp.asarray(rois), kw["output_size"], path)


# ---------------------------------------------------------------------------
# detectron2 ROIPooler("ROIAlignV2"): float64 NumPy reference.
# ---------------------------------------------------------------------------


def d2_level(box, k_min, k_max, canonical_scale=224.0, canonical_level=4):
    area = (box[2] - box[0]) * (box[3] - box[1])
    lvl = math.floor(canonical_level + math.log2(math.sqrt(area) / canonical_scale + 1e-8))
    return min(max(lvl, k_min), k_max) - k_min


def _pyramid(rng, n=2, c=2, sizes=((16, 20), (8, 10), (4, 5))):
    return [rng.standard_normal((n, h, w, c)) for h, w in sizes]


def _boxes(rng, k, image=(64, 80), lo=6.0, hi=260.0):
    size = np.exp(rng.uniform(np.log(lo), np.log(hi), k))
    aspect = np.exp(rng.uniform(-1.0, 1.0, k))
    bw, bh = size * np.sqrt(aspect), size / np.sqrt(aspect)
    cx = rng.uniform(0, image[1], k)
    cy = rng.uniform(0, image[0], k)
    return np.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], axis=1)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_detectron2_reference_per_image(sampling_ratio):
    rng = np.random.default_rng(5)
    maps = _pyramid(rng)
    scales = (1 / 4, 1 / 8, 1 / 16)
    boxes = _boxes(rng, 2 * 9).reshape(2, 9, 4)
    kw = dict(
        output_size=(3, 4),
        spatial_scales=scales,
        sampling_ratio=sampling_ratio,
        aligned=True,
        level_mapper="detectron2",
    )
    got = jax.jit(lambda f, b: multiscale_roi_align(f, b, **kw))(maps, boxes)
    assert got.shape == (2, 9, 3, 4, 2)
    flat = boxes.reshape(-1, 4)
    batch = np.repeat(np.arange(2), 9)
    want = np.zeros((18, 3, 4, 2))
    levels = [d2_level(b, 2, 4) for b in flat]
    assert set(levels) == {0, 1, 2}
    for k, lv in enumerate(levels):
        want[k] = roi_align_ref(
            maps[lv], flat[k : k + 1], batch[k : k + 1], (3, 4), scales[lv], sampling_ratio, True
        )[0]
    np.testing.assert_allclose(np.asarray(got).reshape(want.shape), want, rtol=0, atol=1e-12)
    if sampling_ratio == 0:
        return
    # The [K, 5] and [K, 4] + box_indices forms give the same.
    rois = np.concatenate([batch[:, None].astype(float), flat], axis=1)
    fn = jax.jit(lambda f, b, i: multiscale_roi_align(f, b, box_indices=i, **kw))
    np.testing.assert_allclose(fn(maps, rois, None), want, rtol=0, atol=1e-12)
    np.testing.assert_allclose(fn(maps, flat, jnp.asarray(batch)), want, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------
# Level boundaries.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("mapper", ["torchvision", "detectron2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_level_boundaries_exact(mapper, dtype):
    d = 2.0**-12  # relative: well beyond torchvision's 1e-6 in log2
    sides = [28.0, 56.0, 112.0, 224.0, 448.0, 896.0, 1792.0]
    boxes, want = [], []
    for s in sides:
        k = 4 + round(math.log2(s / 224))
        for w, h in ((s, s), (s / 2, 2 * s), (4 * s, s / 4)):
            boxes.append([3.0, 5.0, 3.0 + w, 5.0 + h])
            want.append(k)
        boxes.append([3.0, 5.0, 3.0 + s, 5.0 + s - s * d])  # just below: the level under
        want.append(k - 1)
        boxes.append([3.0, 5.0, 3.0 + s, 5.0 + s + s * d])
        want.append(k)
    boxes.append([1.0, 1.0, 1.0, 9.0])  # zero area: the finest level
    want.append(-100)
    levels, has = fpn_levels(
        jnp.asarray(boxes, dtype), k_min=2, k_max=6, level_mapper=LevelMapper.parse(mapper)
    )
    assert bool(jnp.all(has))
    np.testing.assert_array_equal(np.asarray(levels) + 2, np.clip(want, 2, 6))


def test_negative_area_has_no_level():
    boxes = jnp.asarray([[5.0, 1.0, 1.0, 5.0], [5.0, 5.0, 1.0, 1.0], [1.0, 5.0, 5.0, 1.0]])
    _, has = fpn_levels(boxes, k_min=2, k_max=5)
    np.testing.assert_array_equal(np.asarray(has), [False, True, False])


def test_boundary_boxes_pool_from_their_level():
    rng = np.random.default_rng(2)
    maps = _pyramid(rng, sizes=((32, 32), (16, 16), (8, 8), (4, 4)))
    s = 112.0  # exactly on the P2 / P3 boundary of the torchvision mapper -> P3
    boxes = np.array([[4.0, 6.0, 4.0 + s, 6.0 + s], [4.0, 6.0, 4.0 + s, 6.0 + s - 2**-8]])
    idx = jnp.zeros(2, jnp.int32)
    kw = dict(output_size=2, sampling_ratio=2, aligned=False)
    ms = jax.jit(
        lambda m, b: multiscale_roi_align(m, b, spatial_scales=SCALES, box_indices=idx, **kw)
    )
    got = ms(maps, boxes)
    ra = jax.jit(
        lambda f, b, s: roi_align(f, b, spatial_scale=s, box_indices=idx[:1], **kw),
        static_argnums=2,
    )
    on_p3 = ra(maps[1], boxes[:1], 1 / 8)
    on_p2 = ra(maps[0], boxes[1:], 1 / 4)
    np.testing.assert_allclose(got[:1], on_p3, rtol=0, atol=1e-14)
    np.testing.assert_allclose(got[1:], on_p2, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------
# Properties, gradients, cost.
# ---------------------------------------------------------------------------


def test_single_level_is_roi_align():
    rng = np.random.default_rng(3)
    f = rng.standard_normal((2, 9, 11, 3))
    boxes = _boxes(rng, 7, image=(36, 44), hi=60)
    idx = jnp.asarray(rng.integers(0, 2, 7))
    kw = dict(output_size=(3, 2), sampling_ratio=2, box_indices=idx)
    got = jax.jit(lambda f, b: multiscale_roi_align([f], b, spatial_scales=[0.25], **kw))(f, boxes)
    want = jax.jit(lambda f, b: roi_align(f, b, spatial_scale=0.25, **kw))(f, boxes)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)


def test_dtype_and_empty():
    rng = np.random.default_rng(4)
    maps = [jnp.asarray(m, jnp.float32) for m in _pyramid(rng)]
    kw = dict(output_size=2, spatial_scales=(1 / 4, 1 / 8, 1 / 16), sampling_ratio=1)
    fn = jax.jit(lambda m, b: multiscale_roi_align(m, b, **kw))
    boxes = jnp.asarray(_boxes(rng, 5), jnp.float32)[None].repeat(2, 0)
    out = fn(maps, boxes)
    assert out.dtype == jnp.float32 and out.shape == (2, 5, 2, 2, 2)
    assert fn([m.astype(jnp.bfloat16) for m in maps], boxes).dtype == jnp.bfloat16
    empty = multiscale_roi_align(maps, jnp.zeros((0, 5)), **dict(kw, output_size=(3, 4)))
    assert empty.shape == (0, 3, 4, 2)


def test_invalid_boxes_give_zeros():
    rng = np.random.default_rng(6)
    maps = _pyramid(rng)
    rois = np.array(
        [[0, 1.0, 2.0, 30.0, 40.0], [1, np.nan, 2.0, 30.0, 40.0], [7, 1.0, 2.0, 30.0, 40.0]]
    )
    out = jax.jit(
        lambda m, r: multiscale_roi_align(
            m, r, output_size=2, spatial_scales=(1 / 4, 1 / 8, 1 / 16)
        )
    )(maps, rois)
    assert np.all(np.asarray(out[1:]) == 0) and np.any(np.asarray(out[0]) != 0)


@pytest.mark.parametrize("sampling_ratio", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_check_grads_features_and_boxes(sampling_ratio):
    rng = np.random.default_rng(7)
    maps = _pyramid(rng, n=1, c=1, sizes=((8, 10), (4, 5)))
    # Box sizes away from the level boundary (56 px) and away from integer sample rows.
    boxes = np.array([[3.3, 4.1, 30.7, 22.9], [9.1, 2.3, 51.7, 33.4], [2.2, 1.7, 71.3, 61.9]])
    kw = dict(output_size=2, spatial_scales=(1 / 4, 1 / 8), sampling_ratio=sampling_ratio)
    fn = jax.jit(lambda m0, m1, b: multiscale_roi_align([m0, m1], b, **kw))
    check_grads(fn, (*maps, boxes), order=1, modes=["rev"], eps=1e-5)


def _pyramid_program(n_levels, grad, sampling_ratio=2):
    """``grad``: False (the forward), True (the features' gradient) or
    ``"boxes"`` (the features' and the boxes')."""
    sizes = [(32 >> i, 40 >> i) for i in range(n_levels)]
    maps = [jnp.zeros((2, h, w, 8)) for h, w in sizes]
    scales = [2.0 ** -(2 + i) for i in range(n_levels)]

    def fn(m, b):
        out = multiscale_roi_align(
            m,
            b,
            output_size=3,
            spatial_scales=scales,
            sampling_ratio=sampling_ratio,
            implementation="gather",
        )
        return jnp.sum(out * out)

    if grad:
        fn = jax.grad(fn, argnums=(0, 1) if grad == "boxes" else 0)
    return jax.jit(fn), maps


def test_each_box_read_once_from_its_level():
    """One tap contraction per level, each box in exactly one of them (a
    ``lax.switch`` per chunk of level-sorted boxes): 16 gathers per level (2
    samples x 2 neighbours per axis), however many boxes."""

    def branch_gathers(n_levels):
        fn, maps = _pyramid_program(n_levels, grad=False)
        with _dispatch.inlined("cpu"):  # the program the CPU lowering runs
            jaxpr = jax.make_jaxpr(fn)(maps, jnp.zeros((2, 6, 4)))
        switches = [e for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "cond"]
        return [
            [str(b).count("gather[") for b in e.params["branches"]]
            for e in switches
            if len(e.params["branches"]) == n_levels
        ]

    assert branch_gathers(4) == [[16] * 4]
    assert branch_gathers(2) == [[16] * 2]


def _all_eqns(jaxpr):
    for e in jaxpr.eqns:
        yield e
        for sub in jaxprs_in_params(e.params):
            yield from _all_eqns(sub)


@pytest.mark.parametrize(
    "grad, sampling_ratio",
    [(False, 2), (True, 2), ("boxes", 2), pytest.param("boxes", 0, marks=pytest.mark.slow)],
)
def test_levels_not_concatenated(grad, sampling_ratio):
    """The CPU path reads every level where it is: no copy of the pyramid in the
    program's temporaries (forward, the backward's per-level feature gradients,
    and the box gradient's reads)."""
    fn, maps = _pyramid_program(4, grad, sampling_ratio)
    compiled = fn.lower(maps, jnp.zeros((2, 6, 4))).compile()
    cells = sum(m.shape[1] * m.shape[2] for m in maps)
    assert f"[2,{cells},8]" not in compiled.as_text()  # no flat concatenation
    if sampling_ratio:  # (adaptive sampling holds per-box tables of this size)
        temp = compiled.memory_analysis().temp_size_in_bytes
        pyramid = sum(m.size * m.dtype.itemsize for m in maps)
        assert temp < pyramid / 2, (temp, pyramid)


@pytest.mark.slow
def test_vmapped_and_second_order():
    """``vmap`` over a batch of pyramids (the level-sorted CPU read folds the mapped
    axis into the images) and second-order gradients give the numbers of the
    plain autodiff path, per element and to float64 rounding."""
    rng = np.random.default_rng(11)
    maps = [rng.standard_normal((3, 2, 32 >> i, 40 >> i, 3)) for i in range(3)]
    lo = rng.uniform(0.0, 100.0, (3, 2, 5, 2))
    boxes = np.concatenate([lo, lo + rng.uniform(4.0, 90.0, (3, 2, 5, 2))], axis=-1)
    kw = dict(output_size=3, spatial_scales=(1 / 4, 1 / 8, 1 / 16), sampling_ratio=2)

    def pool(m, b, method):
        return multiscale_roi_align(m, b, implementation=method, **kw)

    batched = jax.jit(jax.vmap(lambda m, b: pool(m, b, "gather")))(maps, boxes)
    for i in range(3):
        one = pool([m[i] for m in maps], boxes[i], "scatter")
        np.testing.assert_allclose(batched[i], one, rtol=0, atol=1e-13)

    def second(m, b, method):  # a gradient penalty: differentiates the gradient
        gm = jax.grad(lambda m: jnp.sum(pool(m, b, method) ** 2))(m)
        return sum(jnp.sum(x**3) for x in gm)

    # Per-image boxes (vmapped over the images inside the op) and one image's
    # [K, 4] boxes (the op called directly).
    grad = jax.jit(jax.grad(second, (0, 1)), static_argnums=2)
    for args in [([m[0] for m in maps], boxes[0]), ([m[0, :1] for m in maps], boxes[0, 0])]:
        got = grad(*args, "gather")
        want = grad(*args, "scatter")
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_bad_input():
    rng = np.random.default_rng(8)
    maps = _pyramid(rng)
    boxes = _boxes(rng, 3)
    idx = jnp.zeros(3, jnp.int32)
    kw = dict(output_size=2, box_indices=idx)
    good = (1 / 4, 1 / 8, 1 / 16)
    with pytest.raises(ValueError, match=r"one scale per feature map: got 2 scales .* for 3 maps"):
        multiscale_roi_align(maps, boxes, spatial_scales=good[:2], **kw)
    with pytest.raises(ValueError, match=r"powers of two .*spatial_scales\[1\] = 0.1"):
        multiscale_roi_align(maps, boxes, spatial_scales=(0.25, 0.1, 1 / 16), **kw)
    with pytest.raises(ValueError, match="must halve"):
        multiscale_roi_align(maps, boxes, spatial_scales=(0.25, 1 / 16, 1 / 8), **kw)
    with pytest.raises(ValueError, match=r"features\[2\] has N=2, C=5"):
        multiscale_roi_align(maps[:2] + [np.zeros((2, 4, 5, 5))], boxes, spatial_scales=good, **kw)
    with pytest.raises(ValueError, match=r"features\[1\] has N=1, C=2"):
        multiscale_roi_align([maps[0], maps[1][:1], maps[2]], boxes, spatial_scales=good, **kw)
    with pytest.raises(TypeError, match="sequence"):
        multiscale_roi_align(maps[0], boxes, spatial_scales=good, **kw)
    with pytest.raises(TypeError, match="spatial_scales must be a sequence"):
        multiscale_roi_align(maps, boxes, spatial_scales=0.25, **kw)
    with pytest.raises(ValueError, match="level_mapper"):
        multiscale_roi_align(maps, boxes, spatial_scales=good, level_mapper="fpn", **kw)
    with pytest.raises(ValueError, match="empty"):
        multiscale_roi_align([], boxes, spatial_scales=(), **kw)
    with pytest.raises(ValueError, match=r"spatial_scales\[0\] must be finite and positive"):
        multiscale_roi_align(maps, boxes, spatial_scales=(-0.25, 1 / 8, 1 / 16), **kw)
    with pytest.raises(TypeError, match="canonical_level"):
        multiscale_roi_align(maps, boxes, spatial_scales=good, canonical_level=4.0, **kw)
