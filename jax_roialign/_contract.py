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
    """``out[k,ph,pw,c] = sum_ab wy[k,ph,a] wx[k,pw,b] F[batch[k], iy[k,ph,a], ix[k,pw,b], c]``.

    ``iy, wy``: ``[K, PH, A]`` (separable) or ``[K, PH, PW, A]`` (per bin, e.g. deformable);
    ``ix, wx``: ``[K, PW, B]`` or ``[K, PH, PW, B]``. One gather per tap pair, each the
    size of the output, summed in one fused loop, so no tensor larger than the
    output is materialised.
    """
    b = batch[:, None, None]
    return contract_taps_with(
        lambda rows, cols: read(features, layout, b, rows, cols), iy, wy, ix, wx, dtype
    )


def contract_taps_with(reader, iy: Array, wy: Array, ix: Array, wx: Array, dtype) -> Array:
    """:func:`contract_taps` for any ``reader(rows [K,PH,PW], cols [K,PH,PW]) -> [K,PH,PW,C]``.

    Lets ops that address the map differently (a flat concatenation of FPN
    levels, a channel group per bin) share the same tap loop.
    """
    if iy.ndim == 3:
        iy, wy = iy[:, :, None, :], wy[:, :, None, :]
    if ix.ndim == 3:
        ix, wx = ix[:, None, :, :], wx[:, None, :, :]
    acc = None
    for a in range(iy.shape[-1]):
        rows = iy[..., a]
        row_w = wy[..., a]
        for t in range(ix.shape[-1]):
            cols = ix[..., t]
            w = (row_w * wx[..., t])[..., None]
            term = w * reader(rows, cols).astype(dtype)
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
    """The same sum with dense weights over the whole map.

    ``wy [K, PH, H]`` and ``wx [K, PW, W]`` (separable): two matmuls per box
    (``Wy . F . Wx^T``). Per-bin weights ``wy [K, PH, PW, H]`` / ``wx [K, PH, PW, W]``
    are accepted too. The image is picked by a one-hot weight so there is no
    gather; boxes go in chunks to bound the intermediate.
    """
    n = features.shape[0]
    f = features.astype(dtype)
    chw = "nhwc" if layout is DataFormat.NHWC else "nchw"

    def one(args):
        wy_c, wx_c, b_c = args
        onehot = (b_c[:, None] == jnp.arange(n)).astype(dtype)
        if wy_c.ndim == 3 and wx_c.ndim == 3:
            wyn = wy_c[:, :, None, :] * onehot[:, None, :, None]
            z = jnp.einsum(f"kpnh,{chw}->kpwc", wyn, f, precision=_HIGHEST)
            return jnp.einsum("kpwc,kqw->kpqc", z, wx_c, precision=_HIGHEST)
        ph, pw = (wy_c.shape[1], wx_c.shape[-2]) if wx_c.ndim == 3 else wx_c.shape[1:3]
        wy4 = jnp.broadcast_to(
            wy_c[:, :, None, :] if wy_c.ndim == 3 else wy_c,
            (wy_c.shape[0], ph, pw, f.shape[1 if chw == "nhwc" else 2]),
        )
        wx4 = jnp.broadcast_to(
            wx_c[:, None, :, :] if wx_c.ndim == 3 else wx_c, (wx_c.shape[0], ph, pw, wx_c.shape[-1])
        )
        wyn = wy4[:, :, :, None, :] * onehot[:, None, None, :, None]
        z = jnp.einsum(f"kabnh,{chw}->kabwc", wyn, f, precision=_HIGHEST)
        return jnp.einsum("kabwc,kabw->kabc", z, wx4, precision=_HIGHEST)

    k = wy.shape[0]
    if k <= chunk:
        return one((wy, wx, batch))
    pad = -k % chunk
    parts = [jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in (wy, wx, batch)]
    parts = [x.reshape((-1, chunk) + x.shape[1:]) for x in parts]
    out = jax.lax.map(one, tuple(parts))
    return out.reshape((-1,) + out.shape[2:])[:k]
