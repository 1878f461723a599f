"""Engines: the stage-2 MetaTrainer, the mean-teacher handler, checkpoints and stage orchestration."""

from .bootstrap import bootstrap_labels, initial_label_items, run_stage
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, latest_checkpoint, load_weights, save_weights
from .events import MetaIterationEvents
from .guards import NonFiniteLossGuard, check_finite
from .meta_trainer import LABEL_SOURCES, STAGE2_PHASES, STAGE2_TERMS, MetaTrainer, Stage2State, stage2_terms
from .methods import STAGE2_METHODS, stage2_method_options
from .teacher import MeanTeacherHandler

__all__ = [
    "AtomicCheckpointSaver",
    "LABEL_SOURCES",
    "MeanTeacherHandler",
    "NonFiniteLossGuard",
    "MetaIterationEvents",
    "MetaTrainer",
    "ResumeFromCheckpoint",
    "STAGE2_METHODS",
    "STAGE2_PHASES",
    "STAGE2_TERMS",
    "Stage2State",
    "bootstrap_labels",
    "check_finite",
    "initial_label_items",
    "latest_checkpoint",
    "load_weights",
    "run_stage",
    "save_weights",
    "stage2_method_options",
    "stage2_terms",
]
