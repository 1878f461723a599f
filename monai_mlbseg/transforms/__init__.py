"""PLE view set: MONAI array and dictionary transforms, and the batched functional core they share."""

from .array import (
    DEFAULT_ZOOM_IN_RANGE,
    DEFAULT_ZOOM_OUT_RANGE,
    PLEViews,
    RandFlipView,
    RandZoomView,
    ViewTransform,
)
from .dictionary import PLEViewsd, RandFlipViewd, RandZoomViewd, ViewTransformd
from .features import FeatureDropout
from .functional import (
    PLEResult,
    ViewParams,
    map_view_pairs,
    ple_pseudo_labels,
    random_box_masks,
    view_pairs,
    warp_from_views,
    warp_to_views,
)
from .intensity import StrongIntensityAugment
from .mix import CutMix
from .traits import FeaturePerturbingTrait, PixelMovingTrait, WrappingTrait

__all__ = [
    "CutMix",
    "FeatureDropout",
    "FeaturePerturbingTrait",
    "PixelMovingTrait",
    "WrappingTrait",
    "DEFAULT_ZOOM_IN_RANGE",
    "DEFAULT_ZOOM_OUT_RANGE",
    "PLEViews",
    "RandFlipView",
    "RandZoomView",
    "ViewTransform",
    "StrongIntensityAugment",
    "PLEViewsd",
    "RandFlipViewd",
    "RandZoomViewd",
    "ViewTransformd",
    "PLEResult",
    "ViewParams",
    "map_view_pairs",
    "ple_pseudo_labels",
    "random_box_masks",
    "view_pairs",
    "warp_from_views",
    "warp_to_views",
]
