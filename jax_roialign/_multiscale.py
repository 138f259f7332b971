"""Multi-scale RoI Align: each box pooled from the FPN level its size picks.

Every box gets its own level's scale and map extent and the shared per-axis
sampling code builds its taps. On CPU (``gather``) the boxes are sorted by
level and read in chunks, each from its own level's map
(:func:`._contract.contract_levels`): the levels are never concatenated, and
the cost is that of pooling every box from one map, whatever the number of
levels. The other tap reads (``scatter``: autodiff's gradient) read one flat
concatenation of the levels, ``flat[b, offset_l + row * W_l + col]``; the
window reader reads each box's window of its own level.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _classes, _contract, _dispatch, _sampling
from ._dispatch import Implementation
from ._separable import window_read
from ._tuning import TUNING
from ._validation import (
    DataFormat,
    Rois,
    check_bool,
    compute_dtype,
    features_nhwc_shape,
    fence,
    finish_output,
    output_size_pair,
    parse_boxes,
    positive_scale,
    sampling_ratio_int,
)

Array = jax.Array


class LevelMapper(enum.Enum):
    TORCHVISION = "torchvision"
    DETECTRON2 = "detectron2"

    @classmethod
    def parse(cls, value: Any) -> LevelMapper:
        if isinstance(value, LevelMapper):
            return value
        if isinstance(value, str):
            for member in cls:
                if value.lower() == member.value:
                    return member
        raise ValueError(f"level_mapper must be 'torchvision' or 'detectron2', got {value!r}")


def multiscale_roi_align(
    features: Sequence[Array],
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scales: Sequence[float],
    sampling_ratio: int = 0,
    aligned: bool = True,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    level_mapper: str = "torchvision",
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
    method: str | None = None,
) -> Array:
    """Multi-scale RoI Align (FPN): each box is pooled from the level its size selects.

    A box of area ``A`` (image pixels) goes to level
    ``k = floor(canonical_level + log2(sqrt(A) / canonical_scale) + 1e-6)``
    (``level_mapper="torchvision"``) or
    ``k = floor(canonical_level + log2(sqrt(A) / canonical_scale + 1e-8))``
    (``"detectron2"``), clamped to ``[k_min, k_max]``, where the maps have
    strides ``2**k_min, ..., 2**k_max``; it is then RoI-Aligned from that map with
    spatial scale ``2**-k`` (see :func:`jax_roialign.roi_align`). The level is
    computed in the boxes' dtype (at least float32) from ``A = (x2 - x1) * (y2 - y1)``
    as the references do; a box of negative area (one side reversed) has no
    level there (``sqrt`` is NaN) and gives zeros here too.

    Each box is read from its own level only (on CPU the boxes are sorted by level
    and read in chunks, with no copy of the pyramid), so the cost is about that
    of one RoI Align over all the boxes, not one per level. Shapes
    are static; under adaptive sampling each box is read through the smallest of a
    few windows that its bins fit (up to about 56 cells a side on its level), and a
    box needing more (a long thin box, a huge box clamped to the coarsest level)
    with dense weights over its level: a call costs what its boxes cost. (With
    ``implementation="scatter"`` a call holding such a box reads every box densely.)

    For example, with an 800 x 1344 image and the maps P2-P5 (strides 4 to 32),
    ``spatial_scales=(1/4, 1/8, 1/16, 1/32)``; the box ``(100, 40, 212, 96)``
    (``sqrt(A) = 79.2`` pixels) goes to level ``floor(4 + log2(79.2 / 224)) = 2``
    and is pooled from P2 at scale 0.25, spanning ``(25, 10, 53, 24)`` on it.

    Same numbers as ``torchvision.ops.MultiScaleRoIAlign(names, output_size,
    sampling_ratio)`` (with ``aligned=False``; NCHW maps) and detectron2's
    ``ROIPooler(output_size, scales, sampling_ratio, "ROIAlignV2")``
    (``aligned=True``, ``level_mapper="detectron2"``).

    Args:
      features: a sequence of ``L`` maps, finest first, each ``[N, H_l, W_l, C]``
        (``data_format="NHWC"``) or ``[N, C, H_l, W_l]`` (``"NCHW"``), with the
        same ``N`` and ``C``.
      boxes: image coordinates ``(x1, y1, x2, y2)``, as ``[K, 5]`` rows
        ``(batch_index, x1, y1, x2, y2)``, ``[K, 4]`` with ``box_indices``, or per
        image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scales: one scale per map, powers of two halving from one map to
        the next, e.g. ``(1/4, 1/8, 1/16, 1/32)`` for P2-P5; they give
        ``k_min = -log2(spatial_scales[0])`` and ``k_max = -log2(spatial_scales[-1])``.
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive
        ``ceil(roi_size / output_size)`` (exact for any box size).
      aligned: shift boxes by -0.5 cell (detectron2's ROIAlignV2). torchvision's
        ``MultiScaleRoIAlign`` uses ``aligned=False``.
      canonical_scale: the box size (sqrt of the area, pixels) that maps to
        ``canonical_level``; 224 in the FPN paper.
      canonical_level: the level of a box of size ``canonical_scale``; 4.
      level_mapper: ``"torchvision"`` or ``"detectron2"`` (the formulas above).
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default) or ``"NCHW"``.
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by platform; or ``"gather"``, ``"scatter"``,
        ``"window"``, ``"pallas"``, ``"matmul"`` (as :func:`jax_roialign.roi_align`).
      method: deprecated alias of ``implementation`` (``"auto"`` is ``None``).

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the maps' dtype (computed in float32 or wider).

    Examples:
      Two levels of a 128 x 128 image, P2 (stride 4) filled with 1 and P3
      (stride 8) with 2. A box 56 pixels a side has level
      ``floor(4 + log2(56 / 224)) = 2``, one of 112 pixels level 3:

      >>> import jax.numpy as jnp
      >>> import numpy as np
      >>> import jax_roialign as jr
      >>> p2 = jnp.ones((1, 32, 32, 1), jnp.float32)
      >>> p3 = jnp.full((1, 16, 16, 1), 2.0, jnp.float32)
      >>> boxes = jnp.array([[0, 4.0, 4.0, 60.0, 60.0], [0, 8.0, 8.0, 120.0, 120.0]])
      >>> out = jr.multiscale_roi_align(
      ...     [p2, p3], boxes, output_size=2, spatial_scales=(1 / 4, 1 / 8)
      ... )
      >>> out.shape
      (2, 2, 2, 1)
      >>> np.round(out[:, 0, 0, 0], 4).tolist()  # the level each box was read from
      [1.0, 2.0]
    """
    layout = DataFormat.parse(data_format)
    impl = _dispatch.implementation_arg(implementation, method)
    mapper = LevelMapper.parse(level_mapper)
    ph, pw = output_size_pair(output_size)
    ratio = sampling_ratio_int(sampling_ratio)
    aligned = check_bool(aligned, "aligned")
    maps, shapes = _check_maps(features, layout)
    k_min, scales = _check_scales(spatial_scales, len(maps))
    canonical_scale = positive_scale(canonical_scale, "canonical_scale")
    if isinstance(canonical_level, bool) or not isinstance(canonical_level, numbers.Integral):
        raise TypeError(f"canonical_level must be an int, got {canonical_level!r}")
    n, c = shapes[0][0], shapes[0][3]
    rois = parse_boxes(boxes, box_indices, n)
    dtype = compute_dtype(jnp.result_type(*maps), boxes)
    out_dtype = jnp.result_type(*maps)
    recipe = MultiScale(
        layout=layout,
        sizes=tuple((h, w) for (_, h, w, _) in shapes),
        scales=tuple(scales),
        k_min=k_min,
        pooled=(ph, pw),
        sampling_ratio=ratio,
        aligned=aligned,
        canonical_scale=canonical_scale,
        canonical_level=int(canonical_level),
        mapper=mapper,
        dtype=np.dtype(dtype),
        per_image=len(rois.lead_shape) == 2,
    )
    if rois.coords.shape[0] == 0:
        out = jnp.zeros((0, ph, pw, c), dtype)
    else:
        args = (rois.coords, rois.batch, rois.ok)
        out = _dispatch.call(recipe, impl, maps, *args, per_image=recipe.per_image)[0]
    return finish_output(out, rois, layout, out_dtype, fenced=False)


# The reader of each implementation: taps (window switch, dense fallback), dense
# only, windows.
_PATHS = {
    Implementation.GATHER: "auto",
    Implementation.SCATTER: "auto",
    Implementation.MATMUL: "exact",
    Implementation.WINDOW: "window",
    Implementation.PALLAS: "pallas",
}


@dataclasses.dataclass(frozen=True)
class MultiScale(_dispatch.Recipe):
    """``multiscale_roi_align`` on ``(*maps, coords [K, 4], batch [K], ok [K])``."""

    name = "multiscale_roi_align"
    layout: DataFormat
    sizes: tuple[tuple[int, int], ...]
    scales: tuple[float, ...]
    k_min: int
    pooled: tuple[int, int]
    sampling_ratio: int
    aligned: bool
    canonical_scale: float
    canonical_level: int
    mapper: LevelMapper
    dtype: Any
    per_image: bool

    def out_avals(self, *args):
        maps, coords = args[: len(self.sizes)], args[len(self.sizes)]
        c = maps[0].shape[3 if self.layout is DataFormat.NHWC else 1]
        return [jax.core.ShapedArray((coords.shape[0], *self.pooled, c), self.dtype)]

    def forward(self, impl):
        def fn(*args):
            maps, (coords, batch, ok) = list(args[: len(self.sizes)]), args[len(self.sizes) :]
            level, has_level = fpn_levels(
                coords,
                k_min=self.k_min,
                k_max=self.k_min + len(self.sizes) - 1,
                canonical_scale=self.canonical_scale,
                canonical_level=self.canonical_level,
                level_mapper=self.mapper,
            )
            n, k = maps[0].shape[0], coords.shape[0]
            lead = (n, k // n) if self.per_image else (k,)
            out = _pool(
                maps,
                self.layout,
                Rois(coords, batch, ok, lead, batch),
                level,
                has_level,
                list(self.sizes),
                list(self.scales),
                self.pooled,
                sampling_ratio=self.sampling_ratio,
                aligned=self.aligned,
                dtype=self.dtype,
                path=_PATHS[impl],
                row_vjp=impl is Implementation.GATHER,
            )
            # The CPU's level-sorted read fences its own vectorized reads; a
            # loop's output needs no fence (one would be a copy inside a loss).
            return [out if impl is Implementation.GATHER else fence(out)]

        return fn


def _check_maps(features: Any, layout: DataFormat) -> tuple[list[Array], list[tuple]]:
    if not isinstance(features, Sequence) or isinstance(features, str):
        raise TypeError(
            "features must be a sequence (list or tuple) of feature maps, finest first; "
            f"got {type(features).__name__}"
        )
    if len(features) == 0:
        raise ValueError("features must hold at least one feature map, got an empty sequence")
    maps = [jnp.asarray(f) for f in features]
    shapes = [features_nhwc_shape(f, layout, name=f"features[{i}]") for i, f in enumerate(maps)]
    n0, _, _, c0 = shapes[0]
    for i, (n, _, _, c) in enumerate(shapes):
        if n != n0 or c != c0:
            raise ValueError(
                "every feature map must have the same batch size and channels as features[0] "
                f"(N={n0}, C={c0}); features[{i}] has N={n}, C={c} "
                f"(shape {tuple(jnp.shape(maps[i]))}, data_format={layout.value!r})"
            )
    return maps, shapes


def _check_scales(spatial_scales: Any, num_maps: int) -> tuple[int, list[float]]:
    """Returns ``k_min`` and the scales, checked to be ``2**-k_min, 2**-(k_min+1), ...``."""
    if isinstance(spatial_scales, numbers.Real) or not isinstance(spatial_scales, Sequence):
        raise TypeError(
            "spatial_scales must be a sequence of one scale per feature map, "
            f"got {spatial_scales!r}"
        )
    if len(spatial_scales) != num_maps:
        raise ValueError(
            f"spatial_scales must have one scale per feature map: got {len(spatial_scales)} "
            f"scales {tuple(spatial_scales)!r} for {num_maps} maps"
        )
    scales = [positive_scale(s, f"spatial_scales[{i}]") for i, s in enumerate(spatial_scales)]
    levels = []
    for i, s in enumerate(scales):
        mantissa, exponent = math.frexp(s)
        if mantissa != 0.5:
            raise ValueError(
                "spatial_scales must be powers of two (1 / stride), "
                f"got spatial_scales[{i}] = {s!r}"
            )
        levels.append(1 - exponent)
    if levels != list(range(levels[0], levels[0] + num_maps)):
        raise ValueError(
            "spatial_scales must halve from one map to the next, finest first "
            f"(a pyramid like (1/4, 1/8, 1/16, 1/32)); got {tuple(spatial_scales)!r}"
        )
    return levels[0], scales


def _log2(x: Array) -> Array:
    """log2 exact at powers of two (``jnp.log2`` is not, which would move level boundaries)."""
    m, e = jnp.frexp(x)
    small = m < math.sqrt(0.5)
    m = jnp.where(small, m * 2.0, m)
    e = jnp.where(small, e - 1, e)
    return e.astype(x.dtype) + jnp.log1p(m - 1.0) * jnp.asarray(1.0 / math.log(2.0), x.dtype)


def fpn_levels(
    coords: Array,
    *,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    level_mapper: LevelMapper = LevelMapper.TORCHVISION,
) -> tuple[Array, Array]:
    """Level index ``k - k_min`` ``[K]`` int32 of boxes ``[K, 4]``, and whether it exists.

    Computed in the boxes' dtype (at least float32) with the references'
    operation order. A negative area (NaN size) has no level.
    """
    dtype = jnp.result_type(coords.dtype, jnp.float32)
    c = jax.lax.stop_gradient(coords).astype(dtype)
    area = (c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1])
    size = jnp.sqrt(area)
    if level_mapper is LevelMapper.TORCHVISION:
        raw = jnp.floor(canonical_level + _log2(size / canonical_scale) + 1e-6)
    else:
        raw = jnp.floor(canonical_level + _log2(size / canonical_scale + 1e-8))
    has_level = ~jnp.isnan(raw)
    k = jnp.clip(jnp.where(has_level, raw, k_min), k_min, k_max)
    return (k - k_min).astype(jnp.int32), has_level


def _pool(
    maps: list[Array],
    layout: DataFormat,
    rois: Rois,
    level: Array,
    has_level: Array,
    sizes: list[tuple[int, int]],
    scales: list[float],
    pooled: tuple[int, int],
    *,
    sampling_ratio: int,
    aligned: bool,
    dtype: Any,
    path: str = "auto",
    row_vjp: bool = True,
) -> Array:
    """``[K, PH, PW, C]`` for boxes already assigned to levels.

    ``path``: ``"fast"`` (windowed taps only; exact for boxes that fit),
    ``"exact"`` (dense per-level weights), ``"auto"`` (with ``row_vjp`` and
    adaptive sampling each box through its own window class, the boxes past the
    last densely; otherwise the first when every box fits, else the second),
    ``"window"`` (box-local windows of each box's level)
    or ``"pallas"`` (those windows read by the Pallas kernels). ``row_vjp``: the
    taps' feature gradient by :func:`_contract.contract_rows` rather than
    autodiff's scatter-add.
    """
    hs = np.array([h for h, _ in sizes])
    ws = np.array([w for _, w in sizes])
    ok = rois.ok & has_level
    scale = _sampling.by_level(scales, level, dtype)
    ext_h = _sampling.by_level(hs, level, jnp.int32)
    ext_w = _sampling.by_level(ws, level, jnp.int32)
    coords = jnp.where(ok[:, None], rois.coords.astype(dtype), 0.0)
    x1, y1, x2, y2 = (coords[:, i] for i in range(4))
    common: dict[str, Any] = dict(
        spatial_scale=scale,
        offset=0.5 if aligned else 0.0,
        min_size=None if aligned else 1.0,
        sampling_ratio=sampling_ratio,
    )
    gy = _sampling.axis_grid(y1, y2, pooled=pooled[0], length=int(hs.max()), extent=ext_h, **common)
    gx = _sampling.axis_grid(x1, x2, pooled=pooled[1], length=int(ws.max()), extent=ext_w, **common)
    okf = ok.astype(dtype)[:, None, None]
    per_image = len(rois.lead_shape) == 2
    if path in ("window", "pallas"):
        return window_read(
            list(maps),
            layout,
            rois.batch,
            level,
            ok,
            gy,
            gx,
            okf,
            dtype,
            per_image=per_image,
            pallas=path == "pallas",
        )

    ty = TUNING.level_window(gy.length, pooled[0])
    tx = TUNING.level_window(gx.length, pooled[1])
    widths = [int(w) for w in ws]
    adaptive = gy.static_count is None or gx.static_count is None

    def fast(m, b, gy, gx, ok, lv):
        (iy, wy), (ix, wx) = _sampling.both_taps(gy, gx, (ty, tx))
        flats = [_contract.flat_view(x, layout)[0] for x in m]
        if row_vjp:  # each box read from its own level: no concatenation
            classes = dense = None
            if adaptive:  # each box through the smallest window it fits
                ladder = TUNING.level_classes(gy.length, gx.length, pooled)
                live = ok[:, :, 0] > 0
                cls = jnp.maximum(
                    _sampling.window_class(gy, ladder[0], live),
                    _sampling.window_class(gx, ladder[1], live),
                )
                n_cls = len(ladder[0])
                classes = (jnp.minimum(cls, n_cls - 1), ladder)
                if path == "auto":  # past the last window: dense weights, box by box
                    dense = (cls >= n_cls, (gy, gx, ok), _classes.dense_weights)
            return _contract.contract_levels(
                flats,
                widths,
                layout,
                b,
                lv,
                iy,
                wy * ok,
                ix,
                wx,
                dtype,
                classes=classes,
                dense=dense,
            )
        flat, off, row_len = _contract.concat_levels(flats, widths, layout, lv)
        return _contract.contract_rows(
            flat,
            layout,
            b,
            off,
            row_len,
            iy,
            wy * ok,
            ix,
            wx,
            dtype,
            min_row_length=min(widths),
            row_vjp=False,
        )

    def exact(m, b, gy, gx, ok, lv):
        # Dense weights over the largest level once (zero beyond each box's own
        # extent), cut to each level's size; each level contracts only its boxes.
        wy_all, wx_all = _sampling.both_dense(gy, gx)
        wy_all = wy_all * ok
        out = None
        for i, (h, w) in enumerate(sizes):
            on = (lv == i).astype(dtype)[:, None, None]
            part = _contract.contract_dense(
                m[i], layout, b, wy_all[..., :h] * on, wx_all[..., :w], dtype
            )
            out = part if out is None else out + part
        return out

    def run(fn, folded: bool = False):
        args = (gy, gx, okf, level)
        if not per_image:
            return fn(maps, rois.batch, *args)
        n = maps[0].shape[0]
        if folded:
            # The level-sorted read folds a vmap over the images into one call on
            # all of them anyway: make that call (each box's image among these
            # maps, the device's own under by_image), not the vmap, whose
            # unbatched trace would be thrown away.
            images = jnp.repeat(jnp.arange(n, dtype=jnp.int32), level.shape[0] // n)
            return fn(maps, images, *args)
        grouped = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), args)
        local = jnp.zeros((grouped[2].shape[1],), jnp.int32)
        out = jax.vmap(lambda m, *a: fn(m, local, *a))([x[:, None] for x in maps], *grouped)
        return out.reshape((-1,) + out.shape[2:])

    def run_fast():
        return run(fast, folded=row_vjp)

    if path == "fast":
        return run_fast()
    if path == "exact":
        return run(exact)

    if row_vjp or all(g.static_count is not None or t >= g.length for g, t in ((gy, ty), (gx, tx))):
        return run_fast()  # adaptive: boxes past the windows read densely in it
    live = ok[:, None]
    index = jnp.maximum(
        _sampling.window_choice(gy, (ty,), live), _sampling.window_choice(gx, (tx,), live)
    )
    return jax.lax.switch(index, [run_fast, lambda: run(exact)])
