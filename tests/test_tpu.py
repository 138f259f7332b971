"""Compiled for TPU ahead of time (libtpu's compiler, no TPU needed): the ``tpu`` extra.

Every public op and Flax module is compiled for one v5e chip (forward) and for a
16-chip v5e pod (features and per-image boxes sharded on the batch, explicit
sharding, plain ``jit``; forward+backward). The ops with a TPU path (RoI Align
in avg and max mode, FPN pooling, precise pooling,
position-sensitive RoI Align, the TensorFlow crops, RoI Pool, deformable RoI
Align, rotated RoI Align: ``implementation=None`` lowers to the window reader for
TPU) have no gather or scatter in the TPU program, no collective on the pod and
per-chip temporaries bounded by the output (forward) and features + output
(forward+backward). A program exported for TPU and CPU runs here with the same numbers.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from helpers import count_ops, map_copies_in_loops  # noqa: E402
from helpers import topology as _topology  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding, SingleDeviceSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jax_roialign as jr  # noqa: E402

pytestmark = pytest.mark.tpu

N, H, W, C, R = 2, 32, 48, 128, 32  # per chip: 2 images, 32 boxes each
POD_CHIPS = 16
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")


@pytest.fixture(scope="module")
def chip():
    return SingleDeviceSharding(_topology("v5e:2x2").devices[0]), None


@pytest.fixture(scope="module")
def pod():
    mesh = Mesh(np.array(_topology("v5e:4x4").devices), ("batch",), axis_types=(AxisType.Explicit,))
    return NamedSharding(mesh, P("batch")), mesh


def _compile(fn, args, mesh):
    if mesh is None:
        return jax.jit(fn).lower(*args).compile()
    with jax.set_mesh(mesh):
        return jax.jit(fn).lower(*args).compile()


def _spec(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def _boxes_spec(n, sharding, width=4):
    return _spec((n, R, width), jnp.float32, sharding)


# Ops with a TPU path: (name, fn(features, boxes), features shapes per chip).
def _roi_align(sr, method=None):
    return lambda f, b: jr.roi_align(
        f[0], b, output_size=7, spatial_scale=0.25, sampling_ratio=sr, implementation=method
    )


def _multiscale(f, b, method=None):
    return jr.multiscale_roi_align(
        list(f),
        b,
        output_size=7,
        spatial_scales=(1 / 4, 1 / 8),
        sampling_ratio=2,
        implementation=method,
    )


def _multiscale_pallas(f, b):
    return _multiscale(f, b, method="pallas")


def _precise(f, b):
    return jr.precise_roi_pool(f[0], b, output_size=7, spatial_scale=0.25)


def _nnx_roi_align(f, b):
    from jax_roialign import nnx as jnnx

    return jnnx.RoIAlign(output_size=7, spatial_scale=0.25)(f[0], b)


def _linen_multiscale(f, b):
    from jax_roialign import linen as jlinen

    mod = jlinen.MultiScaleRoIAlign(output_size=7, spatial_scales=(1 / 4, 1 / 8), sampling_ratio=0)
    return mod.apply({}, list(f), b)


def _max(sr):
    def fn(f, b):
        return jr.roi_align(
            f[0], b, output_size=7, spatial_scale=0.25, sampling_ratio=sr, mode="max"
        )

    return fn


def _ps(f, b):
    return jr.ps_roi_align(f[0], b, output_size=2, spatial_scale=0.25, sampling_ratio=2)


def _crop(f, b):
    # Box indices typed (and sharded) like the boxes: box (n, r) reads image n.
    idx = (jnp.zeros_like(b[..., 0], jnp.int32) + jnp.arange(b.shape[0])[:, None]).reshape(-1)
    return jr.crop_and_resize(f[0], b.reshape(-1, 4) / 200.0, idx, (7, 7))


def _multilevel(f, b):
    return jr.multilevel_crop_and_resize({2: f[0], 3: f[1]}, b, output_size=7)


def _deform(sr):
    def fn(f, b):
        offsets = jnp.full(b.shape[:-1] + (7, 7, 2), 0.1, jnp.float32)
        return jr.deform_roi_align(
            f[0], b, offsets, output_size=7, spatial_scale=0.25, sampling_ratio=sr
        )

    return fn


def _rotated(sr):
    def fn(f, b):
        boxes = jnp.concatenate([b, jnp.full_like(b[..., :1], 30.0)], -1)  # sharded like b
        return jr.roi_align_rotated(
            f[0], boxes, output_size=7, spatial_scale=0.25, sampling_ratio=sr
        )

    return fn


def _roi_pool(f, b):
    return jr.roi_pool(f[0], b, output_size=7, spatial_scale=0.25)


ONE = [(N, H, W, C)]
TWO = [(N, H, W, C), (N, H // 2, W // 2, C)]
TPU_PATH = {
    "roi_align_fixed": (_roi_align(2), ONE),
    "roi_align_adaptive": (_roi_align(0), ONE),
    "roi_align_pallas": (_roi_align(0, "pallas"), ONE),
    "multiscale_pallas": (_multiscale_pallas, TWO),
    "multiscale_roi_align": (_multiscale, TWO),
    "precise_roi_pool": (_precise, ONE),
    "nnx.RoIAlign": (_nnx_roi_align, ONE),
    "linen.MultiScaleRoIAlign": (_linen_multiscale, TWO),
    "crop_and_resize": (_crop, ONE),
    "multilevel_crop_and_resize": (_multilevel, TWO),
    "roi_align_max_fixed": (_max(2), ONE),
    "roi_align_max_adaptive": (_max(0), ONE),
    "ps_roi_align": (_ps, ONE),
    "deform_roi_align": (_deform(0), ONE),
    "deform_roi_align_fixed": (_deform(2), ONE),
    "roi_align_rotated_fixed": (_rotated(2), ONE),
    "roi_align_rotated_adaptive": (_rotated(0), ONE),
    "roi_pool": (_roi_pool, ONE),
}


def _specs(shapes, images, dtype, sharding, width=4):
    feats = tuple(_spec((images,) + s[1:], dtype, sharding) for s in shapes)
    return feats, _boxes_spec(images, sharding, width)


def _with_backward(fn):
    def fb(f, b):
        out, vjp = jax.vjp(fn, f, b)
        return out, vjp(out)

    return fb


def _targets():
    """Each op forward on one chip (the forward's own temporaries bound) and
    forward+backward on the pod: its per-chip program is the op's body on the
    chip's images, so it has the gathers, scatters, copies and temporaries of the
    chip's, and any collective. crop_and_resize has no pod program (its
    box_indices may name any image: the boxes have no per-image partition), so
    its forward+backward is compiled for the chip."""
    for name in TPU_PATH:
        yield pytest.param(name, False, "chip", id=f"chip-fwd-{name}")
        target = "chip" if name == "crop_and_resize" else "pod"
        yield pytest.param(name, True, target, id=f"{target}-fwd+bwd-{name}")


@pytest.mark.parametrize(("name", "backward", "target"), list(_targets()))
def test_tpu_path_has_no_gather_scatter_or_collective(name, backward, target, request):
    sharding, mesh = request.getfixturevalue(target)
    images = N * (POD_CHIPS if target == "pod" else 1)
    dtype = jnp.bfloat16 if "adaptive" in name or "pallas" in name else jnp.float32
    fn, shapes = TPU_PATH[name]
    fn = _with_backward(fn) if backward else fn
    compiled = _compile(fn, _specs(shapes, images, dtype, sharding), mesh)
    text = compiled.as_text()
    counts = count_ops(text)
    assert counts["gather"] == 0, "gather in the TPU program"
    assert counts["scatter"] == 0, "scatter in the TPU program"
    for op in COLLECTIVES:
        assert counts[op] == 0, f"{op} in the TPU program"
    # No per-box copy of a map or of its gradient (an array updated inside a switch
    # in a loop is copied, and relaid out, on every trip).
    assert map_copies_in_loops(text, shapes) == []
    # Per-chip temporaries: at most the output (forward), features + output (backward),
    # plus the one window being read (float32; here the whole 32 x 48 map, which a
    # workload's output dwarfs: see benchmarks.tpu).
    item = jnp.dtype(dtype).itemsize
    out_bytes = N * R * 7 * 7 * C * item
    feat_bytes = sum(int(np.prod(s)) for s in shapes) * item
    window = H * W * C * 4
    # The feature gradient is summed in float32, one image at a time for bfloat16
    # maps: one image's float32 map (here the size of the bfloat16 maps).
    grad_bytes = sum(int(np.prod(s)) for s in shapes) * 4 // N
    bound = out_bytes + (max(feat_bytes, grad_bytes) + out_bytes if backward else 0) + window
    if backward and name == "roi_align_max_adaptive":
        # Reverse mode runs max mode's search again (the winners are not kept
        # from the forward): its running maxima and winners, float32 and int32.
        bound += 2 * N * R * 7 * 7 * C * 4 // 3
    assert compiled.memory_analysis().temp_size_in_bytes <= bound


def test_export_for_tpu_and_cpu_runs_here():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 20, 24, 8)), jnp.float32)
    boxes = jnp.asarray(rng.uniform(0, 18, (2, 5, 4)), jnp.float32)
    boxes = boxes.at[..., 2:].add(4.0)

    def f(x, b):
        out = jr.roi_align(x, b, output_size=3, sampling_ratio=0)
        return out, jax.grad(lambda x: jnp.sum(jr.roi_align(x, b, output_size=3) ** 2))(x)

    exported = jax.export.export(jax.jit(f), platforms=("tpu", "cpu"))(x, boxes)
    assert exported.platforms == ("tpu", "cpu")
    text = exported.mlir_module()
    assert "stablehlo.dynamic_slice" in text  # the TPU branch: windows
    restored = jax.export.deserialize(exported.serialize())
    got = restored.call(x, boxes)
    want = jax.jit(f)(x, boxes)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
