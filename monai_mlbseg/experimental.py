"""
Stage-2 parts that measured no gain on real left-atrium scans (``docs/results.md``), kept for experiments and not
used by any named method or bundle. Each docstring gives its measured effect; each plugs into
:py:class:`~monai_mlbseg.engines.MetaTrainer` like the parts of :py:mod:`monai_mlbseg.engines.parts`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from torch import nn

from monai_mlbseg.engines.context import Stage2Context
from monai_mlbseg.engines.guards import check_finite
from monai_mlbseg.engines.parts import JointStep, MeanTeacherTerm, MetaWeighting, StepLosses, UnlabeledTerm
from monai_mlbseg.transforms import ple_pseudo_labels, random_box_masks

if TYPE_CHECKING:
    from monai_mlbseg.engines import MetaTrainer

__all__ = [
    "AgreementMetaWeighting",
    "CopyPasteTerm",
    "EnsembleMeanTeacherTerm",
    "PerTermClippedJointStep",
    "SignMetaWeighting",
    "freeze_batch_norm",
]


class SignMetaWeighting(MetaWeighting):
    """
    Meta weights with every pixel whose meta-gradient agrees weighted alike (summing to 1), instead of in proportion
    to it. Measured (results.md finding 5, seed 0, 64 px): the weight on a wrong initial-label pixel falls to 1.06x
    that on a right one (12-18x with the reference's rule), but validation Dice is 0.86 below the reference's
    weights and 2.57 below labeled-only training; at 32 clean slices (finding 16) -0.27 against labeled-only.
    """

    rule = "sign"


class AgreementMetaWeighting(MetaWeighting):
    """
    The reference's meta weights scaled to sum to the agreeing share of the meta-gradient mass (at most 1), so the
    weighted term shrinks when the meta-gradient disagrees. Measured (finding 9, seed 0, with one joint step):
    79.09 against 79.07 Dice for the reference's weights, 2.11 below labeled-only training (4/16 cases better).
    """

    rule = "agreement"


class EnsembleMeanTeacherTerm(MeanTeacherTerm):
    """
    L_mt against the PLE ensemble of the teacher's views (mapped back, averaged, warped into every view, soft)
    instead of each view's own teacher prediction; no extra forward. Measured only on the demo's synthetic volumes
    (results.md finding 31, seed 0): +0.9 Dice over the clipped 0.2.0 default there, still 2.2 below the control; not
    measured on real scans.
    """

    def target(self, ctx: Stage2Context) -> torch.Tensor:
        return ple_pseudo_labels(ctx.teacher_probs(), ctx.unlabeled.params, threshold=None).pseudo_labels


class CopyPasteTerm(UnlabeledTerm):
    """
    L_mix: each unlabeled view gets a box (sides ``fraction`` of the image's) of a clean view pasted in, and the
    student is trained with BCE on the mixed image against the mixed target: the expert label inside the box, the
    mean teacher's thresholded prediction (the PLE pseudo label without a teacher) outside it. It costs one more
    student forward and backward. Measured (finding 17, seed 0, 64 px, weight 1): MLB-Seg -1.21 and the mean
    teacher -2.09 Dice against labeled-only training; no better at 1200 steps.

    Args:
        weight: the term's weight.
        fraction: the side of the pasted box relative to the image's, in ``(0, 1]``.

    Raises:
        ValueError: when ``fraction`` is outside ``(0, 1]``.
    """

    name = "loss_mix"

    def __init__(self, weight: float = 1.0, fraction: float = 2 / 3) -> None:
        super().__init__(weight)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must lie in (0, 1], got {fraction}.")
        self.fraction = float(fraction)

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        clean, views = ctx.clean(), ctx.unlabeled.views
        pick = torch.arange(views.shape[0], device=views.device) % clean.views.shape[0]
        box = random_box_masks(views.shape[0], views.shape[2:], self.fraction, device=views.device)
        trainer = ctx.trainer
        teacher = ctx.teacher_probs() if trainer.mean_teacher is not None else None
        outside = ctx.pseudo if teacher is None else (teacher > trainer.threshold).float()
        images = box * clean.views[pick] + (1 - box) * views
        targets = box * clean.labels[pick] + (1 - box) * outside
        return F.binary_cross_entropy_with_logits(trainer.forward(images), targets)


class PerTermClippedJointStep(JointStep):
    """
    One joint step whose clean gradient and unlabeled gradient (weighted term plus unlabeled terms) are each clipped
    to the trainer's ``grad_clip``, then added, as the reference's two steps are clipped each on its own. It costs
    one more gradient buffer. Measured (finding 29, seed 0, 64 px, clip 0.2): 82.39 against 82.91 Dice for one clip
    of the sum; on the demo +0.4 (finding 31).
    """

    def weighted_step(self, trainer: MetaTrainer, losses: StepLosses) -> None:
        unlabeled = losses.weighted if losses.unlabeled is None else losses.weighted + losses.unlabeled
        terms = [unlabeled, losses.joint]
        check_finite(sum(terms), trainer, "weighted-step loss")
        params = [p for p in trainer.network.parameters() if p.requires_grad]
        scale = trainer.scaler.get_scale() if trainer.scaler is not None else 1.0
        total = [torch.zeros_like(p) for p in params]
        for term in terms:
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term * scale, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g / scale for g, p in zip(grads, params)]
            if trainer.grad_clip is not None:  # the coefficient of torch.nn.utils.clip_grad_norm_
                coef = torch.clamp(trainer.grad_clip / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
                grads = [g * coef for g in grads]
            total = [t + g for t, g in zip(total, grads)]
        trainer.optimizer.zero_grad(set_to_none=trainer.optim_set_to_none)
        for p, g in zip(params, total):
            p.grad = g * scale
        trainer.fire_event(IterationEvents.BACKWARD_COMPLETED)
        trainer.clip_and_step(scaled=trainer.scaler is not None, clip=False)


def freeze_batch_norm(network: nn.Module) -> nn.Module:
    """
    Keep every BatchNorm layer of ``network`` in eval mode whatever ``train()`` asks, so that it normalises with
    its running (stage-1) statistics and never updates them; its affine parameters still train. Apply it before the
    trainer is built, so that the mean teacher's copy is frozen too. Measured (finding 4, seed 0, 64 px): 4.9 Dice
    below the reference's train-mode statistics.

    Args:
        network: the network, changed in place.

    Returns:
        ``network``.

    Example::

        net = freeze_batch_norm(NestedUNet(2))
    """
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, _FrozenBatchNorm):
            module.__class__ = _frozen_class(type(module))
            module.eval()
    return network


class _FrozenBatchNorm:
    """Marks a frozen BatchNorm class; ``train(mode)`` always switches to eval."""

    def train(self, mode: bool = True) -> nn.Module:
        return super().train(False)  # type: ignore[misc]


_FROZEN: dict[type, type] = {}


def _frozen_class(kind: type) -> type:
    if kind not in _FROZEN:
        _FROZEN[kind] = type(f"Frozen{kind.__name__}", (_FrozenBatchNorm, kind), {"__module__": __name__})
    return _FROZEN[kind]
