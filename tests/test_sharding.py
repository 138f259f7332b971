"""Many devices (8 forced host CPU devices, see conftest.py): batch sharding without
cross-device traffic, shard_map, boxes sharded over devices, and jax.export."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jax_roialign as jr
from jax_roialign import _compat

# jax.shard_map (jax 0.6.1), else jax.experimental.shard_map.shard_map: the oldest
# supported jax runs these tests too.
shard_map = _compat.shard_map

COLLECTIVE = re.compile(
    r"\s(all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(-start)?\("
)
N, R, C = 8, 5, 3


def collectives(compiled_text: str) -> list[str]:
    """The cross-device collective instructions of a compiled HLO module."""
    return [line.strip() for line in compiled_text.splitlines() if COLLECTIVE.search(line)]


@pytest.fixture(scope="module")
def mesh():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    return Mesh(np.array(jax.devices()[:8]), ("b",))


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((N, 32, 36, C))
    lo = rng.uniform(-4.0, 30.0, (N, R, 2))
    size = rng.uniform(0.5, 14.0, (N, R, 2))
    boxes = np.concatenate([lo, lo + size], axis=-1)
    boxes[0, 0] = [-20.0, -20.0, 60.0, 60.0]  # larger than the map: the dense path when adaptive
    return f, boxes


def _window_choice_only(found: list[str]) -> bool:
    """The collectives are the all-reduce of the window choice alone: the rows the
    largest bin needs, y and x, two int32 scalars (one all-reduce of both; older
    XLA, before jax 0.7, leaves them as two)."""
    kinds = [line.split("=")[1].split("all-reduce")[0].strip() for line in found]
    if not all("all-reduce(" in line for line in found):
        return False
    return kinds == ["(s32[], s32[])"] or kinds == ["s32[]", "s32[]"]


def _under_shard_map(found: list[str]) -> list[str]:
    """The collectives of a program under a user's ``shard_map``, less those that
    XLA's GSPMD partitioner (the default before jax 0.7, Shardy since) adds for the
    sort of the window reader's box grouping (an all-reduce of an index vector):
    a cost of old jax, not of the ops, whose numbers are the same."""
    if _compat.JAX_VERSION >= (0, 7, 0):
        return found
    return [line for line in found if "argsort" not in line]


def _put(mesh, x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize(
    ("implementation", "sampling_ratio"), [(None, 2), (None, 0), ("scatter", 0)]
)
@pytest.mark.slow
def test_batch_sharded_per_image_boxes(mesh, data, implementation, sampling_ratio):
    f, boxes = data
    kw = dict(output_size=(3, 2), sampling_ratio=sampling_ratio, implementation=implementation)
    fn = jax.jit(lambda f, b: jr.roi_align(f, b, **kw))
    want = fn(f, boxes)
    fs, bs = _put(mesh, f, P("b")), _put(mesh, boxes, P("b"))
    got = fn(fs, bs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    if implementation is None and sampling_ratio == 0:
        # The CPU default with adaptive sampling reads each box through its own
        # window in a loop over the boxes, which XLA's SPMD partitioner does not
        # split: under automatic sharding it runs replicated (the numbers above
        # are the same). Explicit sharding or shard_map runs it per device with
        # no collective (test_explicit_batch_sharding_runs_per_device,
        # test_every_op_under_shard_map).
        return
    # The vmapped gathers stay sharded.
    assert got.sharding.spec == P("b")
    found = collectives(fn.lower(fs, bs).compile().as_text())
    if sampling_ratio > 0:
        assert found == []
    else:
        # Adaptive sampling: the only traffic is the global window choice of
        # jax.lax.switch (the rows the largest bin needs, y and x): one all-reduce of
        # two scalars.
        assert _window_choice_only(found), found


@pytest.mark.parametrize("method", ["gather", "scatter", "matmul", "window"])
@pytest.mark.slow
def test_batch_sharded_gradient(mesh, data, method):
    # A data-parallel training step: map and per-image boxes sharded over the
    # batch; the feature gradient equals the single-device one and stays sharded.
    f, boxes = data
    cot = np.random.default_rng(1).standard_normal((N, R, 3, 2, C))

    def loss(f, b):
        out = jr.roi_align(f, b, output_size=(3, 2), sampling_ratio=2, implementation=method)
        return jnp.sum(out * cot)

    grad = jax.jit(jax.grad(loss))
    want = grad(f, boxes)
    fs, bs = _put(mesh, f, P("b")), _put(mesh, boxes, P("b"))
    got = grad(fs, bs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    if method in ("scatter", "matmul"):
        # (the row-window gradient is one loop over all boxes, which the SPMD
        # partitioner does not split: under plain jit it runs replicated. The
        # window reader's loop likewise, and its result comes back replicated.
        # Under shard_map, or with explicit sharding, all are local; see below.)
        assert got.sharding.is_equivalent_to(NamedSharding(mesh, P("b")), got.ndim)

    # shard_map: each device pools its images and adds its own gradient, no traffic.
    cot_s = _put(mesh, cot, P("b"))

    def local_loss(f, b, c):
        out = jr.roi_align(f, b, output_size=(3, 2), sampling_ratio=2, implementation=method)
        return jnp.sum(out * c)

    local = jax.jit(
        shard_map(
            jax.grad(local_loss), mesh=mesh, in_specs=(P("b"), P("b"), P("b")), out_specs=P("b")
        )
    )
    np.testing.assert_allclose(local(fs, bs, cot_s), want, rtol=0, atol=1e-12)
    found = collectives(local.lower(fs, bs, cot_s).compile().as_text())
    assert _under_shard_map(found) == []


# The gather path (numbers only, see below) with adaptive sampling; the scatter
# path's collectives with both.
@pytest.mark.parametrize(
    ("method", "sampling_ratio"), [("gather", 0), ("scatter", 2), ("scatter", 0)]
)
@pytest.mark.slow
def test_batch_sharded_multiscale(mesh, data, sampling_ratio, method):
    f, boxes = data
    maps = [f, f[:, ::2, ::2] * 0.5, f[:, ::4, ::4] - 1.0]
    kw = dict(output_size=3, spatial_scales=(1 / 4, 1 / 8, 1 / 16), sampling_ratio=sampling_ratio)
    fn = jax.jit(lambda m, b: jr.multiscale_roi_align(m, b, implementation=method, **kw))
    boxes = boxes * 16.0  # sizes 8 to 224 pixels: every level is used
    want = fn(maps, boxes)
    ms, bs = [_put(mesh, m, P("b")) for m in maps], _put(mesh, boxes, P("b"))
    got = fn(ms, bs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    if method == "gather":
        # The CPU default reads each level's boxes in a loop (no concatenation of
        # the levels), which XLA's SPMD partitioner does not split: under
        # automatic sharding it runs replicated (the numbers above are the same).
        # Explicit sharding or shard_map runs it per device with no collective
        # (test_explicit_batch_sharding_runs_per_device, test_every_op_under_shard_map).
        return
    # The vmapped gathers of the other paths stay sharded.
    found = collectives(fn.lower(ms, bs).compile().as_text())
    if sampling_ratio > 0:
        assert found == []
    else:
        assert _window_choice_only(found), found


@pytest.mark.slow
def test_shard_map_adaptive_has_no_collective(mesh, data):
    # The multi-scale op with adaptive sampling under a user's shard_map (roi_align's
    # adaptive sampling there, forward and backward: test_every_op_under_shard_map).
    f, boxes = data
    fs = _put(mesh, f, P("b"))
    kw = dict(output_size=3, spatial_scales=(1 / 4, 1 / 8), sampling_ratio=0)
    ms_pool = lambda m0, m1, b: jr.multiscale_roi_align([m0, m1], b, **kw)  # noqa: E731
    ms = jax.jit(shard_map(ms_pool, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
    m1 = f[:, ::2, ::2]
    args = (fs, _put(mesh, m1, P("b")), _put(mesh, boxes * 8.0, P("b")))
    np.testing.assert_allclose(ms(*args), jax.jit(ms_pool)(f, m1, boxes * 8.0), atol=1e-13)
    assert collectives(ms.lower(*args).compile().as_text()) == []


def test_boxes_sharded_features_replicated(mesh, data):
    f, boxes = data
    k = N * R
    rois = np.concatenate(
        [np.repeat(np.arange(N), R)[:, None].astype(np.float64), boxes.reshape(k, 4)], axis=1
    )
    rois = rois[np.random.default_rng(1).permutation(k)]
    fn = jax.jit(lambda f, r: jr.roi_align(f, r, output_size=(3, 2), sampling_ratio=2))
    want = fn(f, rois)
    fr, rs = _put(mesh, f, P()), _put(mesh, rois, P("b"))
    got = fn(fr, rs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-13)
    assert collectives(fn.lower(fr, rs).compile().as_text()) == []


@pytest.mark.slow
def test_export_round_trip(data):
    f, boxes = data
    f32, b32 = jnp.asarray(f, jnp.float32), jnp.asarray(boxes, jnp.float32)
    fn = jax.jit(lambda f, b: jr.roi_align(f, b, output_size=(3, 2), sampling_ratio=0))
    exported = export.export(fn)(f32, b32)
    blob = exported.serialize()
    restored = export.deserialize(blob)
    assert restored.in_avals == exported.in_avals
    np.testing.assert_array_equal(restored.call(f32, b32), fn(f32, b32))


def _skip_without_explicit_sharding():
    if _compat.JAX_VERSION < _compat.EXPLICIT_SHARDING_JAX:
        pytest.skip(
            f"explicit sharding needs jax>={_compat._version(_compat.EXPLICIT_SHARDING_JAX)}"
        )
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")


def _explicitly_sharded(fn, f, boxes):
    """``fn`` (jitted) on features and per-image boxes put on the batch axis of an
    explicit mesh (the pod recipe), and its compiled program's text."""
    from jax.sharding import AxisType

    mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        fs = jax.device_put(f, P("b"))
        bs = jax.device_put(boxes, P("b"))
        compiled = fn.lower(fs, bs).compile()
        return compiled(fs, bs), compiled.as_text()


@pytest.mark.slow
def test_explicit_batch_sharding_window_reader(data):
    # What a TPU program gets (the window reader), adaptive sampling: per device,
    # no collective, the numbers of one device.
    _skip_without_explicit_sharding()
    f, boxes = data

    def ops(f, b):
        out = jr.roi_align(f, b, output_size=(3, 2), sampling_ratio=0, implementation="window")
        ms = jr.multiscale_roi_align(
            [f, f[:, ::2, ::2]],
            b * 2,
            output_size=2,
            spatial_scales=(1 / 2, 1 / 4),
            sampling_ratio=0,
            implementation="window",
        )
        pr = jr.precise_roi_pool(f, b, output_size=2, implementation="window")
        return out, ms, pr

    def fwd_bwd(f, b):  # outputs and their VJP (a loss would reduce across devices)
        outs, vjp = jax.vjp(ops, f, b)
        return outs, vjp(outs)

    fn = jax.jit(fwd_bwd)
    want = fn(f, boxes)
    got, text = _explicitly_sharded(fn, f, boxes)
    assert collectives(text) == []
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-11)


def test_explicit_sharding_gate_names_the_version(monkeypatch):
    # Below the jax that explicit sharding needs, an op on explicitly batch-sharded
    # features raises an error naming that version (the rest of the library works).
    monkeypatch.setattr(_compat, "JAX_VERSION", (0, 9, 0))
    with pytest.raises(RuntimeError, match=r"needs jax>=0\.9\.1; this is jax "):
        _compat.reshard(jnp.zeros(2), P("b"))


def _every_op():
    def rotated(f, b, sampling_ratio=2):
        angle = 40.0 * jnp.sin(b[..., :1])  # (per box, so that it shards with the boxes)
        centre, size = (b[..., :2] + b[..., 2:]) / 2, jnp.abs(b[..., 2:] - b[..., :2])
        boxes = jnp.concatenate([centre, size, angle], axis=-1)
        return jr.roi_align_rotated(f, boxes, output_size=2, sampling_ratio=sampling_ratio)

    def deform(f, b):
        offsets = 0.1 * jnp.cos(b[..., :1, None, None] + jnp.zeros((1, 2, 2, 2)))
        return jr.deform_roi_align(f, b, offsets, output_size=2, sampling_ratio=2)

    return {
        "roi_align": lambda f, b: jr.roi_align(f, b, output_size=(3, 2), sampling_ratio=0),
        "roi_align_max": lambda f, b: jr.roi_align(
            f, b, output_size=2, sampling_ratio=2, mode="max"
        ),
        # Adaptive max mode and rotated boxes: loops over boxes sorted by cost.
        "roi_align_max_adaptive": lambda f, b: jr.roi_align(
            f, b, output_size=2, sampling_ratio=0, mode="max"
        ),
        "roi_align_rotated": rotated,
        "roi_align_rotated_adaptive": functools.partial(rotated, sampling_ratio=0),
        "deform_roi_align": deform,
        "roi_pool": lambda f, b: jr.roi_pool(f, b, output_size=2),
        "ps_roi_align": lambda f, b: jr.ps_roi_align(
            jnp.tile(f[..., :1], (1, 1, 1, 4)), b, output_size=2, sampling_ratio=2
        ),
        "precise_roi_pool": lambda f, b: jr.precise_roi_pool(f, b, output_size=2),
        "multiscale_roi_align": lambda f, b: jr.multiscale_roi_align(
            [f, f[:, ::2, ::2]],
            b * 4,
            output_size=2,
            spatial_scales=(1 / 4, 1 / 8),
            sampling_ratio=2,
        ),
        "crop_and_resize": lambda f, b: jr.crop_and_resize(
            f, b[:, 0] / 40.0, jnp.arange(b.shape[0]), (3, 3)
        ),
        "multilevel_crop_and_resize": lambda f, b: jr.multilevel_crop_and_resize(
            {2: f, 3: f[:, ::2, ::2]}, b * 4, output_size=2
        ),
    }


#: Every public op on per-image boxes (default options: ``auto`` traces every
#: platform's reader), as a function of the features and the boxes.
EVERY_OP = _every_op()


def _step(f, b, names=tuple(EVERY_OP)):
    """Each op's output and its VJP in the features and the boxes (cotangent: the
    cosine of the output)."""
    result = {}
    for name in names:
        out, vjp = jax.vjp(EVERY_OP[name], f, b)
        result[name] = (out, vjp(jnp.cos(out)))
    return result


@pytest.mark.slow
def test_every_op_under_shard_map_and_explicit_sharding(mesh, data):
    # Every op, default implementation, forward and the gradients with respect to
    # features and boxes, compiled three ways: on one device (the reference), under
    # a user's own shard_map (check_vma on), and (the pod recipe) under plain jit
    # with features and per-image boxes put on the batch axis of a mesh with
    # explicit axes, where each device pools its own images (the op's body under
    # shard_map). Sharded, the numbers are those of one device and nothing is
    # exchanged, adaptive sampling and backward included. (One test: the
    # reference is compiled once.)
    f, boxes = data
    want = jax.jit(_step)(f, boxes)

    fn = jax.jit(shard_map(_step, mesh=mesh, in_specs=P("b"), out_specs=P("b")))
    fs, bs = _put(mesh, f, P("b")), _put(mesh, boxes, P("b"))
    compiled = fn.lower(fs, bs).compile()
    got = compiled(fs, bs)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)
    assert _under_shard_map(collectives(compiled.as_text())) == []

    # Explicit sharding: every op that takes per-image boxes (on a CPU the FPN
    # ops' flat reads run per device). crop_and_resize's box indices may name any
    # image: test_explicitly_sharded_features_need_per_image_boxes.
    _skip_without_explicit_sharding()
    names = [name for name in EVERY_OP if name != "crop_and_resize"]
    got, text = _explicitly_sharded(jax.jit(functools.partial(_step, names=names)), f, boxes)
    assert collectives(text) == []
    want = {name: want[name] for name in names}
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-11)


def test_explicitly_sharded_features_need_per_image_boxes(data):
    # Boxes with batch indices cannot follow features sharded by type: a clear
    # error at trace time, naming the per-image form that works.
    if _compat.JAX_VERSION < _compat.EXPLICIT_SHARDING_JAX:
        pytest.skip(
            f"explicit sharding needs jax>={_compat._version(_compat.EXPLICIT_SHARDING_JAX)}"
        )
    from jax.sharding import AxisType

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 devices")
    f, boxes = data
    rows = np.concatenate([np.repeat(np.arange(8.0), R)[:, None], boxes.reshape(-1, 4)], axis=1)
    mesh = jax.make_mesh((8,), ("b",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        fs = jax.device_put(f, P("b"))
        with pytest.raises(ValueError, match=r"pass per-image boxes \[N, R, \.\.\.\]"):
            jax.jit(lambda f, b: jr.roi_align(f, b, output_size=2)).trace(fs, rows)
