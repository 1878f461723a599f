"""Ground-truth monitoring of stage 2 as a handler: how the labels and the weights agree with the truth."""

from __future__ import annotations

from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from monai_mlbseg.evaluation import dice_score, selection_auc
from monai_mlbseg.transforms import warp_to_views

__all__ = ["GroundTruthMonitor"]


class GroundTruthMonitor:
    """
    Adds to ``engine.state.output`` of every :py:class:`~monai_mlbseg.engines.MetaTrainer` iteration whose
    unlabeled batch carries a ground truth under ``gt_key``: the Dice against it of the initial labels
    (``dice_initial_gt``), the PLE pseudo labels (``dice_pseudo_gt``) and the student's prediction
    (``dice_pred_gt``), all in the views, and, for every label source ``<name>``, how its weights select: the AUC of
    its weights separating its right pixels from its wrong ones (``auc_<name>``, 0.5: no selection) and the mean
    weight of its wrong and of its right pixels, in units of the uniform weight ``1 / numel``
    (``weight_<name>_when_wrong`` / ``_when_right``). The ground truth only monitors: nothing of it reaches the
    training.

    Args:
        gt_key: key of the ground truth in an unlabeled batch.

    Example::

        GroundTruthMonitor("gt").attach(trainer)
    """

    def __init__(self, gt_key: str = "gt") -> None:
        self.gt_key = gt_key

    def attach(self, engine: Engine) -> None:
        """Run at every ``MODEL_COMPLETED``, when the iteration's context is still on ``engine.state.stage2``."""
        engine.add_event_handler(IterationEvents.MODEL_COMPLETED, self)

    @torch.no_grad()
    def __call__(self, engine: Any) -> None:
        ctx, batch = getattr(engine.state, "stage2", None), engine.state.batch
        if ctx is None or not isinstance(batch, dict) or batch.get(self.gt_key) is None:
            return
        output = engine.state.output
        gt = batch[self.gt_key]
        gt = (gt.as_tensor() if hasattr(gt, "as_tensor") else torch.as_tensor(gt)).to(ctx.probs.device).float()
        gt_views = warp_to_views(gt, ctx.unlabeled.params, threshold=ctx.threshold)
        initial = ctx.unlabeled.labels
        output["dice_initial_gt"] = dice_score(initial, gt_views)
        output["dice_pseudo_gt"] = dice_score(ctx.pseudo, gt_views)
        output["dice_pred_gt"] = dice_score((ctx.probs > ctx.threshold).float(), gt_views)
        maps = engine.state.weight_maps
        for i, (name, source) in enumerate(maps["sources"].items()):
            right = (source > 0.5) == (gt_views > 0.5)
            weight = maps["weights"][:, i : i + 1]
            output[f"auc_{name}"] = selection_auc(weight, right)
            if 0 < right.sum() < right.numel():
                output[f"weight_{name}_when_wrong"] = float(weight[~right].mean() * weight.numel())
                output[f"weight_{name}_when_right"] = float(weight[right].mean() * weight.numel())
