"""RoI Align and its family for JAX, with torchvision's exact numbers under jit.

Pure functions on arrays (``[N, H, W, C]`` features by default), jit-able,
differentiable with respect to features and boxes, with Flax modules in
:mod:`jax_roialign.nnx` and :mod:`jax_roialign.linen`.
"""

from ._crop import crop_and_resize, multilevel_crop_and_resize
from ._deform import deform_roi_align
from ._multiscale import multiscale_roi_align
from ._pool import roi_pool
from ._precise import precise_roi_pool
from ._ps import ps_roi_align
from ._roi_align import roi_align
from ._rotated import roi_align_rotated

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "roi_align",
    "roi_align_rotated",
    "deform_roi_align",
    "roi_pool",
    "ps_roi_align",
    "precise_roi_pool",
    "multiscale_roi_align",
    "crop_and_resize",
    "multilevel_crop_and_resize",
]
