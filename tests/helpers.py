"""What several test modules share: boxes of every kind, the checks of a
program compiled for a TPU (its collectives, gathers and copies), and the
sampling of large parameter grids for the fast stage."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest

#: The instructions counted in a compiled program (tuples and async starts too).
OPS = (
    "gather",
    "scatter",
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "collective-permute",
    "all-to-all",
)


def sampled(*axes, fast: int, seed: int = 0, slow: int | None = None) -> list:
    """The full product of ``axes`` as pytest parameters, of which a fixed random
    sample of ``fast`` runs in the fast stage; the rest carry the ``slow`` marker
    (CI's second stage runs them), as JAX's own tests sample their grids. With
    ``slow``, only a fixed random sample of that many of the rest is kept."""
    combos = list(itertools.product(*axes))
    rng = np.random.default_rng(seed)
    keep = set(rng.choice(len(combos), size=min(fast, len(combos)), replace=False).tolist())
    rest = [i for i in range(len(combos)) if i not in keep]
    if slow is not None and slow < len(rest):
        rest = rng.choice(rest, size=slow, replace=False).tolist()
    return [
        pytest.param(*c, marks=() if i in keep else pytest.mark.slow)
        for i, c in enumerate(combos)
        if i in keep or i in rest
    ]


def slow_except(values, fast) -> list:
    """``values`` as pytest parameters, those not in ``fast`` marked ``slow``."""
    return [v if v in fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


def window_boxes(rng, k: int, h: float, w: float) -> np.ndarray:
    """``k`` boxes ``[K, 4]`` of every kind for a map ``h x w`` (image coordinates):
    inside, across the border, tiny, degenerate, huge, far outside, and spans of
    several window tiles."""
    xy = rng.uniform(-0.3 * w, 1.1 * w, (k, 2))
    wh = rng.uniform(-2.0, 0.9 * max(h, w), (k, 2))
    boxes = np.concatenate([xy, xy + wh], 1)
    boxes[0] = [-5.0 * w, -4.0 * h, 6.0 * w, 5.0 * h]  # a thousand cells, tiled tier
    boxes[1] = [2.0, 3.0, 2.0, 3.0]  # zero size
    boxes[2] = [3.3, 1.1, 4.0, 1.9]  # under one cell
    boxes[3] = [2 * w, 2 * h, 3 * w, 3 * h]  # outside the map
    # Spans of 65-80 cells (a map of 70 x 90 at scale 0.5): three tiles of 32 per
    # axis, the last clipped at the map's far edge and overlapping the one before.
    boxes[4] = [0.22 * w, 0.04 * h, 0.98 * w, 0.97 * h]
    boxes[5] = [0.01 * w, 0.02 * h, 0.83 * w, 0.4 * h]
    return boxes


def topology(name: str):
    """A TPU topology to compile for (no TPU needed): ``"v5e:2x2"``, ``"v5e:4x4"``."""
    from jax.experimental import topologies

    return topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chip_config_name="default",
        chips_per_host_bounds=(2, 2, 1),
        num_slices=1,
    )


def count_ops(text: str) -> dict[str, int]:
    """Gathers, scatters and collectives among a compiled program's instructions
    (any result shape, tuples included)."""
    return {op: len(re.findall(rf"\b{op}(-start)?\(", text)) for op in OPS}


def map_copies_in_loops(text: str, shapes) -> list[str]:
    """Copies of an array of a map's shape (the map, its gradient; any dtype and
    layout) outside the entry computation of a compiled program: inside a loop
    or a branch, where they run once per trip."""
    dims = [",".join(str(int(d)) for d in s) for s in shapes]
    alternatives = "|".join(map(re.escape, dims))
    pattern = re.compile(rf"= (\w+)\[({alternatives})\]\S* (copy|copy-start)\(")
    found, entry = [], False
    for line in text.splitlines():
        if re.match(r"^\S.*\{\s*$", line):
            entry = line.startswith("ENTRY")
        if not entry and pattern.search(line):
            found.append(line.strip()[:120])
    return found
