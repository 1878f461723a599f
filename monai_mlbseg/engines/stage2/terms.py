"""Unlabeled terms, a part kind of stage 2: weighted losses on the unlabeled views (and on the labeled views)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from monai_mlbseg.losses import MeanTeacherLoss, ViewConsistencyLoss
from monai_mlbseg.transforms import random_box_masks

from .context import LabeledViews, Stage2Context
from .host import Stage2Host

__all__ = ["BidirectionalCopyPasteTerm", "MeanTeacherTerm", "UnlabeledTerm", "ViewConsistencyTerm", "weighted_dice_bce"]


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


def weighted_dice_bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """
    The mean of a pixel-weighted binary cross-entropy and a pixel-weighted soft Dice loss, each averaged over the
    batch: ``BCE = sum(w * bce) / sum(w)`` and ``Dice = 1 - (2 sum(w p t) + 1) / (sum(w p) + sum(w t) + 1)`` per
    image, ``p`` the sigmoid of ``logits``.

    Args:
        logits: ``[N, 1, *S]`` logits.
        target: ``[N, 1, *S]`` targets in ``[0, 1]``.
        weight: ``[N, 1, *S]`` non-negative pixel weights.

    Returns:
        the scalar loss.
    """
    dims = tuple(range(1, logits.dim()))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (weight * bce).sum(dims) / weight.sum(dims).clamp_min(1e-6)
    probs = torch.sigmoid(logits)
    overlap = (weight * probs * target).sum(dims)
    dice = 1 - (2 * overlap + 1) / ((weight * probs).sum(dims) + (weight * target).sum(dims) + 1)
    return 0.5 * (bce + dice).mean()


class BidirectionalCopyPasteTerm(UnlabeledTerm):
    """
    Bidirectional copy-paste between labeled and unlabeled views (BCP, Bai et al., CVPR 2023). For the ``i``-th
    labeled view and the ``i``-th unlabeled one, a random box (each side ``box`` of the view's) of the labeled view is
    replaced by the unlabeled one's pixels (and the same box of the unlabeled view by the labeled one's); the student's
    prediction of both mixed images learns the mixed target: the expert label where the labeled view's pixels are
    (weight 1) and the mean teacher's label of the unlabeled view where its pixels are (weight ``unlabeled_weight``),
    with :py:func:`weighted_dice_bce`. The unlabeled side is what the student saw of the unlabeled views and the
    teacher's labels moved like its pixels, so the term holds whatever the student's perturbation; the teacher's
    label is its probability above the views' threshold.

    On the labeled views alone (:py:meth:`clean`, the part a matched control keeps) it is the same mix between each
    labeled view and the previous one of the batch, with expert labels on both sides: the control sees the same
    mixing of its own images. Unlike :py:class:`monai_mlbseg.experimental.CopyPasteTerm` (labeled boxes pasted into
    the unlabeled views only, BCE, no labeled counterpart: it measured no gain), the mix goes both ways and the
    matched control gets its own.

    Args:
        weight: the term's weight.
        unlabeled_weight: the weight of the teacher's labels against the expert's, in ``[0, 1]`` (BCP's 0.5).
        box: a side of the box as a fraction of the view's side, in ``(0, 1)`` (BCP's 2/3).

    Raises:
        ValueError: for an ``unlabeled_weight`` or ``box`` out of range.

    Example::

        trainer = MetaTrainer(..., **{**parts, "terms": [*parts["terms"], BidirectionalCopyPasteTerm(1.0)]})
    """

    name = "loss_bcp"

    def __init__(self, weight: float = 1.0, unlabeled_weight: float = 0.5, box: float = 2 / 3) -> None:
        super().__init__(weight)
        if not 0 <= unlabeled_weight <= 1:
            raise ValueError(f"unlabeled_weight must be in [0, 1], got {unlabeled_weight}.")
        if not 0 < box < 1:
            raise ValueError(f"box must be in (0, 1), got {box}.")
        self.unlabeled_weight, self.box = float(unlabeled_weight), float(box)

    def boxes(self, like: torch.Tensor) -> torch.Tensor:
        """``[N, 1, *S]``: 1 inside one random box per image of ``like`` (``torch``'s global generator), else 0."""
        return random_box_masks(like.shape[0], like.shape[2:], self.box, device=like.device).to(like.dtype)

    def mixed_loss(
        self,
        student: Callable[[torch.Tensor], torch.Tensor],
        a: tuple[torch.Tensor, torch.Tensor, float],
        b: tuple[torch.Tensor, torch.Tensor, float],
    ) -> torch.Tensor:
        """
        The loss of the student's prediction of both mixes of ``a`` and ``b`` (each ``(images, targets, weight)``,
        paired by index): ``b`` pasted into ``a`` inside the boxes, and ``a`` into ``b``.
        """
        (xa, ya, wa), (xb, yb, wb) = a, b
        inside = self.boxes(xa)
        outside = 1 - inside
        images = torch.cat([xa * outside + xb * inside, xb * outside + xa * inside])
        targets = torch.cat([ya * outside + yb * inside, yb * outside + ya * inside])
        weights = torch.cat([wa * outside + wb * inside, wb * outside + wa * inside])
        return weighted_dice_bce(student(images).float(), targets, weights)

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        clean = ctx.clean()
        n = min(ctx.student_views.shape[0], clean.views.shape[0])
        teacher = (ctx.teacher_probs() > ctx.threshold).float()
        labeled = (clean.views[:n], clean.labels[:n].float(), 1.0)
        unlabeled = (ctx.student_views[:n].detach(), teacher[:n], self.unlabeled_weight)
        return self.mixed_loss(ctx.student, labeled, unlabeled)

    def clean(self, views: LabeledViews) -> torch.Tensor:
        if views.student is None:
            raise ValueError(
                "BidirectionalCopyPasteTerm needs the student's forward on the labeled views (LabeledViews.student)."
            )
        images, labels = views.batch.views, views.batch.labels.float()
        partner = (images.roll(1, 0), labels.roll(1, 0), 1.0)
        return self.mixed_loss(views.student, (images, labels, 1.0), partner)
