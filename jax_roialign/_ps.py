"""Position-sensitive RoI Align (R-FCN with RoI Align sampling), torchvision's numbers.

The sampling is RoI Align's (``aligned=True`` geometry, no min-size clamp), built
by the same :func:`box_grids` and per-axis taps; only the read differs: bin
``(ph, pw)`` reads its own channel group ``c_in = (c_out * PH + ph) * PW + pw``, so
each tap gathers ``C_out`` values per bin, and the cost is that of one output,
not ``PH * PW`` of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from . import _dispatch, _sampling
from ._contract import _HIGHEST, contract_taps_with
from ._dispatch import Implementation
from ._recipe import BoxRecipe
from ._separable import window_read
from ._tuning import TUNING
from ._validation import DataFormat, prepare, sampling_ratio_int

Array = jax.Array


def ps_roi_align(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
    checks: bool = False,
) -> Array:
    """Position-sensitive RoI Align: RoI Align where each bin reads its own channel group.

    The input has ``C = C_out * PH * PW`` channels; output channel ``c_out`` of bin
    ``(ph, pw)`` is RoI Align's bin average over input channel
    ``(c_out * PH + ph) * PW + pw``. Boxes are mapped as ``x * spatial_scale - 0.5``
    (always half-pixel, no min-size clamp); each bin is averaged over a regular
    grid of ``sampling_ratio`` bilinear samples per axis (adaptive
    ``ceil(roi_size / output_size)`` when ``sampling_ratio <= 0``), samples beyond
    ``[-1, H] x [-1, W]`` reading 0 but counting.

    For example, with the stride-16 map of a 600 x 1000 image and a 3 x 3 output
    over ``C = 21 * 9`` channels, ``spatial_scale=0.0625`` maps the box
    ``(100, 40, 212, 96)`` to ``(5.75, 2.0, 12.75, 5.5)`` on the map; its top-left
    bin averages channels ``0, 9, 18, ...`` and its centre bin channels ``4, 13, ...``.

    Same numbers as ``torchvision.ops.ps_roi_align(input, boxes, output_size,
    spatial_scale, sampling_ratio)`` (NCHW features, ``[K, 5]`` boxes), except
    that a box whose adaptive grid is empty (zero or negative size) gives 0
    where torchvision computes ``0 / 0 = NaN``. On TPU every channel of each bin
    is read box-locally (the window reader, no gather) and each bin keeps its own
    group; per-image boxes on batch-sharded features pool per device.

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point, ``C`` a multiple of ``PH * PW``.
      boxes: image coordinates ``(x1, y1, x2, y2)``: ``[K, 5]`` rows
        ``(batch_index, x1, y1, x2, y2)``, ``[K, 4]`` with ``box_indices``, or
        per image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.0625 for stride 16.
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive (exact for
        any box size).
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default) or ``"NCHW"`` (as torchvision).
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by platform; or ``"scatter"``, ``"window"``,
        ``"matmul"`` (others raise ``ValueError``).
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.

    Returns:
      ``[K, PH, PW, C_out]`` (NHWC) or ``[K, C_out, PH, PW]`` (NCHW),
      ``[N, R, ...]`` for per-image boxes, in the features' dtype.

    Boxes with a non-finite coordinate or a batch index outside ``[0, N)`` give
    zeros (and zero gradients).

    Examples:
      A 2 x 2 output with ``C_out = 1`` reads ``C = 4`` channels, bin ``(ph, pw)``
      channel ``2 * ph + pw``. With channel ``c`` filled with the value ``c``, each
      bin shows which channel it read:

      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.broadcast_to(jnp.arange(4, dtype=jnp.float32), (1, 8, 8, 4))
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])
      >>> out = jr.ps_roi_align(features, boxes, output_size=2)
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[0.0, 1.0], [2.0, 3.0]]
    """
    impl = _dispatch.parse_implementation(implementation)
    ratio = sampling_ratio_int(sampling_ratio)
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    (ph, pw), c = call.pooled, call.channels
    if c % (ph * pw):
        raise ValueError(
            f"ps_roi_align needs features with a multiple of PH * PW = {ph} * {pw} = "
            f"{ph * pw} channels, got {c} (features shape {jnp.shape(features)}, "
            f"data_format={call.layout.value!r})"
        )
    recipe = PsAlign(**PsAlign.settings(call), sampling_ratio=ratio)

    def body():
        args = (call.rois.coords, call.rois.batch, call.rois.ok)
        return _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]

    return call.output(body, channels=c // (ph * pw))


def group_view(features: Array, layout: DataFormat, pooled: tuple[int, int]) -> Array:
    """The map with its channels split as ``(C_out, PH, PW)``: a free reshape.

    ``[N, H, W, C_out, PH, PW]`` for NHWC, ``[N, C_out, PH, PW, H, W]`` for NCHW.
    """
    ph, pw = pooled
    if layout is DataFormat.NHWC:
        n, h, w, c = features.shape
        return features.reshape(n, h, w, c // (ph * pw), ph, pw)
    n, c, h, w = features.shape
    return features.reshape(n, c // (ph * pw), ph, pw, h, w)


def group_reader(features: Array, layout: DataFormat, batch: Array, pooled: tuple[int, int]):
    """``reader(rows, cols) -> [K, PH, PW, C_out]`` for :func:`contract_taps_with`: bin
    ``(ph, pw)`` reads only the channels ``(c_out * PH + ph) * PW + pw``."""
    g = group_view(features, layout, pooled)
    b = batch[:, None, None]
    p = jnp.arange(pooled[0], dtype=jnp.int32)[None, :, None]
    q = jnp.arange(pooled[1], dtype=jnp.int32)[None, None, :]

    def reader(rows: Array, cols: Array) -> Array:
        # Advanced indices around a slice: the broadcast [K, PH, PW] goes first.
        if layout is DataFormat.NHWC:
            return g[b, rows, cols, :, p, q]
        return g[b, :, p, q, rows, cols]

    return reader


def contract_dense_grouped(
    features: Array,
    layout: DataFormat,
    batch: Array,
    wy: Array,
    wx: Array,
    dtype: Any,
    chunk: int = 16,
) -> Array:
    """:func:`_contract.contract_dense` with a channel group per bin.

    ``out[k, p, q, c] = sum_hw wy[k, p, h] wx[k, q, w] F[batch[k], h, w, (c * PH + p) * PW + q]``
    with ``wy [K, PH, H]``, ``wx [K, PW, W]``: two matmuls per box, the image picked
    by a one-hot weight (no gather), boxes in chunks.
    """
    pooled = (wy.shape[1], wx.shape[1])
    g = group_view(features, layout, pooled).astype(dtype)
    n = g.shape[0]
    eq = "kpnh,nhwcpq->kpwcq" if layout is DataFormat.NHWC else "kpnh,ncpqhw->kpwcq"

    def one(args):
        wy_c, wx_c, b_c = args
        onehot = (b_c[:, None] == jnp.arange(n)).astype(dtype)
        wyn = wy_c[:, :, None, :] * onehot[:, None, :, None]
        z = jnp.einsum(eq, wyn, g, precision=_HIGHEST)
        return jnp.einsum("kpwcq,kqw->kpqc", z, wx_c, precision=_HIGHEST)

    k = wy.shape[0]
    if k <= chunk:
        return one((wy, wx, batch))
    pad = -k % chunk
    parts = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (wy, wx, batch)]
    parts = [x.reshape((-1, chunk) + x.shape[1:]) for x in parts]
    out = jax.lax.map(one, tuple(parts))
    return out.reshape((-1,) + out.shape[2:])[:k]


@dataclasses.dataclass(frozen=True)
class PsAlign(BoxRecipe):
    """``ps_roi_align`` on ``(features, coords [K, 4], batch [K], ok [K])``: taps
    through the channel-group reader (``SCATTER``: autodiff's gradient; an adaptive
    call whose bins outgrow the window reads dense weights), dense weights
    (``MATMUL``), or every channel through the window reader, each bin's own group
    kept (``WINDOW``)."""

    name = "ps_roi_align"
    supports = frozenset({Implementation.SCATTER, Implementation.WINDOW, Implementation.MATMUL})
    fallback = Implementation.SCATTER
    unsupported_reason = "its bins read separate channel groups"
    sampling_ratio: int = 0

    def out_channels(self, features):
        return self.channels(features) // (self.pooled[0] * self.pooled[1])

    def forward(self, impl):
        def fn(features, coords, batch, ok):
            # torchvision's ps_roi_align geometry is roi_align's with aligned=True.
            gy, gx = _sampling.box_grids(
                coords,
                ok,
                self.pooled,
                self.size,
                spatial_scale=self.spatial_scale,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
                dtype=self.dtype,
            )
            okf = ok.astype(self.dtype)[:, None, None]
            b = self.batch(features, batch)
            if impl is Implementation.WINDOW:
                return [_windowed(features, self.layout, b, okf, gy, gx, self.dtype)]
            return [self._taps(features, b, okf, gy, gx, impl)]

        return fn

    def _taps(self, features, batch, ok, gy, gx, impl):
        layout, pooled, dtype = self.layout, self.pooled, self.dtype
        ty = TUNING.half_map_window(gy.length, pooled[0])
        tx = TUNING.half_map_window(gx.length, pooled[1])
        reader = group_reader(features, layout, batch, pooled)

        def fast():
            (iy, wy), (ix, wx) = _sampling.both_taps(gy, gx, (ty, tx))
            return contract_taps_with(reader, iy, wy * ok, ix, wx, dtype)

        def dense():
            wy, wx = _sampling.both_dense(gy, gx)
            return contract_dense_grouped(features, layout, batch, wy * ok, wx, dtype)

        if impl is Implementation.MATMUL:
            return dense()
        if self.sampling_ratio > 0:
            return fast()
        live = ok[..., 0] > 0
        index = jnp.maximum(
            _sampling.window_choice(gy, (ty,), live), _sampling.window_choice(gx, (tx,), live)
        )
        return jax.lax.switch(index, [fast, dense])


def _windowed(features, layout, batch, ok, gy, gx, dtype) -> Array:
    """The box-local, gather-free read (TPU): every channel of a box read through
    the window reader (roi_align's avg), each bin's own channel group kept as the
    box is written (``ps=True``: nothing ``[K, PH, PW, C]`` is stored; the
    multiply-adds are RoI Align's over all channels)."""
    live = ok[:, 0, 0] > 0
    gy, gx = _sampling.with_geometry(gy, gx)
    level = jnp.zeros_like(batch)
    return window_read(
        [features],
        layout,
        batch,
        level,
        live,
        gy,
        gx,
        ok,
        dtype,
        per_image=False,
        ps=True,
    )
