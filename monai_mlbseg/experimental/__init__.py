"""
Stage-2 parts that measured no gain on real left-atrium scans (``docs/results.md``), kept for experiments: no named
method or bundle uses them. Each docstring gives its measured effect; each plugs into
:py:class:`~monai_mlbseg.engines.MetaTrainer` like the parts of :py:mod:`monai_mlbseg.engines.stage2`, and the
weightings are in its one registry (:py:data:`~monai_mlbseg.engines.stage2.WEIGHTINGS`).
"""

from .parts import CopyPasteTerm, EnsembleMeanTeacherTerm, PerTermClippedJointStep, freeze_batch_norm
from .quality import (
    QualityPredictor,
    QualityTerm,
    QualityWeighting,
    corrupt_masks,
    quality_weighting,
    soft_dice_per_view,
)
from .weightings import (
    AdaptiveConfidenceWeighting,
    AgreementMetaWeighting,
    AmortisedMetaWeighting,
    InstanceMetaWeighting,
    NormalisedMetaWeighting,
    SignMetaWeighting,
    pixel_features,
)

__all__ = [
    "AdaptiveConfidenceWeighting",
    "AgreementMetaWeighting",
    "AmortisedMetaWeighting",
    "CopyPasteTerm",
    "EnsembleMeanTeacherTerm",
    "InstanceMetaWeighting",
    "NormalisedMetaWeighting",
    "PerTermClippedJointStep",
    "QualityPredictor",
    "QualityTerm",
    "QualityWeighting",
    "SignMetaWeighting",
    "corrupt_masks",
    "freeze_batch_norm",
    "pixel_features",
    "quality_weighting",
    "soft_dice_per_view",
]
