"""MONAI Label train task: the bundle's whole semi-supervised training on a datastore's labeled and unlabeled
studies."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.tasks.train.bundle import BundleTrainTask

from monai_mlbseg.data import get_format
from monai_mlbseg.recipe import training_workflow
from monai_mlbseg.utils import MANIFEST_FILE, atomic_write_json, run_fingerprint

__all__ = ["SemiSupervisedTrainTask", "STUDY_FORMATS", "TRAIN_OPTIONS"]

logger = logging.getLogger(__name__)

#: the data format of a MONAI Label studies folder (NIfTI images, binary labels) per anatomy of the bundle
STUDY_FORMATS = {"la": "msd_heart", "prostate": "msd_prostate"}

#: the bundle's top-level ids a ``/train`` request may set (3D Slicer's MONAI Label panel shows them), besides
#: ``device`` and ``pretrained``; ``train_options`` in the bundle's ``train.json`` gives their defaults (not MONAI
#: Label's ``displayable_configs``: its generic ``BundleTrainTask`` requires every such key in each request)
TRAIN_OPTIONS = ("stage2_method", "stage2_steps", "stage1_iterations", "use_unlabeled")

#: MONAI Label's generic train options that the bundle's run replaces: its budget is in iterations and optimizer
#: steps, its validation is the bundle's own (none in a studies folder), it trains on one device
_REPLACED = ("max_epochs", "val_split", "multi_gpu", "gpus", "tracking", "tracking_uri", "tracking_experiment_name")


def _value(value: Any) -> Any:
    """A request value as the bundle takes it: a drop-down's list of choices means its first (the default)."""
    return value[0] if isinstance(value, (list, tuple)) and value else value


class SemiSupervisedTrainTask(BundleTrainTask):
    """
    The bundle's training on a MONAI Label datastore: the studies with a final label are the labeled cases, the
    others (``Datastore.get_unlabeled_images``, read through ``get_image_uri``, so remote datastores that fetch on
    demand work too) the unlabeled ones. It runs what ``python -m monai.bundle run training`` runs: the data check,
    stage 1, the initial labels and stage 2 with the bundle's method, in a run folder keyed by the content of those
    studies (a new label, or a label corrected in 3D Slicer, is a new run; the same studies resume).

    Differences from MONAI Label's ``BundleTrainTask``, on purpose:

    - the budget is the bundle's (``stage1_iterations``, ``stage2_steps``), not epochs of the labeled loader;
    - no labeled study is held out for validation: with a handful of labels every one trains, ``models/model.pt`` is
      the final model, and the log says so;
    - ``pretrained`` starts the run from the current ``models/model.pt`` through the bundle's ``init_weights``
      (before stage 1, so the stage-2 teacher starts from the weights actually loaded), instead of a checkpoint
      loader inserted among stage 2's handlers;
    - ``use_unlabeled`` false is the supervised-only path: stage 2 on the labeled studies, no stage 1 or bootstrap.

    Args:
        path: the bundle folder (``<app>/model/<name>``).
        conf: the app's configuration (``--conf`` of ``monailabel start_server``).
        data_format: the studies' data format; default: the NIfTI format of the bundle's anatomy
            (:py:data:`STUDY_FORMATS`).

    Example::

        trainers = {"mlbseg_la": SemiSupervisedTrainTask(os.path.join(app_dir, "model", "mlbseg_la"), conf)}
    """

    def __init__(self, path: str, conf: Mapping[str, str], data_format: str | None = None) -> None:
        super().__init__(path, dict(conf))
        if not self.valid:
            return
        bundle_format = self.bundle_config.get("data_format")
        self.data_format = data_format or STUDY_FORMATS[get_format(bundle_format).anatomy]

    def config(self) -> dict[str, Any]:
        """The options of a ``/train`` request: device, pretrained, and the bundle's ``train_options``."""
        options = {k: v for k, v in super().config().items() if k not in _REPLACED and k != "run_id"}
        options.pop("model_filename", None)
        options.update(self.bundle_config.get_parsed_content("train_options", instantiate=True))
        return options

    def datalist(self, datastore: Datastore, use_unlabeled: bool = True) -> dict[str, list[dict[str, str]]]:
        """
        The bundle's datalist of ``datastore``: ``labeled`` (studies with a final label) and ``unlabeled`` (the
        others, empty when ``use_unlabeled`` is false), each with its ``case_id`` (the study id) and absolute paths.
        """
        final = DefaultLabelTag.FINAL.value
        labeled = []
        for image_id in sorted(datastore.get_labeled_images(final)):
            label_id = datastore.get_label_by_image_id(image_id, final)
            labeled.append(
                {
                    "case_id": image_id,
                    "image": os.path.abspath(datastore.get_image_uri(image_id)),
                    "label": os.path.abspath(datastore.get_label_uri(label_id, final)),
                }
            )
        unlabeled = []
        if use_unlabeled:
            for image_id in sorted(datastore.get_unlabeled_images(final)):
                unlabeled.append({"case_id": image_id, "image": os.path.abspath(datastore.get_image_uri(image_id))})
        return {"labeled": labeled, "unlabeled": unlabeled}

    def overrides(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        """
        The bundle overrides of a ``/train`` request: the datalist (written to ``work/monailabel_datalist_*.json``),
        the data folder it lies in, the options of :py:data:`TRAIN_OPTIONS`, the device and the initial weights.
        """
        defaults = self.config()
        settings = {k: _value(request.get(k, defaults.get(k))) for k in TRAIN_OPTIONS if k in request or k in defaults}
        use_unlabeled = bool(settings.get("use_unlabeled", True))
        datalist = self.datalist(datastore, use_unlabeled)
        files = [item[k] for split in datalist.values() for item in split for k in ("image", "label") if k in item]
        root = os.path.commonpath([os.path.dirname(f) for f in files]) if files else os.getcwd()
        folder = Path(self.bundle_path, "work")
        folder.mkdir(parents=True, exist_ok=True)
        datalist_file = folder / f"monailabel_datalist_{run_fingerprint(datalist)}.json"
        atomic_write_json(datalist_file, {"format": self.data_format, **datalist})
        model = Path(self.bundle_path, "models", self.const.model_pytorch())
        pretrained = bool(_value(request.get("pretrained", True)))
        logger.info(
            f"training on {len(datalist['labeled'])} labeled studies (all of them: no validation split, "
            f"models/model.pt is the final model) and {len(datalist['unlabeled'])} unlabeled studies"
            + (f", starting from {model}" if pretrained and model.is_file() else "")
        )
        return {
            "bundle_root": self.bundle_path,
            "dataset_dir": root,
            "data_format": self.data_format,
            "datalist_file": str(datalist_file),
            "allow_outside": True,
            "device": str(_value(request.get("device", "cpu"))),
            "init_weights": str(model) if pretrained and model.is_file() else None,
            **settings,
        }

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any]:
        """
        Run the bundle's training on ``datastore``'s studies.

        Returns:
            the run's folder, the studies it trained on (from its data manifest), the weights it started from and
            its settings.
        """
        overrides = self.overrides(request, datastore)
        logger.info(f"train request {dict(request)}: bundle overrides {overrides}")
        workflow = training_workflow(self.bundle_path, overrides)
        workflow.run()
        run_dir = Path(workflow.parser.get_parsed_content("run_dir"))
        workflow.finalize()
        manifest = json.loads((run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        return {
            "run_dir": str(run_dir),
            "labeled": [e["image"] for e in manifest["splits"].get("labeled", [])],
            "unlabeled": [e["image"] for e in manifest["splits"].get("unlabeled", [])],
            "started_from": overrides["init_weights"],
            "settings": {k: overrides[k] for k in TRAIN_OPTIONS if k in overrides},
        }
