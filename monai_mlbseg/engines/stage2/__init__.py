"""
The stage-2 contract: the engine (:py:class:`MetaTrainer`) and the part kinds it is made of, one module each.

Computation parts see only the iteration's :py:class:`Stage2Context`:

- label sources (:py:mod:`.sources`): the targets of the weighted term;
- unlabeled terms (:py:mod:`.terms`): weighted losses on the unlabeled (and the labeled) views;
- weightings (:py:mod:`.weightings`): how much each pixel of each source counts, one registry
  (:py:data:`WEIGHTINGS`).

Acting parts also see the engine through the declared :py:class:`Stage2Host` protocol (:py:mod:`.host`):

- step schedules (:py:mod:`.schedules`): how the losses become optimizer steps, with their gradient clip;
- the mean teacher (:py:mod:`.teacher`);
- a weighting or term with a look-ahead or a fitted model, in its ``attach``.

Perturbations (:py:mod:`.perturbations`) are what the student sees of the views; their traits
(:py:mod:`monai_mlbseg.transforms.traits`) say whether they move pixels or perturb features.
"""

from .context import LabeledViews, Stage2Context, ViewBatch
from .host import Stage2Host
from .perturbations import Perturbation
from .schedules import JointStep, LabeledOnly, StepLosses, StepSchedule, TwoSteps, WeightedStepOnly
from .sources import InitialLabels, LabelSource, PseudoLabels, TeacherLabels
from .teacher import MeanTeacher
from .terms import BidirectionalCopyPasteTerm, MeanTeacherTerm, UnlabeledTerm, ViewConsistencyTerm, weighted_dice_bce
from .trainer import STAGE2_PHASES, STAGE2_TERMS, MetaTrainer, stage2_terms
from .weightings import (
    WEIGHTINGS,
    ConfidenceWeighting,
    MetaWeighting,
    PixelWeighting,
    UniformWeighting,
    WeightMaps,
    per_pixel,
    pixel_weighting,
    weight_shape,
)

__all__ = [
    "STAGE2_PHASES",
    "STAGE2_TERMS",
    "WEIGHTINGS",
    "ConfidenceWeighting",
    "BidirectionalCopyPasteTerm",
    "InitialLabels",
    "JointStep",
    "LabelSource",
    "LabeledOnly",
    "LabeledViews",
    "MeanTeacher",
    "MeanTeacherTerm",
    "MetaTrainer",
    "MetaWeighting",
    "Perturbation",
    "PixelWeighting",
    "PseudoLabels",
    "Stage2Context",
    "Stage2Host",
    "StepLosses",
    "StepSchedule",
    "TeacherLabels",
    "TwoSteps",
    "UniformWeighting",
    "UnlabeledTerm",
    "ViewBatch",
    "ViewConsistencyTerm",
    "WeightMaps",
    "WeightedStepOnly",
    "per_pixel",
    "pixel_weighting",
    "stage2_terms",
    "weighted_dice_bce",
    "weight_shape",
]
