"""Unlabeled terms, a part kind of stage 2: weighted losses on the unlabeled views (and on the labeled views)."""

from __future__ import annotations

import torch
from torch import nn

from monai_mlbseg.losses import MeanTeacherLoss, ViewConsistencyLoss

from .context import LabeledViews, Stage2Context
from .host import Stage2Host

__all__ = ["MeanTeacherTerm", "UnlabeledTerm", "ViewConsistencyTerm"]


class UnlabeledTerm:
    """
    One weighted loss on the unlabeled views, reported as ``engine.state.output[name]`` (unweighted). A term may
    also act on the labeled views (:py:meth:`clean`, ``None``: it does not); that part joins the labeled loss with
    the same weight. A term sees only the iteration's context and the labeled views.

    Args:
        weight: the term's weight in the step's loss (and in the labeled loss), at least 0.

    Raises:
        ValueError: when ``weight`` is negative.

    Example::

        class Entropy(UnlabeledTerm):
            name = "loss_entropy"

            def __call__(self, ctx):
                p = ctx.probs.clamp(1e-6, 1 - 1e-6)
                return -(p * p.log() + (1 - p) * (1 - p).log()).mean()
    """

    name = "loss_term"

    def __init__(self, weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError(f"the weight of {type(self).__name__} must be >= 0, got {weight}.")
        self.weight = float(weight)

    def attach(self, host: Stage2Host) -> None:
        """Prepare what a term that acts (e.g. one with a fitted model) needs from the engine (default: nothing)."""

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx).")

    def clean(self, views: LabeledViews) -> torch.Tensor | None:
        """The term on the labeled views (``None``: none)."""
        return None


class ViewConsistencyTerm(UnlabeledTerm):
    """
    L_pc: the student's predictions of the views of one image agree
    (:py:class:`~monai_mlbseg.losses.ViewConsistencyLoss`); on the labeled views too.
    """

    name = "loss_pc"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.loss = ViewConsistencyLoss()

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return self.loss(ctx.probs, ctx.unlabeled.params, ctx.ple.back)

    def clean(self, views: LabeledViews) -> torch.Tensor:
        return self.loss(views.probs, views.batch.params)


class MeanTeacherTerm(UnlabeledTerm):
    """
    L_mt: the student against the mean teacher's prediction of the same views (the unperturbed views, while the
    student may see a perturbation of them: weak-to-strong consistency). On the labeled views the squared
    difference, whatever ``loss``.

    Args:
        weight: the term's weight.
        loss: ``loss(student_probs, teacher_probs)`` on the unlabeled views; default
            :py:class:`~monai_mlbseg.losses.MeanTeacherLoss` (squared difference, the reference);
            :py:class:`~monai_mlbseg.losses.ConfidentPseudoLabelLoss` trains on the teacher's confident pseudo labels.
    """

    name = "loss_mt"

    def __init__(self, weight: float = 1.0, loss: nn.Module | None = None) -> None:
        super().__init__(weight)
        self.clean_loss = MeanTeacherLoss()
        self.loss = self.clean_loss if loss is None else loss

    def target(self, ctx: Stage2Context) -> torch.Tensor:
        """The teacher's target on the unlabeled views: its prediction of each view."""
        return ctx.teacher_probs()

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return self.loss(ctx.probs, self.target(ctx))

    def clean(self, views: LabeledViews) -> torch.Tensor:
        return self.clean_loss(views.probs, views.teacher_probs())
