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


# Tap pairs unrolled into one fused loop at most; wider windows loop over rows.
UNROLL_LIMIT = 36


def contract_taps_with(reader, iy: Array, wy: Array, ix: Array, wx: Array, dtype) -> Array:
    """:func:`contract_taps` for any ``reader(rows [K,PH,PW], cols [K,PH,PW]) -> [K,PH,PW,C]``.

    Lets ops that address the map differently (a flat concatenation of FPN
    levels, a channel group per bin) share the same tap loop. Up to
    ``UNROLL_LIMIT`` tap pairs are unrolled (one fused loop, nothing larger than
    the output); a wider window goes through a ``lax.scan`` over its rows, each
    step ``B`` reads, which keeps compile time and the backward's memory flat.
    """
    if iy.ndim == 3:
        iy, wy = iy[:, :, None, :], wy[:, :, None, :]
    if ix.ndim == 3:
        ix, wx = ix[:, None, :, :], wx[:, None, :, :]

    def rows_sum(iy: Array, wy: Array) -> Array:
        acc = None
        for a in range(iy.shape[-1]):
            rows = iy[..., a]
            row_w = wy[..., a]
            for t in range(ix.shape[-1]):
                w = (row_w * wx[..., t])[..., None]
                term = w * reader(rows, ix[..., t]).astype(dtype)
                acc = term if acc is None else acc + term
        assert acc is not None
        return acc

    if iy.shape[-1] * ix.shape[-1] <= UNROLL_LIMIT:
        return rows_sum(iy, wy)

    def step(acc, taps):
        return acc + rows_sum(taps[0][..., None], taps[1][..., None]), None

    # The first row starts the sum (not zeros), so the carry has the data's
    # sharding type also inside shard_map.
    rest = (jnp.moveaxis(iy[..., 1:], -1, 0), jnp.moveaxis(wy[..., 1:], -1, 0))
    out, _ = jax.lax.scan(step, rows_sum(iy[..., :1], wy[..., :1]), rest)
    return out


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
