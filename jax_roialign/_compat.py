"""The JAX APIs that moved or appeared between the oldest supported JAX and the newest.

Every name here is the newest JAX's own function where it exists (so nothing
changes there); older releases get the equivalent they have, or, for a feature
that has none (explicit sharding), a clear error when that feature is used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

import jax

#: The installed JAX as a tuple of ints, e.g. ``(0, 10, 2)``.
JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in re.findall(r"\d+", jax.__version__)[:3])

#: The oldest JAX whose explicit sharding (``jax.sharding.AxisType.Explicit``
#: meshes set with ``jax.set_mesh``) runs the ops per device (:mod:`._shard`).
#: Before it (0.7-0.9.0) ``jnp.repeat`` of an unsharded index vector under such a
#: mesh asks for an ``out_sharding`` ("Please pass sharding to `jnp.repeat` via
#: `out_sharding` parameter"), and before 0.7 ``jax.set_mesh`` is missing.
EXPLICIT_SHARDING_JAX = (0, 9, 1)


def _version(v: tuple[int, ...]) -> str:
    return ".".join(map(str, v))


def explicit_sharding_error(what: str = "explicit sharding") -> RuntimeError:
    return RuntimeError(
        f"jax_roialign: {what} (a mesh with jax.sharding.AxisType.Explicit axes) "
        f"needs jax>={_version(EXPLICIT_SHARDING_JAX)}; this is jax {jax.__version__}. "
        "Upgrade jax, or shard the features over a mesh with automatic axes "
        "(the default) or call the op inside jax.shard_map."
    )


def reshard(x: Any, spec: Any) -> Any:
    """``jax.reshard``, or the gate's error below :data:`EXPLICIT_SHARDING_JAX`
    (the one place explicitly sharded features reach first)."""
    fn = getattr(jax, "reshard", None)
    if fn is None or JAX_VERSION < EXPLICIT_SHARDING_JAX:
        raise explicit_sharding_error("an op on batch-sharded features under explicit sharding")
    return fn(x, spec)


def shard_map(f: Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """``jax.shard_map`` (jax 0.6.1); before it ``jax.experimental.shard_map.shard_map``
    with ``check_rep=False``: its replication check (``check_vma``'s predecessor)
    has no rule for several primitives the ops use (``custom_vmap``, a
    ``custom_vjp`` inside a loop, ...) and fails on them."""
    fn = getattr(jax, "shard_map", None)
    if fn is not None:
        return fn(f, **kwargs)
    from jax.experimental.shard_map import shard_map as old

    kwargs.pop("check_vma", None)
    return old(f, check_rep=False, **kwargs)


def vma(aval: Any) -> frozenset:
    """The manual mesh axes an abstract value varies over: ``aval.mat.varying``
    (jax 0.10), ``aval.vma`` (0.6.1); nothing before (no such types)."""
    mat = getattr(aval, "mat", None)
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def pcast_varying(x: Any, axes: Iterable[Any]) -> Any:
    """``jax.lax.pcast(x, axes, to="varying")`` (jax 0.8; ``jax.lax.pvary`` in 0.6.1-0.7)."""
    axes = tuple(axes)
    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(x, axes, to="varying")
    pvary = getattr(jax.lax, "pvary", None)
    return pvary(x, axes) if pvary is not None else x
