"""The meta look-ahead of MLB-Seg: per-pixel weight maps from a differentiable SGD step."""

from .lookahead import WEIGHTINGS, LookAheadResult, MetaLookAhead, meta_weight_maps, normalise_weights

__all__ = ["LookAheadResult", "MetaLookAhead", "meta_weight_maps", "normalise_weights", "WEIGHTINGS"]
