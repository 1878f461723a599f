"""
Stage-2 parts that measured no gain on real left-atrium scans (``docs/results.md``), kept for experiments and not
used by any named method or bundle; each docstring gives its measured effect.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.engines.utils import IterationEvents
from torch import nn

from monai_mlbseg.engines.stage2 import JointStep, MeanTeacherTerm, Stage2Context, Stage2Host, StepLosses, UnlabeledTerm
from monai_mlbseg.transforms import ple_pseudo_labels, random_box_masks
from monai_mlbseg.utils import unwrap_network

__all__ = ["CopyPasteTerm", "EnsembleMeanTeacherTerm", "PerTermClippedJointStep", "freeze_batch_norm"]


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
        teacher = ctx.teacher_probs() if ctx.has_teacher else None
        outside = ctx.pseudo if teacher is None else (teacher > ctx.threshold).float()
        images = box * clean.views[pick] + (1 - box) * views
        targets = box * clean.labels[pick] + (1 - box) * outside
        return F.binary_cross_entropy_with_logits(ctx.student(images), targets)


class PerTermClippedJointStep(JointStep):
    """
    One joint step whose clean gradient and unlabeled gradient (weighted term plus unlabeled terms) are each clipped
    to the schedule's ``grad_clip``, then added, as the reference's two steps are clipped each on its own. It costs
    one more gradient buffer and runs without the AMP grad scaler. Measured (finding 29, seed 0, 64 px, clip 0.2):
    82.39 against 82.91 Dice for one clip of the sum; on the demo +0.4 (finding 31).

    Args:
        grad_clip: the clip of each of the two gradients (``None``: none).
    """

    def weighted_step(self, host: Stage2Host, losses: StepLosses) -> None:
        unlabeled = losses.weighted if losses.unlabeled is None else losses.weighted + losses.unlabeled
        terms = [unlabeled, losses.joint]
        named = [(n, p) for n, p in unwrap_network(host.network).named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        total = [torch.zeros_like(p) for p in params]
        for term in terms:
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
            if self.grad_clip is not None:  # the coefficient of torch.nn.utils.clip_grad_norm_
                coef = torch.clamp(self.grad_clip / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
                grads = [g * coef for g in grads]
            total = [t + g for t, g in zip(total, grads)]
        by_name = {n: g for (n, _), g in zip(named, total)}
        host.apply_gradients(sum(terms), by_name, "weighted-step loss", IterationEvents.BACKWARD_COMPLETED, None)


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
