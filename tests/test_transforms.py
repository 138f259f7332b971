"""Every JAX transform on every op's default implementation, and the implementation option.

Forward mode and reverse mode must agree (``jvp`` against ``vjp``), and so must
the two second orders (forward-over-reverse, the Hessian-vector product idiom,
against reverse-over-reverse); ``jacfwd`` must equal ``jacrev``; ``vmap`` must
equal a loop. All in float64, on small calls, through the default implementation
(``implementation=None``). An explicit implementation an op cannot run raises
``ValueError`` when the call is traced.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import slow_except

import jax_roialign as jr

_RNG = np.random.default_rng(7)
_F = _RNG.standard_normal((2, 9, 11, 4))
_B5 = np.array([[0, 3.0, 5.0, 30.0, 28.0], [1, -8.0, 2.0, 22.0, 40.0], [0, 6.0, 9.0, 60.0, 33.0]])
_ROT = np.concatenate([_B5, np.full((3, 1), 25.0)], axis=1)
_CROP = _RNG.uniform(0.0, 1.0, (3, 4))
_ML = np.sort(_RNG.uniform(0.0, 50.0, (2, 2, 4)), axis=-1)


def _pyramid(f):
    return [f, f[:, ::2, ::2]]


# name -> (function of the differentiated arguments, those arguments)
OPS = {
    "roi_align": (
        lambda f, b: jr.roi_align(f, b, output_size=2, spatial_scale=0.25, sampling_ratio=2),
        (_F, _B5),
    ),
    "roi_align_adaptive_per_image": (
        lambda f, b: jr.roi_align(f, b, output_size=2, spatial_scale=0.25),
        (_F, np.stack([_B5[:2, 1:], _B5[1:, 1:]])),
    ),
    "roi_align_max": (
        lambda f, b: jr.roi_align(
            f, b, output_size=2, spatial_scale=0.25, mode="max", sampling_ratio=2
        ),
        (_F, _B5),
    ),
    "roi_pool": (lambda f: jr.roi_pool(f, _B5, output_size=2, spatial_scale=0.25), (_F,)),
    "ps_roi_align": (
        lambda f, b: jr.ps_roi_align(f, b, output_size=2, spatial_scale=0.25, sampling_ratio=2),
        (_F, _B5),
    ),
    "precise_roi_pool": (
        lambda f, b: jr.precise_roi_pool(f, b, output_size=2, spatial_scale=0.25),
        (_F, _B5),
    ),
    "deform_roi_align": (
        lambda f, b, o: jr.deform_roi_align(
            f, b, o, output_size=2, spatial_scale=0.25, sampling_ratio=2
        ),
        (_F, _B5, _RNG.uniform(-1.0, 1.0, (3, 2, 2, 2))),
    ),
    "roi_align_rotated": (
        lambda f, b: jr.roi_align_rotated(
            f, b, output_size=2, spatial_scale=0.25, sampling_ratio=2
        ),
        (_F, _ROT),
    ),
    "multiscale_roi_align": (
        lambda f, b: jr.multiscale_roi_align(
            _pyramid(f), b, output_size=2, spatial_scales=(0.25, 0.125), sampling_ratio=2
        ),
        (_F, _B5),
    ),
    "crop_and_resize": (
        lambda f, b: jr.crop_and_resize(f, b, jnp.array([0, 1, 0]), (2, 3)),
        (_F, _CROP),
    ),
    "multilevel_crop_and_resize": (
        lambda f, b: jr.multilevel_crop_and_resize({2: f, 3: f[:, ::2, ::2]}, b, output_size=2),
        (_F, _ML),
    ),
}


def _args(name):
    fn, args = OPS[name]
    return fn, tuple(jnp.asarray(a) for a in args)


def _loss(fn, args):
    w = jnp.asarray(np.random.default_rng(1).standard_normal(jax.eval_shape(fn, *args).shape))
    return lambda *a: jnp.sum(fn(*a) * w)


def _direction(args):
    rng = np.random.default_rng(2)
    return tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in args)


def _dot(xs, ys):
    return sum(jnp.vdot(x, y) for x, y in zip(xs, ys, strict=True))


@pytest.mark.parametrize(
    "name",
    slow_except(
        list(OPS),
        {"roi_align", "roi_align_max", "roi_pool", "ps_roi_align", "deform_roi_align"}
        | {"crop_and_resize"},
    ),
)
def test_forward_mode_agrees_with_reverse_mode(name):
    fn, args = _args(name)
    loss = _loss(fn, args)
    v = _direction(args)
    argnums = tuple(range(len(args)))
    tangent = jax.jit(lambda *a: jax.jvp(loss, a, v)[1])(*args)
    grads = jax.jit(jax.grad(loss, argnums))(*args)
    np.testing.assert_allclose(tangent, _dot(grads, v), rtol=1e-9, atol=1e-9)


# Adaptive grids (and precise pooling's integral weights) make the largest
# second-order programs: they run in the slow stage.
_FAST_SECOND = {"roi_align_max", "roi_pool", "crop_and_resize", "multilevel_crop_and_resize"}


@pytest.mark.parametrize("name", slow_except(list(OPS), _FAST_SECOND))
def test_forward_over_reverse_agrees_with_reverse_over_reverse(name):
    fn, args = _args(name)
    loss = _loss(fn, args)
    v = _direction(args)
    argnums = tuple(range(len(args)))
    grad = jax.grad(loss, argnums)
    hvp = jax.jit(lambda *a: jax.jvp(grad, a, v)[1])(*args)
    rev = jax.jit(jax.grad(lambda *a: _dot(grad(*a), v), argnums))(*args)
    for x, y in zip(hvp, rev, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(
    "name", slow_except(["roi_align", "roi_align_max", "multiscale_roi_align"], {"roi_align"})
)
def test_jacfwd_equals_jacrev(name):
    fn, args = _args(name)
    boxes = args[1]
    of_boxes = lambda b: fn(args[0], b)[..., 0]  # noqa: E731
    np.testing.assert_allclose(
        jax.jit(jax.jacfwd(of_boxes))(boxes), jax.jit(jax.jacrev(of_boxes))(boxes), atol=1e-9
    )


# jax.hessian is forward-over-reverse: for roi_align and precise_roi_pool (among
# every op) test_forward_over_reverse_agrees_with_reverse_over_reverse checks it.
@pytest.mark.parametrize("name", ["crop_and_resize"])
def test_hessian_of_a_loss(name):
    fn, args = _args(name)
    loss = _loss(fn, args)
    h = jax.jit(jax.hessian(lambda b: loss(args[0], b)))(args[1])
    np.testing.assert_allclose(h, np.swapaxes(np.swapaxes(h, 0, 2), 1, 3), atol=1e-8)


@pytest.mark.parametrize(
    "name", slow_except(["roi_align", "roi_pool", "deform_roi_align"], {"roi_pool"})
)
def test_vmap_over_features_and_its_gradient(name):
    fn, args = _args(name)
    stacked = jnp.stack([args[0], 2.0 * args[0] + 1.0])
    out = jax.jit(jax.vmap(lambda f: fn(f, *args[1:])))(stacked)
    for i in range(2):
        np.testing.assert_allclose(out[i], fn(stacked[i], *args[1:]), atol=1e-12)
    loss = _loss(fn, args)
    g = jax.jit(jax.vmap(jax.grad(lambda f: loss(f, *args[1:]))))(stacked)
    np.testing.assert_allclose(g[1], jax.grad(lambda f: loss(f, *args[1:]))(stacked[1]), atol=1e-9)


def test_default_is_the_platforms_implementation_bit_for_bit():
    fn = lambda f, b, **kw: jr.roi_align(f, b, output_size=3, spatial_scale=0.25, **kw)  # noqa: E731
    f, b = jnp.asarray(_F, jnp.float32), jnp.asarray(_B5, jnp.float32)
    default = jax.jit(fn)(f, b)
    gather = jax.jit(lambda f, b: fn(f, b, implementation="gather"))(f, b)
    assert jnp.array_equal(default, gather)


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: jr.roi_align(_F, _B5, output_size=2, mode="max", implementation="matmul"),
            "roi_align cannot use implementation='matmul'",
        ),
        (
            lambda: jr.ps_roi_align(_F, _B5, output_size=2, implementation="gather"),
            "ps_roi_align cannot use implementation='gather'",
        ),
        (
            lambda: jr.roi_pool(_F, _B5, output_size=2, implementation="scatter"),
            "roi_pool cannot use implementation='scatter'",
        ),
        (
            lambda: jr.deform_roi_align(
                _F, _B5, np.zeros((3, 2, 2, 2)), output_size=2, implementation="pallas"
            ),
            "deform_roi_align cannot use implementation='pallas'",
        ),
        (
            lambda: jr.roi_align_rotated(_F, _ROT, output_size=2, implementation="matmul"),
            "roi_align_rotated cannot use implementation='matmul'",
        ),
        (
            lambda: jr.crop_and_resize(
                _F, _CROP, np.zeros(3, np.int32), 2, implementation="matmul"
            ),
            "crop_and_resize cannot use implementation='matmul'",
        ),
        (
            lambda: jr.roi_align(_F, _B5, output_size=2, implementation="fast"),
            "implementation must be None or one of",
        ),
    ],
)
def test_an_implementation_the_op_cannot_run_raises(call, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        jax.jit(call).trace()


def test_method_is_a_deprecated_alias():
    f, b = jnp.asarray(_F), jnp.asarray(_B5)
    with pytest.warns(DeprecationWarning, match="implementation="):
        old = jr.roi_align(f, b, output_size=2, method="scatter")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = jr.roi_align(f, b, output_size=2, implementation="scatter")
    assert jnp.array_equal(old, new)
    with pytest.raises(ValueError, match="not both"):
        jr.roi_align(f, b, output_size=2, method="gather", implementation="gather")
