"""Every tuning constant of the readers, named, in one frozen dataclass.

None of these changes a number: they decide how work is cut (windows, chunks,
unrolled loops, blocks), measured on the machines BENCHMARKS.md names. The
readers read :data:`TUNING`; a change here is a change of speed, memory or
compile time only.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The readers' constants.

    Gather reader (per-tap reads, CPU):
      unroll_limit: tap pairs summed in one fused loop; wider windows loop over rows.
      row_chunk: widest run of columns one step of the row-window transpose adds.
      row_unroll: rows of a box one step of that transpose unrolls.
      tap_block: where a step adds one bin's taps and they are more than this,
        it adds them this many at a time, each box only the blocks its bins use.
      out_slice: output columns one segment of that transpose contracts.
      weights_grad_bytes: bytes of reads one step of the weights' gradient holds.
      level_chunk_bytes: bytes of output one step of the level-sorted read
        writes, between ``level_min_boxes`` and ``level_max_boxes`` boxes.
      level_unroll: row adds one step of a level's feature gradient unrolls.
      typical_side: the longest side, in cells, of a box on its own FPN level
        (14-28 cells of sqrt(area), stretched by aspect ratios of 0.5-2): the
        first adaptive window fits it.
      window_saving: a narrower adaptive window is a branch of its own only if
        it reads under this share of the next one's tap pairs.
      fpn_span: the side, in cells, the multi-level read's fast adaptive
        window fits (a box on its level spans 14-28 cells; aspect 4:1 at the top).
      few_channels: up to this many channels, a bilinear crop reads a sample's
        2 x 2 cells with one gather.
      dense_chunk: boxes one step of a dense read (or of its gradient) contracts.

    Window reader (box-local windows, TPU):
      base_window: the smallest window side; each further tier doubles it.
      tiers: window tiers at most; a box larger than the last reads tiles of it.
      pallas_window: the window side of the Pallas kernels.
      pallas_max_rows: the largest output side the Pallas kernels take.
      pallas_max_strip: the largest whole-row strip (bytes) a kernel keeps in VMEM.

    Ops:
      max_tile: samples per axis scanned per step of max mode's adaptive search.
      cost_chunk: boxes sorted by cost that one step of a loop over them takes
        at most (max mode's adaptive search, rotated adaptive reads): the step
        runs as long as its costliest box needs.
      pool_block: cells per box axis one block of RoI Pool's window read covers.
      pool_smallest_window: the first window of RoI Pool's gather search.
      rotated_unroll: fixed rotated grids of at most this many samples per bin
        are unrolled; larger ones scanned.
      rotated_first_tier: the shortest scan of adaptive rotated grids, in
        samples per bin; later tiers are 4x longer.
      rotated_block: samples per bin and axis in one block of the rotated
        window read.
    """

    unroll_limit: int = 36
    row_chunk: int = 32
    row_unroll: int = 32
    tap_block: int = 4
    out_slice: int = 32
    weights_grad_bytes: int = 4 << 20
    level_chunk_bytes: int = 2 << 20
    level_min_boxes: int = 8
    level_max_boxes: int = 64
    level_unroll: int = 16
    typical_side: int = 40
    window_saving: float = 0.5
    fpn_span: int = 56
    few_channels: int = 8
    dense_chunk: int = 4
    base_window: int = 16
    tiers: int = 2
    pallas_window: int = 16
    pallas_max_rows: int = 32
    pallas_max_strip: int = 4 << 20
    max_tile: int = 2
    cost_chunk: int = 16
    pool_block: int = 56
    pool_smallest_window: int = 5
    rotated_unroll: int = 4
    rotated_first_tier: int = 16
    rotated_block: int = 2

    def half_map_window(self, length: int, pooled: int) -> int:
        """Rows per bin of the gather reader's adaptive window for a box of up to
        about half the map (a bin of ``s`` cells touches at most ``ceil(s) + 1`` rows)."""
        return min(length, max(4, math.ceil(length / (2 * pooled)) + 2))

    def adaptive_windows(self, length: int, pooled: int) -> tuple[int, ...]:
        """The gather reader's adaptive windows, ascending: one for a box of
        ``typical_side`` cells, one for half the map, one for any box inside the
        map (a bin of at most ``(L + 1) / P`` cells). Sizes repeat where one
        covers the next."""
        whole = min(length, math.ceil((length + 1) / pooled) + 1)
        typical = min(whole, math.ceil(self.typical_side / pooled) + 1)
        half = min(whole, max(typical, self.half_map_window(length, pooled)))
        return (typical, half, whole)

    def window_tiers(
        self, length_y: int, length_x: int, pooled: tuple[int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(rows, cols)``: :meth:`adaptive_windows` of both axes, ascending, a
        tier kept only where it reads under ``window_saving`` of the next kept
        tier's tap pairs."""
        wy = self.adaptive_windows(length_y, pooled[0])
        wx = self.adaptive_windows(length_x, pooled[1])
        return self._kept(list(zip(wy, wx, strict=True)))

    def class_tiers(
        self, length_y: int, length_x: int, pooled: tuple[int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(rows, cols)``: the windows boxes are sorted into when each box reads
        through its own (:mod:`jax_roialign._classes`): squares of 2 rows up to the
        typical window, then :meth:`adaptive_windows` of both axes; ascending on
        both axes, a tier kept only where it reads under ``window_saving`` of the
        next kept tier's tap pairs."""
        wy = self.adaptive_windows(length_y, pooled[0])
        wx = self.adaptive_windows(length_x, pooled[1])
        squares = [(t, t) for t in range(2, min(wy[0], wx[0]))]
        return self._kept(squares + list(zip(wy, wx, strict=True)))

    def _kept(self, tiers: list[tuple[int, int]]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        kept = [tiers[-1]]
        for ty, tx in reversed(tiers[:-1]):
            ny, nx = kept[0]
            if ty * tx < self.window_saving * ny * nx:
                kept.insert(0, (ty, tx))
        return tuple(t[0] for t in kept), tuple(t[1] for t in kept)

    def level_window(self, length: int, pooled: int) -> int:
        """Rows per bin of the multi-level read's fast adaptive window (a side of
        ``fpn_span`` cells)."""
        return min(length, math.ceil(self.fpn_span / pooled) + 3)

    def level_classes(
        self, length_y: int, length_x: int, pooled: tuple[int, int]
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(rows, cols)``: the windows the multi-level read sorts its boxes into
        (each box through the smallest it fits): squares of 2 rows up to the fast
        window (:meth:`level_window` of both axes), then that window; a tier kept
        only where it reads under ``window_saving`` of the next kept tier's tap
        pairs."""
        ty = self.level_window(length_y, pooled[0])
        tx = self.level_window(length_x, pooled[1])
        squares = [(t, t) for t in range(2, min(ty, tx))]
        return self._kept(squares + [(ty, tx)])


#: The constants in use.
TUNING = Tuning()
