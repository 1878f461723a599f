"""Step schedules, an acting part kind of stage 2: how an iteration's losses become optimizer steps."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from monai.engines.utils import IterationEvents

from ..events import MetaIterationEvents
from .context import Stage2Context
from .host import Stage2Host
from .weightings import MetaWeighting, WeightMaps

__all__ = ["JointStep", "LabeledOnly", "StepLosses", "StepSchedule", "TwoSteps", "WeightedStepOnly"]


def _clip(grad_clip: float | None) -> float | None:
    if grad_clip is not None and grad_clip <= 0:
        raise ValueError(f"grad_clip must be positive or None, got {grad_clip}.")
    return None if grad_clip is None else float(grad_clip)


class StepLosses(NamedTuple):
    """
    The losses of the weighted step.

    Attributes:
        weighted: the weighted term ``loss_function(logits, sources, weights)``.
        unlabeled: the weighted sum of the unlabeled terms (``None``: none).
        joint: the labeled loss when it joins this step (``None``: it does not).
        total: their sum, the step's loss.
    """

    weighted: torch.Tensor
    unlabeled: torch.Tensor | None
    joint: torch.Tensor | None
    total: torch.Tensor


class StepSchedule:
    """
    How an iteration's losses become optimizer steps: the weighted step (the iteration's model step in MONAI's
    event contract), then possibly a labeled step. The schedule owns the gradient-norm clip of its steps.

    Args:
        grad_clip: gradient-norm clip of every step (``None``: no clipping).

    Attributes:
        steps_per_iteration: optimizer steps per iteration (equal budgets compare steps, not iterations).
        uses_unlabeled: whether the schedule trains on the unlabeled views (``False``: the engine makes labeled steps
            only and never reads its unlabeled loader).

    Raises:
        ValueError: when ``grad_clip`` is not positive.
    """

    steps_per_iteration = 2
    uses_unlabeled = True

    def __init__(self, grad_clip: float | None = 0.2) -> None:
        self.grad_clip = _clip(grad_clip)

    def with_grad_clip(self, grad_clip: float | None) -> StepSchedule:
        """A copy of the schedule with another gradient clip.

        Raises:
            ValueError: when ``grad_clip`` is not positive.
        """
        schedule = copy.copy(self)
        schedule.grad_clip = _clip(grad_clip)
        return schedule

    def attach(self, host: Stage2Host) -> None:
        """Check what the schedule needs from the engine (default: nothing)."""

    def joint_loss(self, host: Stage2Host, ctx: Stage2Context) -> torch.Tensor | None:
        """A loss that joins the weighted step (and its look-ahead); default ``None``."""
        return None

    def weighted_step(self, host: Stage2Host, losses: StepLosses) -> None:
        """Backward, clip and step on ``losses.total``."""
        host.step(losses.total, "weighted-step loss", IterationEvents.BACKWARD_COMPLETED, self.grad_clip)

    def clean_step(self, host: Stage2Host, ctx: Stage2Context, weights: WeightMaps) -> torch.Tensor | None:
        """The labeled step after the weighted step; returns its loss (``None``: no labeled step)."""
        return None


class TwoSteps(StepSchedule):
    """
    The reference's iteration: the weighted step, then a labeled step on the labeled views (BCE plus the terms'
    labeled parts), each clipped on its own.

    Args:
        grad_clip: as :py:class:`StepSchedule` (0.2 in the reference).
        reuse_meta_grad: fast mode: the labeled step follows ``grad L_meta(theta_hat)`` from the look-ahead instead
            of its own forward and backward (an approximation; needs :py:class:`MetaWeighting` over all
            parameters).

    Raises:
        ValueError: (at attach) ``reuse_meta_grad`` without a :py:class:`MetaWeighting` over all parameters.
    """

    def __init__(self, grad_clip: float | None = 0.2, reuse_meta_grad: bool = False) -> None:
        super().__init__(grad_clip)
        self.reuse_meta_grad = bool(reuse_meta_grad)

    def attach(self, host: Stage2Host) -> None:
        weighting = host.weighting
        if self.reuse_meta_grad and not (isinstance(weighting, MetaWeighting) and weighting.meta_params is None):
            raise ValueError("reuse_meta_grad needs a MetaWeighting over all parameters (meta_params=None).")

    def clean_step(self, host: Stage2Host, ctx: Stage2Context, weights: WeightMaps) -> torch.Tensor:
        host.fire_event(MetaIterationEvents.CLEAN_STEP_STARTED)
        event = MetaIterationEvents.CLEAN_BACKWARD_COMPLETED
        if self.reuse_meta_grad:
            if weights.meta_loss is None or weights.meta_grads is None:
                raise RuntimeError("reuse_meta_grad: the weighting returned no meta-gradient to reuse.")
            loss = host.output["loss_clean"] = weights.meta_loss
            host.apply_gradients(loss, weights.meta_grads, "meta loss", event, self.grad_clip)
        else:
            loss = host.output["loss_clean"] = host.clean_loss(ctx.clean())
            host.step(loss, "clean-step loss", event, self.grad_clip)
        host.fire_event(MetaIterationEvents.CLEAN_STEP_COMPLETED)
        return loss


class JointStep(StepSchedule):
    """
    One optimizer step per iteration: the labeled loss joins the weighted step, and a look-ahead includes its
    gradient (the meta-gradient is taken for the step that is really made). At equal optimizer steps a joint run
    has twice the iterations of :py:class:`TwoSteps`; no labeled-step events are fired.

    Args:
        grad_clip: as :py:class:`StepSchedule`.
    """

    steps_per_iteration = 1

    def joint_loss(self, host: Stage2Host, ctx: Stage2Context) -> torch.Tensor:
        host.output["loss_clean"] = loss = host.clean_loss(ctx.clean())
        return loss


class WeightedStepOnly(StepSchedule):
    """The weighted step alone: the labeled data act only through a look-ahead's meta loss, if any."""

    steps_per_iteration = 1


class LabeledOnly(StepSchedule):
    """
    Labeled steps only: the engine trains on its labeled loader (the labeled loss with the terms' labeled parts,
    on what the student sees of the labeled views) and never reads the unlabeled one; the control that every
    stage-2 method is compared with.

    Args:
        grad_clip: as :py:class:`StepSchedule`.
    """

    steps_per_iteration = 1
    uses_unlabeled = False
