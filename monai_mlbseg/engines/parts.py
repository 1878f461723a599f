"""
The parts a :py:class:`~monai_mlbseg.engines.MetaTrainer` is made of, each a small object handed in (MONAI's idiom,
as ``SupervisedTrainer`` takes its ``loss_function`` and ``inferer``):

- *label sources* (:py:class:`LabelSource`): targets ``[N, 1, *S]`` of the weighted term, one weight channel each;
- *unlabeled terms* (:py:class:`UnlabeledTerm`): weighted losses on the unlabeled views, each reported under its
  own name, optionally with a part on the clean views that joins the clean loss;
- a *pixel weighting* (:py:class:`PixelWeighting`): the weight maps of the label sources;
- a *step schedule* (:py:class:`StepSchedule`): how the losses become optimizer steps;
- a *mean teacher* (:py:class:`MeanTeacher`): the EMA network, its forward and its updates.

A new idea is one subclass of one of these; the trainer, its events, its output and ``run_settings`` follow.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from monai.engines.utils import IterationEvents
from torch import nn
from torch.profiler import record_function

from monai_mlbseg.losses import MeanTeacherLoss, ViewConsistencyLoss
from monai_mlbseg.meta import MetaLookAhead
from monai_mlbseg.utils import unwrap_network

from .context import LabeledViews, Stage2Context
from .events import MetaIterationEvents
from .guards import check_finite
from .teacher import MeanTeacherHandler

if TYPE_CHECKING:
    from .meta_trainer import MetaTrainer

__all__ = [
    "ConfidenceWeighting",
    "InitialLabels",
    "JointStep",
    "LabelSource",
    "MeanTeacher",
    "MeanTeacherTerm",
    "MetaWeighting",
    "PixelWeighting",
    "PseudoLabels",
    "StepLosses",
    "StepSchedule",
    "TeacherLabels",
    "TwoSteps",
    "UniformWeighting",
    "UnlabeledTerm",
    "ViewConsistencyTerm",
    "WeightMaps",
    "WeightedStepOnly",
]


class MeanTeacher:
    """
    The mean teacher: an exponential moving average of the student (updated by a
    :py:class:`~monai_mlbseg.engines.MeanTeacherHandler` after every optimizer step) and its forward, which adds
    Gaussian noise to its input and runs through the trainer's inferer, autocast and ``torch.compile`` settings.

    Args:
        network: the teacher network (same architecture as the student); default: a deep copy of the student made
            when the trainer is built. Its parameters never require gradients.
        decay: EMA decay (0.99 in the reference).
        noise: std of the Gaussian noise added to the teacher's input (0.02 in the reference).

    Example::

        trainer = MetaTrainer(..., mean_teacher=MeanTeacher(teacher_net, decay=0.99))
    """

    def __init__(self, network: nn.Module | None = None, decay: float = 0.99, noise: float = 0.02) -> None:
        self.module = network
        self.decay = float(decay)
        self.noise = float(noise)
        self._trainer: MetaTrainer | None = None
        self._forward: nn.Module | None = None

    def attach(self, trainer: MetaTrainer) -> None:
        """Take the student's copy if no network was given, register the EMA updates, compile if asked."""
        if self.module is None:
            self.module = copy.deepcopy(unwrap_network(trainer.network))
        MeanTeacherHandler(self.module, decay=self.decay).attach(trainer)
        self._trainer = trainer
        self._forward = self.module
        if trainer.compile:
            self._forward = torch.compile(self.module, **trainer.compile_kwargs)

    def probs(self, views: torch.Tensor) -> torch.Tensor:
        """The teacher's probabilities (float32, no gradient) on ``views`` with input noise (``mlbseg.teacher``)."""
        trainer = self._trainer
        with record_function("mlbseg.teacher"), torch.no_grad(), trainer.autocast():
            noisy = views + self.noise * torch.randn_like(views)
            return torch.sigmoid(trainer.inferer(noisy, self._forward).float())


class LabelSource:
    """
    A target of the weighted term, ``[N, 1, *S]`` in the unlabeled views' frame, values in ``[0, 1]``, treated as a
    constant. It gets a weight channel of the pixel weighting, a ``weight_<name>`` output entry and an entry in
    ``engine.state.weight_maps["sources"]``.

    Example::

        class SmoothedPrediction(LabelSource):
            name = "smoothed"

            def __call__(self, ctx):
                return F.avg_pool2d(ctx.probs.detach(), 3, stride=1, padding=1)
    """

    name = "source"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx).")


class InitialLabels(LabelSource):
    """The bootstrapped initial labels of the unlabeled images, warped into the views."""

    name = "initial"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return ctx.unlabeled.labels


class PseudoLabels(LabelSource):
    """
    The student's pseudo labels of the views.

    Args:
        ensemble: the PLE pseudo labels (the view predictions mapped back, averaged, warped into every view,
            thresholded: the reference); off: each view's own prediction thresholded.
    """

    name = "pseudo"

    def __init__(self, ensemble: bool = True) -> None:
        self.ensemble = ensemble

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        if self.ensemble:
            return ctx.pseudo
        return (ctx.probs.detach() > ctx.trainer.threshold).float()


class TeacherLabels(LabelSource):
    """The mean teacher's prediction of each view, thresholded at the trainer's threshold."""

    name = "teacher"

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return (ctx.teacher_probs() > ctx.trainer.threshold).float()


class UnlabeledTerm:
    """
    One weighted loss on the unlabeled views, reported as ``engine.state.output[name]`` (unweighted). A term may
    also act on the clean views (:py:meth:`clean`, ``None``: it does not); that part joins the clean loss with the
    same weight.

    Args:
        weight: the term's weight in the step's loss (and in the clean loss), at least 0.

    Raises:
        ValueError: when ``weight`` is negative.
    """

    name = "loss_term"

    def __init__(self, weight: float = 1.0) -> None:
        if weight < 0:
            raise ValueError(f"the weight of {type(self).__name__} must be >= 0, got {weight}.")
        self.weight = float(weight)

    def attach(self, trainer: MetaTrainer) -> None:
        """Check or prepare what the term needs from ``trainer``, once, when it is built (default: nothing)."""

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx).")

    def clean(self, trainer: MetaTrainer, views: LabeledViews) -> torch.Tensor | None:
        """The term on the clean views (``None``: none)."""
        return None


class ViewConsistencyTerm(UnlabeledTerm):
    """
    L_pc: the student's predictions of the views of one image agree
    (:py:class:`~monai_mlbseg.losses.ViewConsistencyLoss`); on the clean views too.
    """

    name = "loss_pc"

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.loss = ViewConsistencyLoss()

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return self.loss(ctx.probs, ctx.unlabeled.params, ctx.ple.back)

    def clean(self, trainer: MetaTrainer, views: LabeledViews) -> torch.Tensor:
        return self.loss(views.probs, views.batch.params)


class MeanTeacherTerm(UnlabeledTerm):
    """
    L_mt: the student against the mean teacher's prediction of the same views (the unperturbed views, while the
    student may see ``student_augment`` of them: weak-to-strong consistency). On the clean views the squared
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

    def clean(self, trainer: MetaTrainer, views: LabeledViews) -> torch.Tensor:
        return self.clean_loss(views.probs, trainer.mean_teacher.probs(views.batch.views))


class WeightMaps(NamedTuple):
    """
    The weights of the label sources.

    Attributes:
        weights: ``[N, len(sources), *S]`` non-negative weight maps.
        meta_loss: the look-ahead's meta loss (``None`` without one).
        meta_grads: its gradient by parameter name (``None`` without one).
    """

    weights: torch.Tensor
    meta_loss: torch.Tensor | None = None
    meta_grads: dict[str, torch.Tensor] | None = None


class PixelWeighting:
    """
    Turns the label sources of an iteration into weight maps.

    ``__call__(ctx, sources, step_terms)`` gets the sources (a list of ``[N, 1, *S]``) and the weighted step's
    other terms (a scalar with a graph, or ``None``), which a look-ahead must include in the step it
    differentiates; :py:meth:`attach` is called once, when the trainer is built.
    """

    def attach(self, trainer: MetaTrainer) -> None:
        """Check or prepare what the weighting needs from ``trainer`` (default: nothing)."""

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx, sources, step_terms).")


def _shape(ctx: Stage2Context, sources: Sequence[torch.Tensor]) -> tuple[int, ...]:
    views = ctx.unlabeled.views
    return (views.shape[0], len(sources), *views.shape[2:])


class UniformWeighting(PixelWeighting):
    """Every pixel of every source weighted alike, the weights summing to 1 (plain bootstrapping)."""

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        weights = torch.full(_shape(ctx, sources), 1.0, device=ctx.unlabeled.views.device)
        return WeightMaps(weights / weights.numel())


class ConfidenceWeighting(PixelWeighting):
    """
    A fixed confidence threshold: a pixel of every source weighs ``1 / numel`` where the mean teacher's
    probability ``t`` (the student's own, detached, without a teacher) has ``max(t, 1 - t) >= threshold``, 0
    elsewhere; so the term shrinks as the prediction grows less sure (FixMatch's rule, as
    :py:class:`~monai_mlbseg.losses.ConfidentPseudoLabelLoss`).

    Args:
        threshold: the confidence needed, in ``[0.5, 1]``.

    Raises:
        ValueError: when ``threshold`` is outside ``[0.5, 1]``.
    """

    def __init__(self, threshold: float = 0.95) -> None:
        if not 0.5 <= threshold <= 1:
            raise ValueError(f"threshold must lie in [0.5, 1], got {threshold}.")
        self.threshold = float(threshold)

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        probs = ctx.teacher_probs() if ctx.trainer.mean_teacher is not None else ctx.probs.detach()
        confident = (torch.maximum(probs, 1 - probs) >= self.threshold).float()
        weights = confident.expand(_shape(ctx, sources))
        return WeightMaps(weights / weights.numel())


class MetaWeighting(PixelWeighting):
    """
    MLB-Seg's meta-learned pixel weights (ALGORITHM step C): a look-ahead SGD step on the weighted loss with
    per-pixel weights ``eps = 0``, the clean views' BCE after it, and weights proportional to the positive part of
    ``-dL_meta/d eps`` (:py:class:`~monai_mlbseg.meta.MetaLookAhead`, differentiating the trainer's
    ``loss_function.pixel_loss``). The look-ahead runs eagerly in float32 on what the student saw.

    Args:
        meta_params: restrict the meta-gradient to these parameter names or prefixes (an approximation; default:
            all).

    Raises:
        TypeError: (at attach) when the trainer's optimizer is not SGD or its loss function has no ``pixel_loss``.
        ValueError: (at attach) when the trainer has no label source.
    """

    #: how the meta-gradient becomes weights (:py:func:`~monai_mlbseg.meta.normalise_weights`)
    rule = "gradient"

    def __init__(self, meta_params: Sequence[str] | None = None) -> None:
        self.meta_params = None if meta_params is None else list(meta_params)
        self.lookahead: MetaLookAhead | None = None

    def attach(self, trainer: MetaTrainer) -> None:
        if not trainer.sources:
            raise ValueError("MetaWeighting weighs label sources: give the trainer at least one.")
        pixel_loss = getattr(trainer.loss_function, "pixel_loss", None)
        if not callable(pixel_loss):
            raise TypeError(
                "MetaWeighting needs a loss function with a pixel_loss(logits, sources) for the look-ahead, "
                f"e.g. MetaReweightLoss(pixel_loss=...); got {type(trainer.loss_function).__name__}."
            )
        self.lookahead = MetaLookAhead(
            trainer.network, trainer.optimizer, self.meta_params, weighting=self.rule, pixel_loss=pixel_loss
        )

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        clean = ctx.clean()
        result = self.lookahead(
            ctx.student_views, sources, clean.views, clean.labels, lookahead_grads=_named_grads(ctx, step_terms)
        )
        return WeightMaps(result.weights, result.meta_loss, result.meta_grads)


def _named_grads(ctx: Stage2Context, terms: torch.Tensor | None) -> dict[str, torch.Tensor | None] | None:
    """The gradient of the step's other terms by parameter name, from the real forward (``None``: none)."""
    if terms is None or not terms.requires_grad:
        return None
    named = [(n, p) for n, p in unwrap_network(ctx.trainer.network).named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(terms, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: g for (n, _), g in zip(named, grads)}


class StepLosses(NamedTuple):
    """
    The losses of the weighted step.

    Attributes:
        weighted: the weighted term ``loss_function(logits, sources, weights)``.
        unlabeled: the weighted sum of the unlabeled terms (``None``: none).
        joint: the clean loss when it joins this step (``None``: it does not).
        total: their sum, the step's loss.
    """

    weighted: torch.Tensor
    unlabeled: torch.Tensor | None
    joint: torch.Tensor | None
    total: torch.Tensor


class StepSchedule:
    """
    How an iteration's losses become optimizer steps: the weighted step (the iteration's model step in MONAI's
    event contract), then possibly a clean step.

    Attributes:
        steps_per_iteration: optimizer steps per iteration (equal budgets compare steps, not iterations).
    """

    steps_per_iteration = 2

    def attach(self, trainer: MetaTrainer) -> None:
        """Check what the schedule needs from ``trainer`` (default: nothing)."""

    def joint_loss(self, trainer: MetaTrainer, ctx: Stage2Context) -> torch.Tensor | None:
        """A loss that joins the weighted step (and its look-ahead); default ``None``."""
        return None

    def weighted_step(self, trainer: MetaTrainer, losses: StepLosses) -> None:
        """Backward, clip and step on ``losses.total``."""
        trainer.step(losses.total, "weighted-step loss", IterationEvents.BACKWARD_COMPLETED)

    def clean_step(self, trainer: MetaTrainer, ctx: Stage2Context, weights: WeightMaps) -> torch.Tensor | None:
        """The clean step after the weighted step; returns its loss (``None``: no clean step)."""
        return None


class TwoSteps(StepSchedule):
    """
    The reference's iteration: the weighted step, then a clean step on the clean views (BCE plus the terms' clean
    parts, :py:meth:`~monai_mlbseg.engines.MetaTrainer.clean_loss`), each clipped on its own.

    Args:
        reuse_meta_grad: fast mode: the clean step follows ``grad L_meta(theta_hat)`` from the look-ahead instead
            of its own forward and backward (an approximation; needs :py:class:`MetaWeighting` over all
            parameters).

    Raises:
        ValueError: (at attach) ``reuse_meta_grad`` without a :py:class:`MetaWeighting` over all parameters.
    """

    def __init__(self, reuse_meta_grad: bool = False) -> None:
        self.reuse_meta_grad = bool(reuse_meta_grad)

    def attach(self, trainer: MetaTrainer) -> None:
        weighting = trainer.weighting
        if self.reuse_meta_grad and not (isinstance(weighting, MetaWeighting) and weighting.meta_params is None):
            raise ValueError("reuse_meta_grad needs a MetaWeighting over all parameters (meta_params=None).")

    def clean_step(self, trainer: MetaTrainer, ctx: Stage2Context, weights: WeightMaps) -> torch.Tensor:
        trainer.fire_event(MetaIterationEvents.CLEAN_STEP_STARTED)
        if self.reuse_meta_grad:
            check_finite(weights.meta_loss, trainer, "meta loss")
            loss = trainer.state.output["loss_clean"] = weights.meta_loss
            trainer.optimizer.zero_grad(set_to_none=trainer.optim_set_to_none)
            for name, param in unwrap_network(trainer.network).named_parameters():
                if name in weights.meta_grads:
                    param.grad = weights.meta_grads[name].detach().clone()
            trainer.fire_event(MetaIterationEvents.CLEAN_BACKWARD_COMPLETED)
            trainer.clip_and_step(scaled=False)
        else:
            loss = trainer.state.output["loss_clean"] = trainer.clean_loss(ctx.clean())
            trainer.step(loss, "clean-step loss", MetaIterationEvents.CLEAN_BACKWARD_COMPLETED)
        trainer.fire_event(MetaIterationEvents.CLEAN_STEP_COMPLETED)
        return loss


class JointStep(StepSchedule):
    """
    One optimizer step per iteration: the clean loss joins the weighted step, and a look-ahead includes its
    gradient (the meta-gradient is taken for the step that is really made). At equal optimizer steps a joint run
    has twice the iterations of :py:class:`TwoSteps`; no clean-step events are fired.
    """

    steps_per_iteration = 1

    def joint_loss(self, trainer: MetaTrainer, ctx: Stage2Context) -> torch.Tensor:
        trainer.state.output["loss_clean"] = loss = trainer.clean_loss(ctx.clean())
        return loss


class WeightedStepOnly(StepSchedule):
    """The weighted step alone: the labeled data act only through a look-ahead's meta loss, if any."""

    steps_per_iteration = 1
