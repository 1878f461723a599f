"""Engines: the stage-2 MetaTrainer, the mean-teacher handler, checkpoints and stage orchestration."""

from .bootstrap import bootstrap_labels, initial_label_items, run_stage
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, latest_checkpoint, load_weights, save_weights
from .guards import NonFiniteLossGuard, check_finite
from .meta_trainer import STAGE2_TERMS, MetaIterationEvents, MetaTrainer, stage2_terms
from .teacher import MeanTeacherHandler

__all__ = [
    "AtomicCheckpointSaver",
    "MeanTeacherHandler",
    "NonFiniteLossGuard",
    "MetaIterationEvents",
    "MetaTrainer",
    "ResumeFromCheckpoint",
    "STAGE2_TERMS",
    "bootstrap_labels",
    "check_finite",
    "initial_label_items",
    "latest_checkpoint",
    "load_weights",
    "run_stage",
    "save_weights",
    "stage2_terms",
]
