"""How to aggregate: contractions of per-axis taps with the feature map.

The feature map is always addressed as ``[N, H, W, C]`` logically; for NCHW the
reads index the channel axis second, so no transposed copy of the map is made.
Reads are done in the map's own dtype and cast to the compute dtype per value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._validation import DataFormat

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


def read(features: Array, layout: DataFormat, b: Array, iy: Array, ix: Array) -> Array:
    """Gathers ``features[b, iy, ix, :]`` for broadcastable index arrays; returns ``[..., C]``."""
    if layout is DataFormat.NHWC:
        return features[b, iy, ix]
    return features[b, :, iy, ix]


def contract_taps(
    features: Array,
    layout: DataFormat,
    batch: Array,
    iy: Array,
    wy: Array,
    ix: Array,
    wx: Array,
    dtype,
) -> Array:
    """``out[k, ph, pw, c] = sum_a sum_b wy[k,ph,a] wx[k,pw,b] F[batch[k], iy[k,ph,a], ix[k,pw,b], c]``.

    ``iy, wy``: ``[K, PH, A]``; ``ix, wx``: ``[K, PW, B]``. One gather per tap pair, each
    the size of the output, summed in one fused loop, so no tensor larger than the
    output is materialised.
    """
    b = batch[:, None, None]
    acc = None
    for a in range(iy.shape[-1]):
        rows = iy[:, :, a][:, :, None]
        row_w = wy[:, :, a][:, :, None]
        for t in range(ix.shape[-1]):
            cols = ix[:, :, t][:, None, :]
            w = (row_w * wx[:, :, t][:, None, :])[..., None]
            term = w * read(features, layout, b, rows, cols).astype(dtype)
            acc = term if acc is None else acc + term
    assert acc is not None
    return acc


def contract_dense(
    features: Array,
    layout: DataFormat,
    batch: Array,
    wy: Array,
    wx: Array,
    dtype,
    chunk: int = 16,
) -> Array:
    """The same sum with dense weights over the whole map: ``wy [K, PH, H]``, ``wx [K, PW, W]``.

    Two matmuls per box (``Wy . F . Wx^T``), with the image picked by a one-hot
    weight so there is no gather; boxes go in chunks to bound the intermediate.
    """
    n = features.shape[0]
    f = features.astype(dtype)
    eq_rows = "kpnh,nhwc->kpwc" if layout is DataFormat.NHWC else "kpnh,nchw->kpwc"

    def one(args):
        wy_c, wx_c, b_c = args
        onehot = (b_c[:, None] == jnp.arange(n)).astype(dtype)
        wyn = wy_c[:, :, None, :] * onehot[:, None, :, None]
        z = jnp.einsum(eq_rows, wyn, f, precision=_HIGHEST)
        return jnp.einsum("kpwc,kqw->kpqc", z, wx_c, precision=_HIGHEST)

    k = wy.shape[0]
    if k <= chunk:
        return one((wy, wx, batch))
    pad = -k % chunk
    parts = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (wy, wx, batch)]
    parts = [x.reshape((-1, chunk) + x.shape[1:]) for x in parts]
    out = jax.lax.map(one, tuple(parts))
    return out.reshape((-1,) + out.shape[2:])[:k]
