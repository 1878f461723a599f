"""Per-pixel BCE against several label sources, combined by (meta-learned) weight maps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

__all__ = ["pixel_bce", "MetaReweightLoss"]


def _stack_sources(input: torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    sources = [target] if isinstance(target, torch.Tensor) else list(target)
    if not sources:
        raise ValueError("at least one label source is needed.")
    if input.ndim < 3 or input.shape[1] != 1:
        raise ValueError(f"input must be logits [N, 1, *spatial], got shape {tuple(input.shape)}.")
    for i, source in enumerate(sources):
        if source.shape != input.shape:
            raise ValueError(
                f"label source {i} has shape {tuple(source.shape)}, but the input has shape {tuple(input.shape)}."
            )
    return torch.cat([s.to(input.dtype) for s in sources], dim=1)


def pixel_bce(input: torch.Tensor, target: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """
    Per-pixel binary cross-entropy of one logit map against every label source.

    Args:
        input: ``[N, 1, *S]`` logits.
        target: a label source ``[N, 1, *S]`` or a sequence of them (values in [0, 1]).

    Returns:
        ``[N, n_sources, *S]``, channel ``i`` the per-pixel BCE-with-logits against source ``i``.

    Raises:
        ValueError: when a shape does not match.
    """
    labels = _stack_sources(input, target)
    return F.binary_cross_entropy_with_logits(input.expand_as(labels), labels, reduction="none")


class MetaReweightLoss(_Loss):
    """
    Per-pixel BCE-with-logits against ``n`` label sources (e.g. the initial label and the pseudo label), combined by
    per-pixel weight maps:

    - with ``weights`` ``w`` (``[N, n, *S]``, non-negative): ``sum(w * l) / sum(w)``, i.e. ``sum(w * l)`` for the
      normalised maps of the meta step, and exactly 0 when all weights are 0;
    - without weights: the mean of ``l`` over pixels and sources.

    Args:
        reduction: ``"mean"`` (the weighted mean above), ``"sum"`` (``sum(w * l)`` or ``sum(l)``), or ``"none"``
            (the ``[N, n, *S]`` map ``w * l`` or ``l``).
        pixel_loss: the per-pixel loss ``l``: ``pixel_loss(logits, sources)`` -> ``[N, n, *S]`` (default
            :py:func:`pixel_bce`). A :py:class:`~monai_mlbseg.engines.MetaTrainer` differentiates this same function
            in its look-ahead.

    Raises:
        ValueError: on an unknown reduction.

    Example::

        loss = MetaReweightLoss()
        value = loss(logits, [initial_label, pseudo_label], weights)   # weights: [N, 2, H, W]
    """

    def __init__(
        self,
        reduction: LossReduction | str = LossReduction.MEAN,
        pixel_loss: Callable[[torch.Tensor, Sequence[torch.Tensor]], torch.Tensor] = pixel_bce,
    ) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        self.pixel_loss = pixel_loss

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor | Sequence[torch.Tensor],
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            input: ``[N, 1, *S]`` logits.
            target: one label source ``[N, 1, *S]`` or a sequence of ``n`` of them.
            weights: optional ``[N, n, *S]`` weight maps (treated as constants).

        Raises:
            ValueError: when shapes do not match.
        """
        losses = self.pixel_loss(input, target)
        if weights is not None:
            if weights.shape != losses.shape:
                raise ValueError(
                    f"weights must have shape {tuple(losses.shape)} ([N, n_sources, *spatial]), "
                    f"got {tuple(weights.shape)}."
                )
            losses = weights.detach().to(losses.dtype) * losses
        if self.reduction == LossReduction.NONE.value:
            return losses
        if self.reduction == LossReduction.SUM.value:
            return losses.sum()
        if weights is None:
            return losses.mean()
        total = weights.detach().sum().to(losses.dtype)
        return losses.sum() / torch.where(total > 0, total, torch.ones_like(total))
