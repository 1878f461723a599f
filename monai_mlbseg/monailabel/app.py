"""A MONAI Label app: the bundles' semi-supervised training and inference on a studies folder."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random

from monai_mlbseg import __version__
from monai_mlbseg.bundles import BUNDLE_NAMES, write_bundle
from monai_mlbseg.utils import atomic_write_text

from .activelearning import MostDisagreement, PLEDisagreementScoring
from .compat import import_without_torchvision
from .train import SemiSupervisedTrainTask

__all__ = ["MLBSegApp", "write_app", "MAIN"]

logger = logging.getLogger(__name__)

#: the ``main.py`` of an app folder written by :py:func:`write_app`
MAIN = '''"""MONAI Label app of monai-mlbseg: `monailabel start_server --app <this folder> --studies <folder>`."""

from monai_mlbseg.monailabel.app import MLBSegApp


class MyApp(MLBSegApp):
    """The app MONAI Label starts: the bundles under model/, trained semi-supervised on the studies."""
'''


class MLBSegApp(MONAILabelApp):
    """
    A MONAI Label app over the bundles in ``<app>/model/<name>/`` (``--conf models mlbseg_la``, comma-separated for
    several; default: every bundle folder there). ``/train`` runs :py:class:`SemiSupervisedTrainTask`: the studies
    with a final label and the unlabeled studies, through the bundle's whole training. ``/infer`` runs the bundle's
    inference with the latest ``models/model.pt``; a model whose first weights a ``/train`` wrote while the server
    ran is offered at once, without a restart (MONAI Label builds its model list when it starts). Active learning
    offers MONAI Label's ``random`` and ``first``, and ``ple_disagreement``: the unlabeled study whose PLE views
    disagree most under the current model (:py:class:`~monai_mlbseg.monailabel.MostDisagreement`).

    Args:
        app_dir: the app folder.
        studies: the studies folder (or a remote datastore's address).
        conf: the ``--conf`` options: ``models`` (the bundle folders to serve), and MONAI Label's own.

    Example::

        monailabel start_server --app apps/mlbseg --studies studies --conf models mlbseg_la
    """

    def __init__(self, app_dir: str, studies: str, conf: Mapping[str, str]) -> None:
        folder = Path(app_dir, "model")
        names = [n for n in conf.get("models", "").split(",") if n] or sorted(
            p.name for p in folder.iterdir() if (p / "configs" / "train.json").is_file()
        )
        missing = [n for n in names if not (folder / n / "configs").is_dir()]
        if not names or missing:
            raise ValueError(
                f"no bundle {', '.join(missing) or ''} in {folder}: write the app with "
                "`python -m monai_mlbseg monailabel_app <folder>`, or pass --conf models <bundle folder name>"
            )
        self.bundles = {name: str(folder / name) for name in names}
        self._scorings: dict[str, PLEDisagreementScoring] = {}
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=dict(conf),
            name="monai-mlbseg",
            description="MLB-Seg: semi-supervised segmentation from a few labeled and many unlabeled studies",
            version=__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """The bundles that have weights (``models/model.pt``), each with MONAI Label's bundle inference task."""
        task_class = import_without_torchvision("monailabel.tasks.infer.bundle", "BundleInferTask")
        infers = {}
        for name, path in self.bundles.items():
            if os.path.isfile(os.path.join(path, "models", "model.pt")):
                task = task_class(path, self.conf)
                if task.is_valid():
                    infers[name] = task
        return infers

    def init_trainers(self) -> dict[str, TrainTask]:
        return {name: SemiSupervisedTrainTask(path, self.conf) for name, path in self.bundles.items()}

    def init_strategies(self) -> dict[str, Strategy]:
        """MONAI Label's ``random`` and ``first``, and ``ple_disagreement`` (of the first bundle):
        :py:class:`~monai_mlbseg.monailabel.MostDisagreement`."""
        first_bundle = next(iter(self.bundles.values()))
        return {"random": Random(), "first": First(), "ple_disagreement": MostDisagreement(self._scoring(first_bundle))}

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        """``ple_disagreement`` scores of every bundle's unlabeled studies (``POST /scoring/<name>``)."""
        return {f"ple_disagreement_{name}": self._scoring(path) for name, path in self.bundles.items()}

    def _scoring(self, path: str) -> PLEDisagreementScoring:
        if path not in self._scorings:
            self._scorings[path] = PLEDisagreementScoring(path)
        return self._scorings[path]

    def _refresh_infers(self) -> None:
        """Offer the models whose weights appeared since the server started (written by a ``/train``)."""
        trained = {n for n, p in self.bundles.items() if os.path.isfile(os.path.join(p, "models", "model.pt"))}
        if set(self._infers) != trained:
            self._infers = self.init_infers()

    def info(self) -> dict[str, Any]:
        self._refresh_infers()
        return super().info()

    def infer(self, request: Mapping[str, Any], datastore: Any = None) -> dict[str, Any]:
        self._refresh_infers()
        return super().infer(request, datastore)


def write_app(folder: str | os.PathLike, bundles: tuple[str, ...] = ("mlbseg_la",)) -> Path:
    """
    Write a MONAI Label app folder: ``main.py`` (:py:data:`MAIN`) and each bundle under ``model/<name>/``. An
    existing bundle folder keeps its ``models/`` (trained weights) and ``work/`` (runs); its configs are replaced.

    Args:
        folder: the app folder (created).
        bundles: names of :py:data:`~monai_mlbseg.bundles.BUNDLE_NAMES`.

    Returns:
        the app folder.

    Raises:
        ValueError: for an unknown bundle name.

    Example::

        write_app("apps/mlbseg")  # then: monailabel start_server --app apps/mlbseg --studies studies
    """
    unknown = [b for b in bundles if b not in BUNDLE_NAMES]
    if unknown:
        raise ValueError(f"unknown bundle(s) {unknown}; choose among {list(BUNDLE_NAMES)}.")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "main.py", MAIN)
    for name in bundles:
        target = folder / "model" / name
        shutil.rmtree(target / "configs", ignore_errors=True)
        write_bundle(name, target)
    return folder
