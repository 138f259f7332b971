"""The separable average: a pair of axis grids read by any implementation.

RoI Align's average (and every op whose bin value is a product of a y-weight
and an x-weight summed over the map: multi-level, position-sensitive) is read
here from two :class:`jax_roialign._sampling.AxisGrid`. Each implementation
takes the weights in its own form:

* ``GATHER``: taps, two per sample for a fixed grid; for an adaptive grid each
  box reads the rows of the smallest window its own bins fit, or dense weights
  past the last (:mod:`._classes`). The feature gradient is the row-window
  transpose.
* ``SCATTER``: the same taps; for an adaptive grid the rows of the smallest
  window every bin of the call fits (a ``lax.switch`` over a few windows),
  dense weights past the last; autodiff's gradient.
* ``MATMUL``: dense weights over the whole map.
* ``WINDOW`` / ``PALLAS``: dense weights read through each box's window.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _classes, _contract, _sampling
from ._dispatch import Implementation
from ._tuning import TUNING
from ._validation import DataFormat

Array = jax.Array

_WINDOWED = (Implementation.WINDOW, Implementation.PALLAS)
_TAPS = (Implementation.GATHER, Implementation.SCATTER)


class Weights:
    """What ``impl`` reads of the grids, computed once (only what it uses).

    ``dense``: ``(wy [K, PH, H] * ok, wx [K, PW, W])``. ``taps``: per axis
    ``(idx, w)``, the widest window's for adaptive grids. ``windows``: the
    adaptive windows (rows, cols), ``choice`` the one every live bin of the call
    fits (``len(windows)``: none, the dense weights). ``GATHER``: ``classes``
    the finer ladder each box is read through, ``cls`` each box's, and
    ``choice`` over the boxes that fit one. ``span``: each box's first row
    and rows needed per axis, for the window reader.
    """

    def __init__(self, gy, gx, ok, impl: Implementation):
        gy, gx = _sampling.with_geometry(gy, gx)
        self.gy, self.gx = gy, gx
        self.static = gy.static_count is not None and gx.static_count is not None
        self.live = live = ok[:, 0, 0] > 0
        self.dense: tuple[Array, Array] | None = None
        self.span: tuple[Any, Any] | None = None
        self.taps: tuple[Any, Any] | None = None
        self.choice: Array | None = None
        self.cls: Array | None = None
        self.classes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        self.windows: tuple[tuple[int, ...], tuple[int, ...]] | None = None
        if impl in _WINDOWED:
            self.span = (_sampling.tap_span(gy, live), _sampling.tap_span(gx, live))
        if impl not in _TAPS:
            wy, wx = _sampling.both_dense(gy, gx)
            self.dense = (wy * ok, wx)
            return
        if self.static:
            iy, wy = _sampling.sample_taps(gy)
            self.taps = ((iy, wy * ok), _sampling.sample_taps(gx))
            return
        # Adaptive: the taps of the widest window (narrower windows take their
        # first rows); the dense weights are made by the dense branch itself
        # (:func:`average`), so that neither the taps' reads nor their box
        # gradient carry the whole map's rows.
        # GATHER reads each box through its own window (:mod:`._classes`), from a
        # finer ladder; SCATTER through the one every live bin of the call fits.
        pooled = (gy.first.shape[1], gx.first.shape[1])
        self.windows = TUNING.window_tiers(gy.length, gx.length, pooled)
        if impl is Implementation.GATHER:
            self.classes = TUNING.class_tiers(gy.length, gx.length, pooled)
            self.cls = jnp.maximum(
                _sampling.window_class(gy, self.classes[0], live[:, None]),
                _sampling.window_class(gx, self.classes[1], live[:, None]),
            )
            # The gradients' window: every box read through a window fits it.
            live = live & (self.cls < len(self.classes[0]))
        self.choice = jnp.maximum(
            _sampling.window_choice(gy, self.windows[0], live[:, None]),
            _sampling.window_choice(gx, self.windows[1], live[:, None]),
        )
        widest = (self.windows[0][-1], self.windows[1][-1])
        taps = _sampling.both_taps(gy, gx, widest)
        (iy, wy), tx = taps
        self.taps = ((iy, wy * ok), tx)


def window_read(
    maps: list[Array],
    layout: DataFormat,
    batch: Array,
    level: Array,
    live: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    ok: Array,
    dtype: Any,
    *,
    per_image: bool,
    dense: tuple[Array, Array] | None = None,
    span: tuple[Any, Any] | None = None,
    pallas: bool = False,
    ps: bool = False,
) -> Array:
    """The box-local gather-free read (:mod:`._window`) of separable grids, ``[K, PH, PW, C]``
    in ``dtype``.

    Dense weights (the matmul path's, one source of numbers), each box's tap span
    per axis, and one window per box. ``per_image``: boxes are ``N`` equal groups,
    group ``n`` reading image ``n``. ``dense`` and ``span``: those weights and
    spans when already computed. ``pallas``: the forward and feature gradient by
    the Pallas kernels (:mod:`._pallas`). ``ps``: each bin keeps its own channel
    group (position-sensitive, ``[K, PH, PW, C_out]``). The reader rounds each box
    to the maps' dtype as it writes it and only the cast to ``dtype`` follows (the
    same bits), so the backward gets a cotangent in the maps' dtype and widens it
    box by box, not as a whole.
    """
    from . import _window

    if dense is None:
        wy, wx = _sampling.both_dense(gy, gx)
        dense = (wy * ok, wx)
    wy, wx = dense
    if span is None:
        span = (_sampling.tap_span(gy, live), _sampling.tap_span(gx, live))
    (lo_y, need_y), (lo_x, need_x) = span
    out_dtype = jnp.result_type(*maps)
    tables = (wy, wx, level, lo_y, need_y, lo_x, need_x)
    opts: dict[str, Any] = dict(pallas=pallas, ps=ps, out_dtype=out_dtype)
    if not per_image:
        out = _window.contract_window(maps, layout, *tables, dtype, batch=batch, **opts)
        return out.astype(dtype)
    n = maps[0].shape[0]
    wy, wx, level, lo_y, need_y, lo_x, need_x = (t.reshape((n, -1) + t.shape[1:]) for t in tables)
    out = _window.contract_window(
        maps, layout, wy, wx, level, lo_y, need_y, lo_x, need_x, dtype, **opts
    )
    return out.reshape((-1,) + out.shape[2:]).astype(dtype)


def average(
    features: Array,
    layout: DataFormat,
    batch: Array,
    ok: Array,
    gy: _sampling.AxisGrid,
    gx: _sampling.AxisGrid,
    impl: Implementation,
    dtype: Any,
    *,
    per_image: bool = False,
) -> Array:
    """The separable average of any pair of axis grids (fixed or adaptive) by ``impl``.

    ``ok`` ``[K, 1, 1]`` (0 or 1) zeroes invalid boxes. ``per_image``: the boxes
    are ``N`` equal groups, group ``n`` reading image ``n`` (the ``[N, R, 4]``
    form), the reads vmapped over the images.
    """
    w = Weights(gy, gx, ok, impl)
    if impl in _WINDOWED:
        level = jnp.zeros(batch.shape, jnp.int32)
        return window_read(
            [features],
            layout,
            batch,
            level,
            w.live,
            w.gy,
            w.gx,
            ok,
            dtype,
            per_image=per_image,
            dense=w.dense,
            span=w.span,
            pallas=impl is Implementation.PALLAS,
        )
    row_vjp = impl is Implementation.GATHER

    def dense(f, b, wy, wx):
        return _contract.contract_dense(f, layout, b, wy, wx, dtype)

    def gather(ty: int, tx: int):
        def fn(f, b, taps_y, taps_x):
            # The first rows of the widest window's taps (the same first row).
            (iy, wy), (ix, wx) = taps_y, taps_x
            if not w.static:
                iy, wy, ix, wx = iy[..., :ty], wy[..., :ty], ix[..., :tx], wx[..., :tx]
            return _contract.contract_taps(f, layout, b, iy, wy, ix, wx, dtype, row_vjp=row_vjp)

        return fn

    def run(fn, *args):
        """``fn(features, batch, *args)`` for all boxes, or vmapped over images."""
        if not per_image:
            return fn(features, batch, *args)
        n = features.shape[0]
        grouped = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), args)
        local = jnp.zeros((jax.tree.leaves(grouped)[0].shape[1],), jnp.int32)
        out = jax.vmap(lambda f, *a: fn(f, local, *a))(features[:, None], *grouped)
        return out.reshape((-1,) + out.shape[2:])

    if impl is Implementation.MATMUL:
        assert w.dense is not None
        return run(dense, *w.dense)
    assert w.taps is not None
    if w.static:
        return run(gather(0, 0), *w.taps)
    assert w.windows is not None
    if w.cls is not None:
        assert w.classes is not None and w.choice is not None
        grids = (w.gy, w.gx, ok)
        return _classes.read(
            features,
            layout,
            batch,
            w.cls,
            w.taps,
            w.classes,
            grids,
            dtype,
            choice=w.choice,
            grad_windows=w.windows,
        )

    def dense_of_grids(f, b, gy, gx, ok):
        # The weights of every row made chunk by chunk of boxes: no [K, P, H]
        # array, nor residual of one, where the taps are read.
        def weights(params):
            gy, gx, ok = params
            wy, wx = _sampling.both_dense(gy, gx)
            return wy * ok, wx

        return _contract.contract_dense_of(f, layout, b, weights, (gy, gx, ok), dtype)

    def whole_map():
        return run(dense_of_grids, w.gy, w.gx, ok)

    branches: list[Callable[[], Array]] = [
        functools.partial(run, gather(ty, tx), *w.taps) for ty, tx in zip(*w.windows, strict=True)
    ]
    branches.append(whole_map)
    return jax.lax.switch(w.choice, branches)
