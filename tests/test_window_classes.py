"""Adaptive sampling reads each box through the window its own bins need.

Boxes of every window class in one call (at each class's edge, past the map on
every side, one box larger than the map among small ones) give ONNX Runtime's
float64 numbers, gradients equal to the dense implementation's, and a box's
output does not depend on the other boxes of the call.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import sampled
from ort_reference import ort_roi_align

import jax_roialign as jr
from jax_roialign import _sampling
from jax_roialign._multiscale import fpn_levels
from jax_roialign._tuning import TUNING

# (H, W, output): one map with two window tiers, one with three.
MAPS = [(50, 84, 14), (100, 168, 7)]


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _window_class(boxes, h, w, p, aligned):
    """Each box's class, computed as the op does in the boxes' dtype."""
    gy, gx = _sampling.box_grids(
        boxes,
        jnp.ones((boxes.shape[0],), bool),
        (p, p),
        (h, w),
        spatial_scale=1.0,
        sampling_ratio=0,
        aligned=aligned,
        dtype=boxes.dtype,
    )
    rows, cols = TUNING.class_tiers(h, w, (p, p))
    live = jnp.ones((boxes.shape[0], 1), bool)
    cy = _sampling.window_class(gy, rows, live)
    return jnp.maximum(cy, _sampling.window_class(gx, cols, live))


def _classes(boxes, h, w, p, aligned, dtype=jnp.float64):
    """Each box's window class (the index of the tier it fits; the last is dense)."""
    n_taps = len(TUNING.class_tiers(h, w, (p, p))[0])
    return np.asarray(_window_class(jnp.asarray(boxes, dtype), h, w, p, aligned)), n_taps


def _edge_boxes(h, w, p, aligned):
    """For every class change along a ladder of box sizes, the two boxes on either
    side of it (found by bisection on the size, square boxes at the map's centre
    and at its corner)."""
    sizes = np.geomspace(1.0, 4.0 * max(h, w), 64)

    def box(s, corner):
        x0 = np.where(corner, -0.3 * s, w / 2 - s / 2)
        y0 = np.where(corner, -0.2 * s, h / 2 - s / 2)
        return np.stack([x0, y0, x0 + s, y0 + 0.9 * s], -1)

    lo, hi, corners, want = [], [], [], []
    for corner in (False, True):
        cls, _ = _classes(box(sizes, corner), h, w, p, aligned)
        for i in np.nonzero(np.diff(cls))[0]:
            lo.append(sizes[i]), hi.append(sizes[i + 1]), corners.append(corner)
            want.append(cls[i])
    lo, hi, corners = np.array(lo), np.array(hi), np.array(corners)
    for _ in range(30):  # every change's bisection at once
        mid = (lo + hi) / 2
        same = _classes(box(mid, corners), h, w, p, aligned)[0] == np.array(want)
        lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
    return np.concatenate([box(lo, corners), box(hi, corners)])


def _mixed_boxes(rng, h, w, p, aligned):
    """Boxes of every class and edge: past the map on every side, inside, tiny,
    and one twice the map's size among them."""
    k = 40
    side = np.exp(rng.uniform(np.log(1.0), np.log(1.6 * max(h, w)), k))
    ratio = np.exp(rng.uniform(np.log(0.5), np.log(2.0), k))
    bw, bh = side / np.sqrt(ratio), side * np.sqrt(ratio)
    x1 = rng.uniform(-0.5 * bw, w - 0.5 * bw)
    y1 = rng.uniform(-0.5 * bh, h - 0.5 * bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    boxes[0] = [-w / 2, -h / 2, 1.5 * w, 1.5 * h]  # twice the map
    boxes[1] = [-0.6 * w, 0.2 * h, 0.3 * w, 0.5 * h]  # past the left side
    boxes[2] = [0.7 * w, 0.1 * h, 1.4 * w, 0.6 * h]  # past the right
    boxes[3] = [0.2 * w, -0.7 * h, 0.5 * w, 0.3 * h]  # past the top
    boxes[4] = [0.1 * w, 0.8 * h, 0.6 * w, 1.5 * h]  # past the bottom
    return np.concatenate([boxes, _edge_boxes(h, w, p, aligned)])


@functools.cache
def _case(i):
    h, w, p = MAPS[i]
    aligned = i == 0
    rng = np.random.default_rng(i)
    boxes = _mixed_boxes(rng, h, w, p, aligned)
    batch = rng.integers(0, 2, len(boxes))
    x = rng.standard_normal((2, h, w, 3))
    return x, boxes, batch, dict(output_size=p, sampling_ratio=0, aligned=aligned)


def _rois(boxes, batch):
    return np.concatenate([np.asarray(batch, boxes.dtype)[:, None], boxes], 1)


@pytest.mark.parametrize("i", range(len(MAPS)))
def test_every_class_gives_onnxruntimes_numbers(i):
    x, boxes, batch, kw = _case(i)
    h, w, p = MAPS[i]
    cls, n_taps = _classes(boxes, h, w, p, kw["aligned"])
    assert set(cls.tolist()) == set(range(n_taps + 1)), "every class, dense included"
    got = jax.jit(functools.partial(jr.roi_align, **kw))(x, _rois(boxes, batch))
    want = ort_roi_align(
        x.transpose(0, 3, 1, 2), boxes, batch, p, p, 1.0, 0, kw["aligned"]
    ).transpose(0, 2, 3, 1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("i,per_image", sampled(range(len(MAPS)), (False, True), fast=2))
def test_gradients_equal_the_dense_implementations(i, per_image):
    x, boxes, batch, kw = _case(i)
    cot = np.cos(np.arange(len(boxes) * kw["output_size"] ** 2 * 3)).reshape(
        len(boxes), kw["output_size"], kw["output_size"], 3
    )

    def grads(implementation, per_image):
        def fn(f, b):
            if per_image:  # each image's boxes: the first half on image 0
                return jr.roi_align(f, b.reshape(2, -1, 4), implementation=implementation, **kw)
            return jr.roi_align(
                f,
                jnp.concatenate([jnp.asarray(batch, b.dtype)[:, None], b], 1),
                implementation=implementation,
                **kw,
            )

        out, vjp = jax.vjp(fn, x, boxes)
        return (out.reshape(cot.shape), *vjp(cot.reshape(out.shape)))

    default = jax.jit(functools.partial(grads, None, per_image)).lower().compile()
    # Rows are written one by one (dense boxes' box gradient too), not scattered.
    assert not re.search(r"\bscatter\(", default.as_text())
    got = default()
    want = jax.jit(functools.partial(grads, "matmul", per_image))()
    for g, wnt in zip(got, want, strict=True):
        np.testing.assert_allclose(g, wnt, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_boxs_output_does_not_depend_on_the_other_boxes(dtype):
    """Each box of a call with boxes of every class (one larger than the map
    among them) reads as in a call of that box alone: bit for bit through a
    window; a dense box's sum is XLA's contraction, whose blocking may vary with
    the call's shapes (within a few ulps)."""
    x, boxes, batch, kw = _case(0)
    cls, n_taps = _classes(boxes, *MAPS[0], kw["aligned"], jnp.float32)
    x = jnp.asarray(x, dtype)
    rois = jnp.asarray(_rois(boxes, batch), jnp.float32)
    fn = jax.jit(functools.partial(jr.roi_align, **kw))
    together = np.asarray(fn(x, rois).astype(jnp.float32))
    alone = np.stack(
        [np.asarray(fn(x, rois[i : i + 1])[0].astype(jnp.float32)) for i in range(len(rois))]
    )
    taps = cls < n_taps
    np.testing.assert_array_equal(together[taps].view(np.uint32), alone[taps].view(np.uint32))
    np.testing.assert_allclose(together[~taps], alone[~taps], rtol=1e-5, atol=1e-6)


def test_vmap_of_a_mixed_call_is_each_call():
    x, boxes, batch, kw = _case(0)
    rois = _rois(boxes, batch)
    fn = functools.partial(jr.roi_align, **kw)
    xs = np.stack([x, 2.0 * x[::-1]])
    got = jax.jit(jax.vmap(fn, in_axes=(0, None)))(xs, rois)
    for j in range(2):  # the dense boxes' contraction may be blocked otherwise
        np.testing.assert_allclose(got[j], jax.jit(fn)(xs[j], rois), rtol=1e-13, atol=1e-13)


# multiscale_roi_align: each box through the smallest window of its level's
# ladder that it fits (TUNING.level_classes), the boxes sorted by level and class.
LEVELS = [(64, 96), (32, 48), (16, 24), (8, 12)]
STRIDES = (4, 8, 16, 32)


@functools.cache
def _multiscale_case(p):
    """Two images' pyramid and boxes of every level and window class (aspect
    ratios 1:8 to 8:1, sides of 2 to 1200 pixels on a 256 x 384 image), float64."""
    rng = np.random.default_rng(7)
    maps = [rng.standard_normal((2, h, w, 3)) for h, w in LEVELS]
    k = 96
    side = np.exp(rng.uniform(np.log(2.0), np.log(1200.0), k))
    ratio = np.exp(rng.uniform(np.log(1 / 8), np.log(8.0), k))
    bw, bh = side / np.sqrt(ratio), side * np.sqrt(ratio)
    x1, y1 = rng.uniform(0, 384, k) - bw / 2, rng.uniform(0, 256, k) - bh / 2  # centres inside
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], 1)
    # Long thin boxes whose bins span more rows than the ladder's last window
    # on P2 and P4 (dense), and the whole image.
    extra = [[-100, 50, 500, 62], [10, -300, 22, 700], [-200, 100, 1400, 140], [0, 0, 384, 256]]
    boxes = np.concatenate([boxes, np.array(extra, float)])
    k = len(boxes)
    # Each box's level (torchvision's mapper) and window class on it (the last
    # class, past the ladder, read with dense weights).
    level, _ = fpn_levels(jnp.asarray(boxes), k_min=2, k_max=5)
    level = np.asarray(level)
    cls = np.zeros(k, int)
    for lv, (h, w) in enumerate(LEVELS):
        on = level == lv
        gy, gx = _sampling.box_grids(
            jnp.asarray(boxes[on]),
            jnp.ones((int(on.sum()),), bool),
            (p, p),
            (h, w),
            spatial_scale=1 / STRIDES[lv],
            sampling_ratio=0,
            aligned=False,
            dtype=jnp.float64,
        )
        rows, cols = TUNING.level_classes(LEVELS[0][0], LEVELS[0][1], (p, p))
        live = jnp.ones((int(on.sum()), 1), bool)
        cy = _sampling.window_class(gy, rows, live)
        cls[on] = np.asarray(jnp.maximum(cy, _sampling.window_class(gx, cols, live)))
    batch = rng.integers(0, 2, k)
    return maps, boxes, batch, level, cls, len(rows)


@pytest.mark.parametrize("p", [7, 14])
def test_multiscale_every_level_and_class_gives_onnxruntimes_numbers(p):
    maps, boxes, batch, level, cls, n_cls = _multiscale_case(p)
    assert {(lv, c) for lv, c in zip(level, cls, strict=True)} >= {(0, c) for c in range(n_cls)}
    assert set(level.tolist()) == {0, 1, 2, 3} and set(cls.tolist()) == set(range(n_cls + 1))
    kw = dict(
        output_size=p, spatial_scales=tuple(1 / s for s in STRIDES), sampling_ratio=0, aligned=False
    )
    got = jax.jit(functools.partial(jr.multiscale_roi_align, **kw))(maps, _rois(boxes, batch))
    for lv, (m, stride) in enumerate(zip(maps, STRIDES, strict=True)):
        on = level == lv
        want = ort_roi_align(
            m.transpose(0, 3, 1, 2), boxes[on], batch[on], p, p, 1 / stride, 0, False
        ).transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got[on], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_image", [False, True])
def test_multiscale_gradients_equal_the_dense_implementations(per_image):
    maps, boxes, batch, _, _, _ = _multiscale_case(7)
    if per_image:  # an even split: the first half on image 0
        boxes, batch = boxes[: len(boxes) // 2 * 2], np.repeat([0, 1], len(boxes) // 2)
    kw = dict(output_size=7, spatial_scales=tuple(1 / s for s in STRIDES), sampling_ratio=0)
    cot = np.cos(np.arange(len(boxes) * 49 * 3)).reshape(len(boxes), 7, 7, 3)

    def grads(implementation):
        def fn(f, b):
            if per_image:
                b = b.reshape(2, -1, 4)
            else:
                b = jnp.concatenate([jnp.asarray(batch, b.dtype)[:, None], b], 1)
            out = jr.multiscale_roi_align(f, b, implementation=implementation, **kw)
            return out.reshape(cot.shape)

        out, vjp = jax.vjp(fn, maps, boxes)
        return out, *vjp(cot)

    got = jax.jit(functools.partial(grads, None))()
    want = jax.jit(functools.partial(grads, "matmul"))()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-10)


def test_multiscale_a_boxs_output_does_not_depend_on_the_other_boxes():
    """Bit for bit through a window; a dense box within a few ulps (XLA's
    contraction may be blocked otherwise for other shapes)."""
    maps, boxes, batch, _, cls, n_cls = _multiscale_case(7)
    maps = [jnp.asarray(m, jnp.float32) for m in maps]
    rois = jnp.asarray(_rois(boxes, batch), jnp.float32)
    kw = dict(output_size=7, spatial_scales=tuple(1 / s for s in STRIDES), sampling_ratio=0)
    fn = jax.jit(functools.partial(jr.multiscale_roi_align, **kw))
    together = np.asarray(fn(maps, rois))
    alone = np.stack([np.asarray(fn(maps, rois[i : i + 1])[0]) for i in range(len(rois))])
    taps = cls < n_cls
    np.testing.assert_array_equal(together[taps].view(np.uint32), alone[taps].view(np.uint32))
    np.testing.assert_allclose(together[~taps], alone[~taps], rtol=1e-5, atol=1e-6)
