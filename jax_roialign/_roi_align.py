"""RoI Align: the public function and its core."""

from __future__ import annotations

import dataclasses
import functools

import jax

from . import _dispatch, _sampling, _separable
from ._dispatch import Implementation
from ._recipe import BoxRecipe
from ._validation import Mode, check_bool, prepare, sampling_ratio_int

Array = jax.Array


def roi_align(
    features: Array,
    boxes: Array,
    *,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
    mode: str = "avg",
    box_indices: Array | None = None,
    data_format: str = "NHWC",
    implementation: str | None = None,
    checks: bool = False,
    method: str | None = None,
) -> Array:
    """RoI Align (Mask R-CNN): bilinear samples on a regular grid in each bin, averaged.

    A box ``(x1, y1, x2, y2)`` in image coordinates is mapped onto the feature map
    as ``x * spatial_scale`` (minus 0.5 when ``aligned``) and never rounded. It is
    split into ``output_size`` bins; each bin is sampled on a regular grid of
    ``sampling_ratio`` points per axis (adaptive ``ceil(bin size)`` when
    ``sampling_ratio <= 0``) at sub-cell centres, every sample is read by bilinear
    interpolation of its four neighbours, and the bin's value is the mean of its
    samples. Samples beyond ``[-1, H] x [-1, W]`` read 0 but still count.

    For example, with an 800 x 1344 image and the stride-4 map P2 (200 x 336),
    ``spatial_scale=0.25`` maps the box ``(100, 40, 212, 96)`` to ``(25, 10, 53, 24)``
    on the map (``aligned=True`` then shifts it by -0.5 cell).

    Same numbers as ``torchvision.ops.roi_align(input, boxes, output_size,
    spatial_scale, sampling_ratio, aligned)`` (with NCHW features and ``[K, 5]``
    boxes) and detectron2's ``ROIAlign`` / ``ROIAlignV2`` (``aligned=True``); also
    ONNX ``RoiAlign`` (opset 16, ``half_pixel`` = aligned).

    Args:
      features: ``[N, H, W, C]`` (``data_format="NHWC"``) or ``[N, C, H, W]``
        (``"NCHW"``), floating point (float32, bfloat16, float16; float64 with x64).
      boxes: image coordinates ``(x1, y1, x2, y2)``, in one of three forms:
        ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` as torchvision;
        ``[K, 4]`` with ``box_indices``; or per image ``[N, R, 4]``.
      output_size: ``(PH, PW)`` or an int for a square output.
      spatial_scale: map size over image size (1/stride), e.g. 0.25 for stride 4.
      sampling_ratio: samples per bin per axis; ``<= 0`` for adaptive
        ``ceil(roi_size / output_size)`` per box and per axis (exact for any box size).
      aligned: shift boxes by -0.5 cell (pixel centres at +0.5). When False, RoI
        sizes are clamped to at least 1 cell, as in torchvision.
      mode: ``"avg"`` (the mean of the samples) or ``"max"`` (the largest
        interpolated sample; an empty grid gives 0).
      box_indices: ``[K]`` integer image index of each box, with ``[K, 4]`` boxes.
      data_format: ``"NHWC"`` (default, as Flax) or ``"NCHW"`` (as torchvision).
      implementation: which reader runs; all give the same numbers. ``None``
        (default) chooses by the platform the program is lowered for; or one of
        ``"gather"``, ``"scatter"``, ``"window"``, ``"pallas"``, ``"matmul"``
        (see "Choosing an implementation" in the docs). ``mode="max"`` takes
        ``"gather"`` or ``"window"``. A choice the op cannot run raises ``ValueError``.
      checks: insert ``jax.experimental.checkify`` checks that every box is finite
        and every batch index in range; wrap the call in ``checkify.checkify``.
      method: deprecated alias of ``implementation`` (``"auto"`` is ``None``).

    Returns:
      ``[K, PH, PW, C]`` (NHWC) or ``[K, C, PH, PW]`` (NCHW), ``[N, R, ...]`` for
      per-image boxes, in the features' dtype (computed in float32 or wider).

    Boxes whose coordinates are not finite, or whose batch index is outside
    ``[0, N)``, give zeros (and zero gradients) rather than reading another image;
    an index out of range that is known at trace time is a ``ValueError``.

    Examples:
      On a map whose cell ``(h, w)`` holds ``8 * h + w`` (a linear ramp), each bin's
      average is the ramp's value at the bin's centre. With ``aligned=True`` the box
      ``(1, 1, 5, 5)`` covers ``(0.5, 0.5, 4.5, 4.5)``, so the four 2 x 2 bins are
      centred at rows and columns 1.5 and 3.5:

      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jax_roialign as jr
      >>> features = jnp.arange(64, dtype=jnp.float32).reshape(1, 8, 8, 1)  # [N, H, W, C]
      >>> boxes = jnp.array([[0, 1.0, 1.0, 5.0, 5.0]])  # (batch_index, x1, y1, x2, y2)
      >>> out = jr.roi_align(features, boxes, output_size=2, sampling_ratio=2)
      >>> out.shape
      (1, 2, 2, 1)
      >>> out[0, :, :, 0].tolist()
      [[13.5, 15.5], [29.5, 31.5]]

      ``torchvision.ops.roi_align(x, boxes, 2, 1.0, 2, True)`` with
      ``x = features.transpose(0, 3, 1, 2)`` gives the same numbers. The gradient
      with respect to the box (none flows to the batch index): moving ``x1`` by one
      pixel moves the two bin centres of a row by 3/4 and 1/4 of a cell, adding 1
      per row of bins to the sum (2 rows: 2); along y the ramp rises 8 per cell.

      >>> loss = lambda b: jr.roi_align(features, b, output_size=2, sampling_ratio=2).sum()
      >>> jax.grad(loss)(boxes).tolist()
      [[0.0, 2.0, 16.0, 2.0, 16.0]]
    """
    agg = Mode.parse(mode)
    impl = _dispatch.implementation_arg(implementation, method)
    ratio = sampling_ratio_int(sampling_ratio)
    aligned = check_bool(aligned, "aligned")
    call = prepare(
        features,
        boxes,
        box_indices,
        output_size=output_size,
        spatial_scale=spatial_scale,
        data_format=data_format,
        checks=checks,
    )
    kind = AlignAvg if agg is Mode.AVG else AlignMax
    recipe = kind(**kind.settings(call), sampling_ratio=ratio, aligned=aligned)

    def body():
        rois = call.rois
        args = (rois.coords, rois.batch, rois.ok)
        return _dispatch.call(recipe, impl, call.features, *args, per_image=recipe.per_image)[0]

    return call.output(body)


@dataclasses.dataclass(frozen=True)
class AlignAvg(BoxRecipe):
    """``roi_align(mode="avg")`` on ``(features, coords [K, 4], batch [K], ok [K])``."""

    name = "roi_align"
    sampling_ratio: int = 0
    aligned: bool = True

    def grids(self, coords, ok):
        return _sampling.box_grids(
            coords,
            ok,
            self.pooled,
            self.size,
            spatial_scale=self.spatial_scale,
            sampling_ratio=self.sampling_ratio,
            aligned=self.aligned,
            dtype=self.dtype,
        )

    def forward(self, impl):
        def fn(features, coords, batch, ok):
            gy, gx = self.grids(coords, ok)
            okf = ok.astype(self.dtype)[:, None, None]
            b = self.batch(features, batch)
            out = _separable.average(
                features, self.layout, b, okf, gy, gx, impl, self.dtype, per_image=self.per_image
            )
            return [out]

        return fn


@dataclasses.dataclass(frozen=True)
class AlignMax(AlignAvg):
    """``roi_align(mode="max")``: the search and re-read (``GATHER``) or the
    window reader's blocks (``WINDOW``)."""

    supports = frozenset({Implementation.GATHER, Implementation.WINDOW})
    unsupported_reason = "the max of the samples is read by a search or by windows"

    def forward(self, impl, flat_index: bool = False):
        # The forward alone reads the winners by coordinates (faster); what is
        # differentiated, by flat indices (leaner, a faster transpose).
        from ._max import aggregate_max, window_max

        if impl is Implementation.WINDOW:
            read = window_max
        else:
            read = functools.partial(aggregate_max, flat_index=flat_index)

        def fn(features, coords, batch, ok):
            gy, gx = self.grids(coords, ok)
            okf = ok.astype(self.dtype)[:, None, None]
            b = self.batch(features, batch)
            return [read(features, self.layout, b, okf, gy, gx, self.dtype)]

        return fn

    def reverse(self, impl):
        return self.forward(impl, flat_index=True)

    def differentiable(self, impl):
        return self.forward(Implementation.GATHER, flat_index=True)
