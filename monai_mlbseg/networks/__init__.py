"""Networks of monai-mlbseg."""

from .nested_unet import NestedUNet

__all__ = [
    "NestedUNet",
]
