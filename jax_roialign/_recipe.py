"""What the recipes of the single-map ops share (:class:`BoxRecipe`)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._dispatch import Recipe
from ._validation import Call, DataFormat

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BoxRecipe(Recipe):
    """A call on one map ``features`` and boxes ``(coords [K, D], batch [K], ok [K],
    ...)``, returning ``[K, PH, PW, C_out]`` in the compute dtype.

    Attributes:
      layout: the map's layout.
      pooled: ``(PH, PW)``.
      size: the map's ``(H, W)``.
      spatial_scale: map size over image size.
      dtype: the compute dtype.
      per_image: boxes ``[N, R, D]`` (image-major, ``K = N * R``): each box's image
        is its position's (the device's own images under batch sharding).
    """

    layout: DataFormat
    pooled: tuple[int, int]
    size: tuple[int, int]
    spatial_scale: float
    dtype: Any
    per_image: bool

    @classmethod
    def settings(cls, call: Call) -> dict[str, Any]:
        """The fields every box recipe takes from a checked call."""
        return dict(
            layout=call.layout,
            pooled=call.pooled,
            size=call.size,
            spatial_scale=call.spatial_scale,
            dtype=np.dtype(call.dtype),
            per_image=len(call.rois.lead_shape) == 2,
        )

    def channels(self, features: Any) -> int:
        return features.shape[3 if self.layout is DataFormat.NHWC else 1]

    def out_channels(self, features: Any) -> int:
        return self.channels(features)

    def out_avals(self, features, coords, *rest):
        shape = (coords.shape[0], *self.pooled, self.out_channels(features))
        return [jax.core.ShapedArray(shape, self.dtype)]

    def batch(self, features: Array, batch: Array) -> Array:
        """Each box's image: ``batch``, or per image the image its position says."""
        if not self.per_image:
            return batch
        n = features.shape[0]
        return jnp.repeat(jnp.arange(n, dtype=jnp.int32), batch.shape[0] // n)
