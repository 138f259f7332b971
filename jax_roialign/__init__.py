"""RoI Align and its family for JAX, with torchvision's exact numbers under jit."""

from ._roi_align import roi_align

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "roi_align",
]
