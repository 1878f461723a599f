"""Engines: the stage-2 MetaTrainer and its parts, the named methods, checkpoints and stage orchestration."""

from .bootstrap import bootstrap_labels, initial_label_items, run_stage
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, latest_checkpoint, load_weights, save_weights
from .context import LabeledViews, Stage2Context, ViewBatch
from .events import MetaIterationEvents
from .guards import NonFiniteLossGuard, check_finite
from .meta_trainer import STAGE2_PHASES, STAGE2_TERMS, MetaTrainer, stage2_terms
from .methods import STAGE2_METHODS, Stage2Method, stage2_method
from .monitor import GroundTruthMonitor
from .parts import (
    ConfidenceWeighting,
    InitialLabels,
    JointStep,
    LabelSource,
    MeanTeacher,
    MeanTeacherTerm,
    MetaWeighting,
    PixelWeighting,
    PseudoLabels,
    StepLosses,
    StepSchedule,
    TeacherLabels,
    TwoSteps,
    UniformWeighting,
    UnlabeledTerm,
    ViewConsistencyTerm,
    WeightedStepOnly,
    WeightMaps,
)
from .teacher import MeanTeacherHandler

__all__ = [
    "AtomicCheckpointSaver",
    "ConfidenceWeighting",
    "GroundTruthMonitor",
    "InitialLabels",
    "JointStep",
    "LabelSource",
    "LabeledViews",
    "MeanTeacher",
    "MeanTeacherHandler",
    "MeanTeacherTerm",
    "MetaIterationEvents",
    "MetaTrainer",
    "MetaWeighting",
    "NonFiniteLossGuard",
    "PixelWeighting",
    "PseudoLabels",
    "ResumeFromCheckpoint",
    "STAGE2_METHODS",
    "STAGE2_PHASES",
    "STAGE2_TERMS",
    "Stage2Context",
    "Stage2Method",
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
    "bootstrap_labels",
    "check_finite",
    "initial_label_items",
    "latest_checkpoint",
    "load_weights",
    "run_stage",
    "save_weights",
    "stage2_method",
    "stage2_terms",
]
