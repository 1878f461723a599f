"""MONAI Label integration: an app and a train task that run the bundles' semi-supervised training on a MONAI Label
datastore. Needs ``monailabel`` 0.8.5, an optional dependency installed as the README's "MONAI Label" section says
(its own requirements pin a CUDA torch and numpy < 2)."""

from .activelearning import SCORE_KEY, MostDisagreement, PLEDisagreementScoring
from .app import MAIN, MLBSegApp, write_app
from .compat import import_without_torchvision
from .train import STUDY_FORMATS, TRAIN_OPTIONS, SemiSupervisedTrainTask

__all__ = [
    "MAIN",
    "MostDisagreement",
    "PLEDisagreementScoring",
    "SCORE_KEY",
    "MLBSegApp",
    "SemiSupervisedTrainTask",
    "STUDY_FORMATS",
    "TRAIN_OPTIONS",
    "import_without_torchvision",
    "write_app",
]
