"""
Engines: the stage-2 engine and its contract (:py:mod:`monai_mlbseg.engines.stage2`, where the parts live), the named
methods, checkpoints and stage orchestration.
"""

from . import stage2
from .bootstrap import bootstrap_labels, initial_label_items, run_stage
from .checkpoint import AtomicCheckpointSaver, ResumeFromCheckpoint, latest_checkpoint, load_weights, save_weights
from .events import MetaIterationEvents
from .guards import DataUnchangedGuard, NonFiniteLossGuard, check_finite
from .methods import STAGE2_METHODS, Stage2Method, matched_control, stage2_method
from .monitor import GroundTruthMonitor
from .stage2 import WEIGHTINGS, MetaTrainer, pixel_weighting, stage2_terms
from .teacher import MeanTeacherHandler
from .weight_maps import WeightMapKeeper

__all__ = [
    "STAGE2_METHODS",
    "WEIGHTINGS",
    "AtomicCheckpointSaver",
    "GroundTruthMonitor",
    "MeanTeacherHandler",
    "MetaIterationEvents",
    "MetaTrainer",
    "NonFiniteLossGuard",
    "DataUnchangedGuard",
    "ResumeFromCheckpoint",
    "Stage2Method",
    "WeightMapKeeper",
    "bootstrap_labels",
    "check_finite",
    "initial_label_items",
    "latest_checkpoint",
    "load_weights",
    "matched_control",
    "pixel_weighting",
    "run_stage",
    "save_weights",
    "stage2",
    "stage2_method",
    "stage2_terms",
]
