"""Active learning from the method's own uncertainty: the unlabeled study whose PLE views disagree most is labeled
next."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.datastore import Datastore, DefaultLabelTag
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from monai_mlbseg.data import get_format
from monai_mlbseg.engines import load_weights
from monai_mlbseg.inferers import ple_disagreement

from .train import STUDY_FORMATS

__all__ = ["PLEDisagreementScoring", "MostDisagreement", "SCORE_KEY"]

logger = logging.getLogger(__name__)

#: where a study's score is kept in the datastore's image info, with the weights' time it was computed with
SCORE_KEY = "mlbseg_ple_disagreement"


class PLEDisagreementScoring(ScoringMethod):
    """
    Scores every unlabeled study with :py:func:`~monai_mlbseg.inferers.ple_disagreement` of the bundle's current
    model (``models/model.pt``, its ``inference.json`` network and slice inferer, the studies' NIfTI loading of
    :py:data:`~monai_mlbseg.monailabel.STUDY_FORMATS`), and keeps the score
    in the datastore's image info under :py:data:`SCORE_KEY` with the weights' modification time: a study is scored
    again only when the model changed since.

    Args:
        bundle: the bundle folder (``<app>/model/<name>``).
        device: where the network runs.

    Example::

        scoring = PLEDisagreementScoring("apps/mlbseg/model/mlbseg_la")
        scores = scoring({}, datastore)  # {"s3": 0.021, "s4": 0.034}
    """

    def __init__(self, bundle: str, device: str = "cpu") -> None:
        super().__init__("disagreement of the PLE views of the current model (MLB-Seg's pseudo-label ensemble)")
        self.bundle = bundle
        self.device = torch.device(device)
        self.model = os.path.join(bundle, "models", "model.pt")
        self._parser: ConfigParser | None = None

    def _config(self) -> ConfigParser:
        if self._parser is None:
            parser = ConfigParser()
            parser.read_config(os.path.join(self.bundle, "configs", "inference.json"))
            parser["bundle_root"] = self.bundle
            parser["data_format"] = STUDY_FORMATS[get_format(parser["data_format"]).anatomy]  # NIfTI studies
            self._parser = parser
        return self._parser

    def score(self, image: str, network: torch.nn.Module) -> float:
        """The disagreement of ``network`` on the study file ``image``."""
        parser = self._config()
        data = parser.get_parsed_content("preprocessing")({"image": image})
        return ple_disagreement(network, data["image"].to(self.device), parser.get_parsed_content("inferer"))

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, float]:
        """
        Score the unlabeled studies of ``datastore`` that have no score from the current model.

        Returns:
            study id -> score, for every unlabeled study (empty without a model).
        """
        if not os.path.isfile(self.model):
            logger.info(f"no {self.model} yet: the studies are not scored")
            return {}
        stamp = os.path.getmtime(self.model)
        network: torch.nn.Module | None = None
        scores = {}
        for image_id in datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value):
            kept = datastore.get_image_info(image_id).get(SCORE_KEY, {})
            if kept.get("model_ts") == stamp:
                scores[image_id] = float(kept["score"])
                continue
            if network is None:
                network = self._config().get_parsed_content("network_def").to(self.device)
                load_weights(network, self.model, map_location=self.device).eval()
            scores[image_id] = self.score(datastore.get_image_uri(image_id), network)
            datastore.update_image_info(image_id, {SCORE_KEY: {"score": scores[image_id], "model_ts": stamp}})
        return scores


class MostDisagreement(Strategy):
    """
    The next study to label: the unlabeled study with the highest :py:class:`PLEDisagreementScoring` score (scored
    on demand for the current model). Without a model yet, the first unlabeled study.

    Args:
        scoring: the scoring of the bundle.

    Example::

        strategies = {"ple_disagreement": MostDisagreement(PLEDisagreementScoring(bundle))}
    """

    def __init__(self, scoring: PLEDisagreementScoring) -> None:
        super().__init__("the unlabeled study whose PLE views disagree most (the method's own uncertainty)")
        self.scoring = scoring

    def __call__(self, request: Mapping[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        scores = self.scoring(request, datastore)
        if not scores:
            unlabeled = sorted(datastore.get_unlabeled_images(DefaultLabelTag.FINAL.value))
            return {"id": unlabeled[0], "weight": 0.0} if unlabeled else None
        best = max(sorted(scores), key=lambda image_id: scores[image_id])
        logger.info(f"most disagreement: {best} ({scores[best]:.4f}) among {len(scores)} unlabeled studies")
        return {"id": best, "weight": scores[best]}
