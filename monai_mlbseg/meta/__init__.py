"""The meta look-ahead of MLB-Seg: per-pixel weight maps from a differentiable SGD step."""

from monai_mlbseg.utils import unwrap_network

from .lookahead import WEIGHTINGS, LookAheadResult, MetaLookAhead, meta_weight_maps, normalise_weights

# ``unwrap_network`` lives in ``monai_mlbseg.utils``; it stays importable here because the bundle configs name it
# ``monai_mlbseg.meta.unwrap_network``
__all__ = [
    "LookAheadResult",
    "MetaLookAhead",
    "meta_weight_maps",
    "normalise_weights",
    "WEIGHTINGS",
    "unwrap_network",
]
