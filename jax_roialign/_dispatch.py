"""One way in: which implementation reads the map, chosen once, and every transform.

Every op describes a call as a *recipe*: a hashable object holding the call's
static settings (sizes, scale, sampling, layout, dtypes) that says, for each
implementation it supports, how to compute its outputs from its arrays (the
maps, the boxes, the batch indices). This module binds the recipe as one JAX
primitive, :data:`dispatch_p`, and gives that primitive its rules:

* *Lowering*, per platform: the program is lowered for a platform (or several,
  for an export), and only then is the implementation picked
  (:func:`resolve`) and its function traced. A program compiled for a TPU from
  a CPU host gets the TPU's implementation; nothing is traced for platforms
  the program is not lowered for.
* *JVP*: the primal is the recipe again; the tangent is a primitive of its own
  (:class:`Jvp`), linear in the tangents, computed by forward-mode autodiff of
  a plain-JAX implementation of the same numbers (:meth:`Recipe.differentiable`).
* *Transpose* of that tangent: a :class:`Vjp` primitive, the reverse-mode
  derivative of the implementation's own forward, so the readers' custom VJPs
  (the row-window transpose, the window reader's transpose) run in reverse
  mode. Reverse mode is the transpose of the JVP, as for every JAX primitive.
* *Batching*: a :class:`Batched` primitive, ``jax.vmap`` of the recipe's
  functions (the readers' own ``custom_vmap`` rules fold a vmapped axis into
  the images).

Derived recipes are recipes too, so any composition works: ``jvp``,
``jacfwd``, ``hessian``, ``jax.jvp(jax.grad(f))``, ``grad`` of ``grad``,
``vmap`` of any of them. Past the first order the plain-JAX implementation is
differentiated (correct, not tuned).

The implementation option (:class:`Implementation`): ``None`` chooses by the
platform (:data:`PLATFORM_DEFAULT`, then the op's own fallback); an explicit
choice that the op cannot run is a ``ValueError`` when the call is traced
(:func:`parse`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _shard

Array = jax.Array


class Implementation(enum.Enum):
    """How an op reads the map; every implementation gives the same numbers.

    ``GATHER``: per-tap reads; the feature gradient is added box by box into
    row windows (deterministic, no scatter). ``SCATTER``: the same reads, the
    gradient by autodiff's scatter-add. ``WINDOW``: one window of the map per
    box (``dynamic_slice``) contracted with the box's weights (no gather, no
    scatter; work per box follows its size). ``PALLAS``: ``WINDOW`` with its
    forward and feature gradient as Pallas TPU kernels (interpreted off TPU).
    ``MATMUL``: dense interpolation matrices over the whole map (no gather, no
    scatter; work per box follows the map).
    """

    GATHER = "gather"
    SCATTER = "scatter"
    WINDOW = "window"
    PALLAS = "pallas"
    MATMUL = "matmul"


ALL = frozenset(Implementation)

#: The automatic choice by the platform a program is lowered for (others: GATHER).
PLATFORM_DEFAULT = {
    "tpu": Implementation.WINDOW,
    "cuda": Implementation.SCATTER,
    "rocm": Implementation.SCATTER,
}
_LOWERED_FOR = ("cpu", "cuda", "rocm", "tpu")


def parse_implementation(value: Any) -> Implementation | None:
    """``None`` (choose by platform) or one of the implementation names."""
    if value is None or isinstance(value, Implementation):
        return value
    if isinstance(value, str):
        for member in Implementation:
            if value.lower() == member.value:
                return member
    names = ", ".join(repr(m.value) for m in Implementation)
    raise ValueError(f"implementation must be None or one of {names}; got {value!r}")


def implementation_arg(implementation: Any, method: Any = None) -> Implementation | None:
    """The ``implementation`` argument, or the deprecated ``method`` alias of the
    ops that had one (``"auto"`` meaning ``None``), parsed."""
    if method is None:
        return parse_implementation(implementation)
    warnings.warn(
        "method= is deprecated; use implementation= (None chooses by platform)",
        DeprecationWarning,
        stacklevel=3,
    )
    if implementation is not None:
        raise ValueError("pass implementation= or the deprecated method=, not both")
    if isinstance(method, str) and method.lower() == "auto":
        return None
    return parse_implementation(method)


class Recipe:
    """One call of an op: its static settings and, per implementation, its functions.

    Subclasses are frozen dataclasses (hashable: a compiled call is cached by
    its recipe). They set ``name``, ``supports`` and ``fallback``, and define
    :meth:`out_avals` and :meth:`forward`; they may override
    :meth:`differentiable` and :meth:`reverse`.
    """

    #: The op's public name (in messages).
    name: ClassVar[str] = "op"
    #: The implementations the op can run.
    supports: ClassVar[frozenset[Implementation]] = ALL
    #: What runs where the platform's default is not supported.
    fallback: ClassVar[Implementation] = Implementation.GATHER
    #: Why an implementation is not supported (for the error message).
    unsupported_reason: ClassVar[str] = ""

    def out_avals(self, *avals: Any) -> Sequence[jax.core.ShapedArray]:
        """The outputs' shapes and dtypes, from the inputs' (no tracing)."""
        raise NotImplementedError

    def forward(self, impl: Implementation) -> Callable[..., Sequence[Array]]:
        """``fn(*arrays) -> outputs`` by implementation ``impl`` (a supported one)."""
        raise NotImplementedError

    def reverse(self, impl: Implementation) -> Callable[..., Sequence[Array]]:
        """The function whose reverse-mode derivative is taken for ``impl``
        (default: :meth:`forward`, whose custom VJPs then run)."""
        return self.forward(impl)

    def differentiable(self, impl: Implementation) -> Callable[..., Sequence[Array]]:
        """The same numbers in plain JAX, differentiable in every mode and order:
        what forward mode and higher orders differentiate (default: ``SCATTER``'s
        forward where the op supports it, else :meth:`forward`)."""
        if Implementation.SCATTER in self.supports:
            return self.forward(Implementation.SCATTER)
        return self.forward(impl)


def check_supported(recipe_type: type[Recipe], impl: Implementation | None) -> None:
    """Raises ``ValueError`` (at trace time) for an explicit choice the op cannot run."""
    if impl is None or impl in recipe_type.supports:
        return
    names = ", ".join(repr(m.value) for m in Implementation if m in recipe_type.supports)
    why = f" ({recipe_type.unsupported_reason})" if recipe_type.unsupported_reason else ""
    raise ValueError(
        f"{recipe_type.name} cannot use implementation={impl.value!r}{why}; "
        f"it supports {names}, or None to choose by platform"
    )


def resolve(recipe: Recipe, impl: Implementation | None, platform: str) -> Implementation:
    """The implementation that runs on ``platform``: the explicit choice, else the
    platform's default where the op supports it, else the op's fallback."""
    if impl is not None:
        return impl
    choice = PLATFORM_DEFAULT.get(platform, Implementation.GATHER)
    return choice if choice in recipe.supports else recipe.fallback


def call(
    recipe: Recipe,
    impl: Implementation | None,
    maps: Array | Sequence[Array],
    *arrays: Any,
    per_image: bool = False,
) -> list[Array]:
    """The op's outputs: :data:`dispatch_p` bound on the maps (one array, or a
    sequence of them, passed to the recipe's functions first, one by one) and
    ``arrays``. ``per_image``: every array has the images (or the image-major
    boxes) on axis 0, and on batch-sharded maps the call runs on each device's own
    images (:func:`jax_roialign._shard.by_image`)."""
    check_supported(type(recipe), impl)
    leaves = tuple(maps) if isinstance(maps, (tuple, list)) else (maps,)

    def bind(m, *a):
        platform = _INLINE.get()
        if platform is not None:  # inspection: the platform's function itself
            return recipe.forward(resolve(recipe, impl, platform))(*m, *a)
        return dispatch_p.bind(*m, *a, recipe=recipe, implementation=impl)

    if per_image:
        return _shard.by_image(bind, leaves, *arrays)
    axes = _shard.batch_axes(leaves[0])
    if axes is not None:
        raise ValueError(
            f"{recipe.name}: the features are sharded over mesh axes {axes!r} (explicit "
            "sharding), which boxes with batch indices cannot follow; pass per-image "
            "boxes [N, R, ...] so that each device pools its own images"
        )
    return bind(leaves, *arrays)


_INLINE: contextvars.ContextVar[str | None] = contextvars.ContextVar("inline", default=None)


@contextlib.contextmanager
def inlined(platform: str):
    """Within it, ops trace the function ``platform``'s lowering would run instead
    of binding :data:`dispatch_p` (to inspect an implementation's program, e.g.
    with ``jax.make_jaxpr``; no transform rules apply)."""
    token = _INLINE.set(platform)
    try:
        yield
    finally:
        _INLINE.reset(token)


# ---------------------------------------------------------------------------
# The primitive and its rules.
# ---------------------------------------------------------------------------

dispatch_p = Primitive("jax_roialign")
dispatch_p.multiple_results = True


@functools.lru_cache(maxsize=512)
def _compiled(recipe: Recipe, implementation: Implementation | None):
    """A jitted bind, for calls outside ``jit`` (cached per recipe)."""
    return jax.jit(lambda *a: dispatch_p.bind(*a, recipe=recipe, implementation=implementation))


dispatch_p.def_impl(lambda *a, recipe, implementation: _compiled(recipe, implementation)(*a))


@dispatch_p.def_abstract_eval
def _abstract_eval(*avals, recipe: Recipe, implementation):
    outs = recipe.out_avals(*avals)
    if not any(_shard.aval_varying(a) for a in avals):
        return outs

    # Inside shard_map: the outputs vary over the inputs' manual mesh axes.
    # Typed by JAX's own rules on a stand-in (a zero from every input).
    def stand_in(*xs):
        zero = sum(jnp.sum(x.reshape(-1)[:0].astype(jnp.float32)) for x in xs)
        return [jnp.broadcast_to(zero.astype(o.dtype), o.shape) for o in outs]

    return [jax.typeof(o) for o in jax.eval_shape(stand_in, *avals)]


def _lowering(platform: str):
    def rule(ctx, *args, recipe: Recipe, implementation):
        fn = recipe.forward(resolve(recipe, implementation, platform))
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    return rule


mlir.register_lowering(dispatch_p, _lowering("cpu"))
for _platform in _LOWERED_FOR:
    mlir.register_lowering(dispatch_p, _lowering(_platform), platform=_platform)


def _is_float(aval: Any) -> bool:
    return jnp.issubdtype(aval.dtype, jnp.inexact)


def _jvp_rule(primals, tangents, *, recipe: Recipe, implementation):
    out = dispatch_p.bind(*primals, recipe=recipe, implementation=implementation)
    nonzero = tuple(type(t) is not ad.Zero for t in tangents)
    if not any(nonzero):
        return out, [ad.Zero(jax.typeof(o).to_tangent_aval()) for o in out]
    live = [t for t, z in zip(tangents, nonzero, strict=True) if z]
    tangent = dispatch_p.bind(
        *primals, *live, recipe=Jvp(recipe, nonzero), implementation=implementation
    )
    return out, tangent


def _transpose_rule(cts, *args, recipe: Recipe, implementation):
    if not isinstance(recipe, Jvp):  # pragma: no cover - only tangents are linear
        raise NotImplementedError(f"{recipe.name} is not linear in its inputs")
    n = len(recipe.nonzero)
    primals, tangents = args[:n], args[n:]
    if any(ad.is_undefined_primal(p) for p in primals):  # pragma: no cover
        raise NotImplementedError("a tangent's primal inputs must be known")
    slots = [i for i, z in enumerate(recipe.nonzero) if z]
    undefined = [ad.is_undefined_primal(t) for t in tangents]
    wanted = tuple(i in {s for s, u in zip(slots, undefined, strict=True) if u} for i in range(n))
    if all(type(c) is ad.Zero for c in cts) or not any(wanted):
        return [None] * len(args)
    cts = [ad.instantiate_zeros(c) for c in cts]
    got = iter(
        dispatch_p.bind(
            *primals, *cts, recipe=Vjp(recipe.base, wanted), implementation=implementation
        )
    )
    return [None] * n + [next(got) if u else None for u in undefined]


def _batch_rule(args, dims, *, recipe: Recipe, implementation):
    dims = tuple(dims)  # None: not mapped
    outs = dispatch_p.bind(*args, recipe=Batched(recipe, dims), implementation=implementation)
    return outs, [0] * len(outs)


ad.primitive_jvps[dispatch_p] = _jvp_rule
ad.primitive_transposes[dispatch_p] = _transpose_rule
batching.primitive_batchers[dispatch_p] = _batch_rule


# ---------------------------------------------------------------------------
# Recipes derived by the rules.
# ---------------------------------------------------------------------------


def _zeros_tangent(x: Array) -> Array:
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return jnp.zeros_like(x)
    return jnp.zeros(jnp.shape(x), jax.dtypes.float0)


@dataclasses.dataclass(frozen=True)
class _Derived(Recipe):
    """A recipe made from another by a transform: the same implementations."""

    base: Recipe

    @property
    def supports(self):  # type: ignore[override]
        return self.base.supports

    @property
    def fallback(self):  # type: ignore[override]
        return self.base.fallback


@dataclasses.dataclass(frozen=True)
class Jvp(_Derived):
    """The tangent of ``base``: inputs ``(*primals, *tangents of nonzero)``."""

    nonzero: tuple[bool, ...]

    @property
    def name(self):  # type: ignore[override]
        return f"jvp of {self.base.name}"

    def out_avals(self, *avals):
        return self.base.out_avals(*avals[: len(self.nonzero)])

    def _tangent(self, fn):
        n = len(self.nonzero)

        def tangent(*args):
            primals, live = args[:n], iter(args[n:])
            tangents = [
                next(live) if z else _zeros_tangent(p)
                for p, z in zip(primals, self.nonzero, strict=True)
            ]
            return jax.jvp(fn, tuple(primals), tuple(tangents))[1]

        return tangent

    def forward(self, impl):
        return self._tangent(self.base.differentiable(impl))

    def differentiable(self, impl):
        return self.forward(impl)


@dataclasses.dataclass(frozen=True)
class Vjp(_Derived):
    """The cotangents of ``base``'s ``wanted`` inputs: inputs ``(*primals, *cts)``."""

    wanted: tuple[bool, ...]

    @property
    def name(self):  # type: ignore[override]
        return f"vjp of {self.base.name}"

    def out_avals(self, *avals):
        n = len(self.wanted)
        return [a for a, w in zip(avals[:n], self.wanted, strict=True) if w]

    def _cotangent(self, fn):
        n = len(self.wanted)
        slots = [i for i, w in enumerate(self.wanted) if w]

        def cotangent(*args):
            primals, cts = list(args[:n]), list(args[n:])

            def part(*chosen):
                full = list(primals)
                for i, x in zip(slots, chosen, strict=True):
                    full[i] = x
                return fn(*full)

            _, vjp = jax.vjp(part, *(primals[i] for i in slots))
            return list(vjp(cts))

        return cotangent

    def forward(self, impl):
        return self._cotangent(self.base.reverse(impl))

    def differentiable(self, impl):
        return self._cotangent(self.base.differentiable(impl))

    def reverse(self, impl):
        return self.differentiable(impl)


@dataclasses.dataclass(frozen=True)
class Batched(_Derived):
    """``base`` vmapped over the inputs' axes ``dims`` (``None``: not mapped);
    outputs batched on axis 0."""

    dims: tuple[int | None, ...]

    @property
    def name(self):  # type: ignore[override]
        return self.base.name

    def out_avals(self, *avals):
        size = next(a.shape[d] for a, d in zip(avals, self.dims, strict=True) if d is not None)
        inner = [
            a if d is None else a.update(shape=a.shape[:d] + a.shape[d + 1 :])
            for a, d in zip(avals, self.dims, strict=True)
        ]
        return [o.update(shape=(size,) + o.shape) for o in self.base.out_avals(*inner)]

    def _mapped(self, fn):
        return jax.vmap(fn, in_axes=self.dims, out_axes=0)

    def forward(self, impl):
        return self._mapped(self.base.forward(impl))

    def reverse(self, impl):
        return self._mapped(self.base.reverse(impl))

    def differentiable(self, impl):
        return self._mapped(self.base.differentiable(impl))
