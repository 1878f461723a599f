"""Losses of MLB-Seg: the meta-reweighted per-pixel BCE and the two regularisers."""

from .consistency import ConfidentPseudoLabelLoss, MeanTeacherLoss, ViewConsistencyLoss
from .reweight import MetaReweightLoss, pixel_bce

__all__ = [
    "ConfidentPseudoLabelLoss",
    "MeanTeacherLoss",
    "ViewConsistencyLoss",
    "MetaReweightLoss",
    "pixel_bce",
]
