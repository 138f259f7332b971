"""Pods: per-image work on batch-sharded features runs on each device's own images.

With per-image boxes ``[N, R, 4]`` every op's work is independent per image. When
the features' type says that their batch axis is sharded (explicit sharding: a
mesh with ``jax.sharding.AxisType.Explicit`` axes, set with ``jax.set_mesh``),
:func:`by_image` runs the op's body under ``jax.shard_map`` over those mesh
axes, so a plain ``jax.jit`` program has no collective, whatever reader the
platform uses (a loop over boxes is not something XLA's partitioner can split
by itself). Under automatic sharding the body runs as written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from . import _compat

Array = jax.Array


def batch_axes(features: Any):
    """The mesh axes sharding axis 0 of ``features`` according to its type, or ``None``."""
    try:
        sharding = jax.typeof(features).sharding
        spec, mesh = sharding.spec, sharding.mesh
    except (AttributeError, TypeError):  # pragma: no cover - concrete arrays of old jax
        return None
    if mesh is None or getattr(mesh, "empty", True) or not len(spec) or spec[0] is None:
        return None
    return spec[0]


def by_image(fn: Callable[..., Any], features: Any, *args: Any) -> Any:
    """``fn(features, *args)``, per device when ``features`` is batch-sharded.

    Every array leaf of ``features`` and ``args`` must have the images (or the
    image-major boxes ``N * R``) on axis 0; the result likewise.
    """
    leaves = jax.tree.leaves(features)
    axes = batch_axes(leaves[0]) if leaves else None
    if axes is None:
        return fn(features, *args)

    def on_batch(x):
        return _compat.reshard(x, P(axes, *([None] * (jax.numpy.ndim(x) - 1))))

    features, args = jax.tree.map(on_batch, (features, args))
    spec = P(axes)
    return jax.shard_map(
        lambda f, a: fn(f, *a), in_specs=(spec, spec), out_specs=spec, check_vma=False
    )(features, args)


def per_image_pool(fn: Callable[..., Any], features: Any, batch: Array, *args: Any) -> Any:
    """``fn(features, batch, *args)`` for image-major per-image boxes, per device
    when ``features`` is batch-sharded (:func:`by_image`), ``batch`` then the
    indices of the device's own images (``R`` boxes per image)."""

    def local(f, b, *a):
        n = jax.tree.leaves(f)[0].shape[0]
        return fn(f, jax.numpy.repeat(jax.numpy.arange(n, dtype=b.dtype), b.shape[0] // n), *a)

    return by_image(local, features, batch, *args)


def aval_varying(aval: Any) -> frozenset:
    """The manual mesh axes a value of type ``aval`` varies over."""
    return _compat.vma(aval)


def _vma(x: Any) -> frozenset:
    """The manual mesh axes ``x`` varies over."""
    return aval_varying(jax.typeof(x))


def varying(tree: Any, *refs: Any) -> Any:
    """``tree`` cast to vary over every manual mesh axis that ``refs`` vary over.

    Inside ``jax.shard_map`` (with its default ``check_vma=True``) a loop's carry
    must keep one type: zeros made inside the body are invariant, while what is
    added to them (from sharded features, boxes or a cotangent) varies. Outside
    ``shard_map`` nothing varies and ``tree`` comes back as it is.
    """
    axes = frozenset().union(*(_vma(r) for r in jax.tree.leaves(refs)))

    def cast(x):
        missing = tuple(sorted(axes - _vma(x)))
        return _compat.pcast_varying(x, missing) if missing else x

    return jax.tree.map(cast, tree) if axes else tree
