"""The regularisers of MLB-Seg: view consistency (L_pc) and mean teacher (L_mt, squared or confident pseudo labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from monai_mlbseg.transforms.functional import ViewParams, map_view_pairs, view_pairs, warp_from_views

__all__ = ["ViewConsistencyLoss", "MeanTeacherLoss", "ConfidentPseudoLabelLoss"]


def _reduce(values: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == LossReduction.MEAN.value:
        return values.mean()
    if reduction == LossReduction.SUM.value:
        return values.sum()
    return values


class ViewConsistencyLoss(_Loss):
    """
    L_pc: for every pair of views ``k < l``, the pixel-mean squared difference between ``p_k`` and ``p_l`` mapped
    into view ``k``'s frame through the original frame, ``A_k(A_l^-1(p_l))``; the mapped partner is detached.

    Args:
        sigmoid: apply a sigmoid to the input first (pass logits); default: the input is probabilities.
        reduction: ``"mean"`` (mean over pairs and images: the loss of the method), ``"sum"``, or ``"none"``
            (``[B, P]``, the pixel-mean per image and pair, ``P = K (K - 1) / 2``).

    Example::

        views = PLEViews(spatial_dims=2)
        probs = torch.sigmoid(net(views(images)))
        l_pc = ViewConsistencyLoss()(probs, views.params)
    """

    def __init__(self, sigmoid: bool = False, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.sigmoid = sigmoid

    def forward(self, input: torch.Tensor, params: ViewParams, back: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            input: ``[B * K, C, *S]`` view probabilities (or logits with ``sigmoid=True``).
            params: the views the input was computed on.
            back: optional ``A_l^-1(p_l)`` of every view, already computed (e.g. by
                :py:func:`~monai_mlbseg.transforms.ple_pseudo_labels`); detached either way.

        Raises:
            ValueError: when the input does not match ``params`` or there are fewer than two views.
        """
        if params.num_views < 2:
            raise ValueError(f"view consistency needs at least 2 views, got {params.num_views}.")
        probs = torch.sigmoid(input) if self.sigmoid else input
        if back is None:
            back = warp_from_views(probs.detach(), params)
        partners = map_view_pairs(back.detach(), params)
        ks, _ = view_pairs(params.num_views)
        batch, num_pairs = params.batch_size, len(ks)
        anchors = probs.reshape(batch, params.num_views, *probs.shape[1:])[:, ks]
        diff = (anchors - partners.reshape(batch, num_pairs, *probs.shape[1:])) ** 2
        return _reduce(diff.flatten(2).mean(dim=2), self.reduction)


class MeanTeacherLoss(_Loss):
    """
    L_mt: mean squared difference between the student's and the teacher's probabilities; the teacher is detached.

    Args:
        sigmoid: apply a sigmoid to both inputs first (pass logits).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (element-wise).
    """

    def __init__(self, sigmoid: bool = False, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.sigmoid = sigmoid

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: student output, any shape.
            target: teacher output, same shape (no gradient flows into it).

        Raises:
            ValueError: when the shapes differ.
        """
        if input.shape != target.shape:
            raise ValueError(f"student {tuple(input.shape)} and teacher {tuple(target.shape)} shapes differ.")
        if self.sigmoid:
            input, target = torch.sigmoid(input), torch.sigmoid(target)
        return _reduce((input - target.detach()) ** 2, self.reduction)


class ConfidentPseudoLabelLoss(_Loss):
    """
    L_mt as confident pseudo labels (FixMatch's unlabeled loss, for binary segmentation): the BCE of the student
    against the teacher's thresholded prediction ``1[t > 0.5]``, counted only where the teacher is confident,
    ``max(t, 1 - t) >= threshold``; elsewhere the element contributes 0. The teacher is detached. With
    ``reduction="mean"`` the sum is divided by the number of all elements, confident or not, so the term shrinks
    as the teacher grows less sure.

    Args:
        threshold: the teacher's confidence needed, in ``[0.5, 1]``.
        sigmoid: the student's input is logits (BCE with logits) instead of probabilities; the target is always
            the teacher's probabilities.
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (element-wise, 0 where the teacher is not confident).

    Raises:
        ValueError: when ``threshold`` is outside ``[0.5, 1]``.

    Example::

        loss = ConfidentPseudoLabelLoss(threshold=0.95)
        l_mt = loss(torch.sigmoid(student(augment(views))), torch.sigmoid(teacher(views)))
    """

    def __init__(
        self, threshold: float = 0.95, sigmoid: bool = False, reduction: LossReduction | str = LossReduction.MEAN
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if not 0.5 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0.5, 1], got {threshold}.")
        self.threshold = float(threshold)
        self.sigmoid = sigmoid

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            input: student probabilities (logits with ``sigmoid=True``), any shape.
            target: teacher probabilities, same shape (no gradient flows into it).

        Raises:
            ValueError: when the shapes differ.
        """
        if input.shape != target.shape:
            raise ValueError(f"student {tuple(input.shape)} and teacher {tuple(target.shape)} shapes differ.")
        target = target.detach()
        hard = (target > 0.5).to(input.dtype)
        confident = (torch.maximum(target, 1 - target) >= self.threshold).to(input.dtype)
        if self.sigmoid:
            bce = F.binary_cross_entropy_with_logits(input, hard, reduction="none")
        else:
            bce = F.binary_cross_entropy(input.clamp(1e-6, 1 - 1e-6), hard, reduction="none")
        return _reduce(bce * confident, self.reduction)
