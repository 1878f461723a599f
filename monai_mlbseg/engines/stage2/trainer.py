"""The stage-2 engine of MLB-Seg: an iteration over the unlabeled views made of injected parts."""

from __future__ import annotations

import functools
import logging
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from monai_mlbseg.losses import MetaReweightLoss
from monai_mlbseg.transforms import PLEViews, ViewTransform, ple_pseudo_labels, warp_to_views
from monai_mlbseg.utils import describe_settings, unwrap_network

from ..events import MetaIterationEvents
from ..guards import check_finite
from .context import LabeledViews, Stage2Context, ViewBatch
from .perturbations import Perturbation
from .schedules import StepLosses, StepSchedule, TwoSteps
from .sources import LabelSource
from .teacher import MeanTeacher
from .terms import UnlabeledTerm
from .weightings import PixelWeighting, UniformWeighting, WeightMaps

__all__ = ["MetaTrainer", "STAGE2_PHASES", "STAGE2_TERMS", "stage2_terms"]

#: the phases of a :py:class:`MetaTrainer` iteration, in order; each runs in ``record_function("mlbseg.<phase>")``.
STAGE2_PHASES = ("views", "label_sources", "unlabeled_terms", "weight_maps", "weighted_step", "clean_step")

#: the scalar entries of ``engine.state.output`` of every :py:class:`MetaTrainer` iteration; each unlabeled term adds
#: its name, each label source ``weight_<name>``.
STAGE2_TERMS = ("loss", "loss_weighted", "loss_meta", "loss_clean", "weight_positive_fraction")


def stage2_terms(output: dict) -> dict[str, float]:
    """The scalar loss terms and weight statistics of a :py:class:`MetaTrainer` output (for ``StatsHandler``)."""
    return {
        k: float(v) for k, v in output.items() if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)
    }


def _cycle(loader: Iterable) -> Iterator:
    """Iterate ``loader`` forever, re-iterating the same loader object (never rebuilding it)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the clean data loader is empty.")


def _sum(terms: Sequence[torch.Tensor]) -> torch.Tensor | None:
    return functools.reduce(operator.add, terms) if terms else None


class MetaTrainer(SupervisedTrainer):
    """
    Stage 2 of MLB-Seg (ALGORITHM steps A-E) as a MONAI ``SupervisedTrainer`` whose iteration is made of parts
    handed in (:py:mod:`monai_mlbseg.engines.stage2`): label sources, unlabeled terms, a weighting, a step schedule,
    a mean teacher and the perturbations the student sees. The named methods of
    :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` are such compositions:
    ``MetaTrainer(..., **stage2_method("mlbseg"))``. Computation parts see only the iteration's
    :py:class:`~monai_mlbseg.engines.stage2.Stage2Context`; acting parts see the trainer through the declared
    :py:class:`~monai_mlbseg.engines.stage2.Stage2Host` protocol, which it implements.

    Every iteration takes one batch of unlabeled images with their initial labels (``train_data_loader``) and one
    clean batch (``clean_data_loader``, cycled without being rebuilt), both through ``engine.prepare_batch``, and
    runs these phases, each in ``torch.profiler.record_function("mlbseg.<phase>")`` (:py:data:`STAGE2_PHASES`), on
    one :py:class:`~monai_mlbseg.engines.stage2.Stage2Context`:

    1. ``views``: the unlabeled batch expands into its views; the student runs once on them (on
       ``student_augment`` of them when given), through ``engine.inferer``; the PLE ensemble of its prediction;
    2. ``label_sources``: the targets of the weighted term, one per label source;
    3. ``unlabeled_terms``: every unlabeled term on the views, and the schedule's joint loss (if any);
    4. ``weight_maps``: the pixel weighting's maps of the sources;
    5. ``weighted_step``: ``loss_function(logits, sources, weights)`` plus the weighted terms (plus the joint loss),
       then the schedule's step (the schedule's gradient-norm clip, optimizer step, EMA);
    6. ``clean_step``: the schedule's clean step, if any (the clean loss :py:meth:`clean_loss`).

    Events keep ``SupervisedTrainer``'s contract with the weighted step as the iteration's model step:
    ``FORWARD_COMPLETED`` once ``engine.state.output`` holds ``image``/``label``/``pred`` (what the student saw of
    the views, the initial labels in the views, its logits), ``LOSS_COMPLETED`` once it holds ``loss``,
    ``BACKWARD_COMPLETED`` after the weighted backward, ``MODEL_COMPLETED`` at the end; each once per iteration. The
    other steps fire :py:class:`~monai_mlbseg.engines.MetaIterationEvents`. At ``MODEL_COMPLETED``
    ``engine.state.output`` holds the scalars of :py:data:`STAGE2_TERMS`, each term's value under its name and
    ``weight_<name>`` per label source, as floats; ``engine.state.stage2`` the iteration's context (for handlers
    such as :py:class:`~monai_mlbseg.engines.GroundTruthMonitor`) and ``engine.state.weight_maps`` the latest
    views, labels and weight maps (for visualisation). When the unlabeled loader is empty, or the schedule does not
    use it (:py:class:`~monai_mlbseg.engines.stage2.LabeledOnly`), the trainer trains on the clean loader alone (one
    clean step per iteration, MONAI's events as ``SupervisedTrainer``).

    The view transform, the perturbations and the trainer's other randomness are seeded with
    :py:meth:`set_random_state`; a trainer never seeded draws a seed from ``torch``'s global generator when it
    starts, so that ``monai.utils.set_determinism`` makes runs repeatable.

    Args:
        device: training device.
        max_epochs: epochs (an epoch is one pass over ``train_data_loader``).
        train_data_loader: unlabeled images with initial labels.
        clean_data_loader: clean images with expert labels.
        network: the student (logits out; may be DDP-wrapped).
        optimizer: the optimizer (SGD for a :py:class:`~monai_mlbseg.engines.stage2.MetaWeighting`, whose look-ahead
            differentiates an SGD step).
        sources: the label sources of the weighted term (none: no weighted term).
        terms: the unlabeled terms, added in this order.
        weighting: the weighting of the sources; default :py:class:`~monai_mlbseg.engines.stage2.UniformWeighting`.
        schedule: the step schedule, with its gradient clip; default
            :py:class:`~monai_mlbseg.engines.stage2.TwoSteps`.
        mean_teacher: the mean teacher, for the parts that use one (``None``: none).
        views: the view transform, with its spatial dimensions and label threshold (default
            :py:class:`~monai_mlbseg.transforms.PLEViews` in 2D with the reference ranges).
        student_augment: a perturbation of the unlabeled views that the student sees instead of the views, e.g.
            :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment` (a
            :py:class:`~monai_mlbseg.engines.stage2.Perturbation` reads its traits: a pixel-moving one such as
            :py:class:`~monai_mlbseg.transforms.CutMix` moves the teacher's targets with its pixels, a
            feature-perturbing one such as :py:class:`~monai_mlbseg.transforms.FeatureDropout` perturbs the student's
            forward).
        clean_augment: the same for the clean views (the clean loss's forward and labeled-only training); the
            teacher and a look-ahead's meta loss keep the views themselves.
        loss_function: the weighted term ``loss_function(logits, sources, weights)`` (default
            ``MetaReweightLoss(reduction="sum")``: ``sum(w * l)``); a :py:class:`~monai_mlbseg.engines.MetaWeighting`
            differentiates its ``pixel_loss``.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (handlers, amp, epoch_length, inferer,
            prepare_batch, ...). ``inferer`` runs the student's and the teacher's forwards; ``prepare_batch`` returns
            ``(image, label)`` (extra network arguments are refused); ``amp`` runs the plain forwards under
            ``torch.autocast``; ``compile=True`` wraps them in ``torch.compile``. A look-ahead always runs eagerly in
            float32. ``accumulation_steps`` must be 1.

    Raises:
        TypeError: when a part is not of its kind, or a part's needs are not met (e.g. a look-ahead's loss).
        ValueError: when nothing acts on the unlabeled views, the views' and the trainer's dimensions differ, a
            part's needs are not met, or ``accumulation_steps`` is not 1: both steps of an iteration update the
            student and a look-ahead differentiates the step that follows it.

    Example::

        trainer = MetaTrainer(device, max_epochs=120, train_data_loader=unlabeled, clean_data_loader=clean,
                              network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.005, momentum=0.9,
                              weight_decay=5e-4), **stage2_method("mlbseg"))
        trainer.run()
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        clean_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        sources: Sequence[LabelSource] = (),
        terms: Sequence[UnlabeledTerm] = (),
        weighting: PixelWeighting | None = None,
        schedule: StepSchedule | None = None,
        mean_teacher: MeanTeacher | None = None,
        views: ViewTransform | None = None,
        student_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        clean_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        loss_function: Callable | None = None,
        event_names: list | None = None,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        self.sources, self.terms = list(sources), list(terms)
        self.weighting = UniformWeighting() if weighting is None else weighting
        self.schedule = TwoSteps() if schedule is None else schedule
        for kind, parts in (
            (LabelSource, self.sources),
            (UnlabeledTerm, self.terms),
            (PixelWeighting, [self.weighting]),
            (StepSchedule, [self.schedule]),
            (MeanTeacher, [] if mean_teacher is None else [mean_teacher]),
        ):
            wrong = [type(p).__name__ for p in parts if not isinstance(p, kind)]
            if wrong:
                raise TypeError(f"expected {kind.__name__} parts, got {', '.join(wrong)}.")
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names) or len({t.name for t in self.terms}) != len(self.terms):
            raise ValueError(f"label sources and terms need distinct names, got {names}, {[t.name for t in terms]}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError(
                "MetaTrainer needs accumulation_steps=1: the look-ahead differentiates the SGD step that follows it, "
                f"so gradients cannot be accumulated across iterations; got {kwargs['accumulation_steps']}."
            )
        self.supervised_only = not self.schedule.uses_unlabeled or _is_empty(train_data_loader)
        if not self.schedule.uses_unlabeled:
            logging.getLogger(__name__).info(
                f"MetaTrainer: the {type(self.schedule).__name__} schedule trains on the clean data loader alone "
                "(clean steps only); the unlabeled data loader is not read."
            )
            train_data_loader = clean_data_loader
        elif self.supervised_only:
            logging.getLogger(__name__).warning(
                "MetaTrainer: no unlabeled data; training supervised on the clean data loader (clean steps only)."
            )
            train_data_loader = clean_data_loader
        elif not self.sources and not self.terms:
            raise ValueError("nothing acts on the unlabeled views: give the trainer label sources or unlabeled terms.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function or MetaReweightLoss(reduction="sum"),
            event_names=list(event_names or []) + [MetaIterationEvents],
            decollate=decollate,
            **kwargs,
        )
        self.clean_data_loader = clean_data_loader
        self._clean_batches: Iterator | None = None
        self.views = views if views is not None else PLEViews(2)
        self.student_augment = student_augment
        self.clean_augment = clean_augment
        #: what the student sees of the unlabeled views, and of the clean views
        self.student_perturbation = Perturbation(student_augment)
        self.clean_perturbation = Perturbation(clean_augment)
        self._seeded = False
        self.add_event_handler(Events.STARTED, self._seed_unless_seeded)
        #: the ``torch.compile`` arguments of the plain forwards (the student's through ``SupervisedTrainer``)
        self.compile_kwargs = kwargs.get("compile_kwargs") or {}
        self.mean_teacher = mean_teacher
        if mean_teacher is not None:
            mean_teacher.attach(self)
        #: the teacher network (``None`` without a mean teacher), for checkpoints
        self.teacher: nn.Module | None = None if mean_teacher is None else mean_teacher.module
        if not self.supervised_only:
            self.weighting.attach(self)
            self.schedule.attach(self)
            for term in self.terms:
                term.attach(self)
        #: the run's settings, JSON-compatible, from the parts' own descriptions: a resumed run must have the same
        #: (:py:class:`~monai_mlbseg.engines.ResumeFromCheckpoint`)
        self.run_settings: dict[str, Any] = describe_settings(
            {
                "sources": self.sources,
                "terms": self.terms,
                "weighting": self.weighting,
                "schedule": self.schedule,
                "mean_teacher": self.mean_teacher,
                "views": self.views,
                "student_augment": student_augment,
                "clean_augment": clean_augment,
                "supervised_only": self.supervised_only,
            }
        )
        self.state.weight_maps = None
        self.state.stage2 = None

    def stateful_parts(self) -> dict[str, Any]:
        """The parts with a state of their own (``state_dict``): the weighting, the terms, by name."""
        parts = {"weighting": self.weighting, **{term.name: term for term in self.terms}}
        return {name: part for name, part in parts.items() if callable(getattr(part, "state_dict", None))}

    def state_dict(self) -> OrderedDict:
        """Ignite's engine state plus the states of :py:meth:`stateful_parts` (under ``"parts"``)."""
        state = super().state_dict()
        parts = self.stateful_parts()
        if parts:
            state["parts"] = {name: part.state_dict() for name, part in parts.items()}
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore the engine state and the saved states of :py:meth:`stateful_parts`."""
        super().load_state_dict(state_dict)
        saved = state_dict.get("parts", {})
        for name, part in self.stateful_parts().items():
            if name in saved:
                part.load_state_dict(saved[name])

    def set_random_state(self, seed: int) -> MetaTrainer:
        """
        Seed the view transform, ``student_augment`` with ``seed + 1`` and ``clean_augment`` with ``seed + 2`` when
        they are MONAI ``Randomizable`` (the other randomness follows ``torch``'s global generator).

        Returns:
            the trainer.
        """
        self.views.set_random_state(seed)
        self.student_perturbation.set_random_state(seed + 1)
        self.clean_perturbation.set_random_state(seed + 2)
        self._seeded = True
        return self

    def _seed_unless_seeded(self, engine: Engine) -> None:
        if not self._seeded:
            self.set_random_state(int(torch.randint(0, 2**31 - 1, (1,)).item()))

    @property
    def output(self) -> dict[str, Any]:
        """The iteration's ``engine.state.output``."""
        return self.state.output  # type: ignore[return-value]

    @property
    def spatial_dims(self) -> int:
        """The spatial dimensions of the views."""
        return self.views.spatial_dims

    @property
    def threshold(self) -> float:
        """The views' threshold of binary labels and pseudo labels."""
        return self.views.threshold

    def make_views(self, images: torch.Tensor, labels: torch.Tensor) -> ViewBatch:
        """``images`` expanded into their views (the view transform draws them) and ``labels`` warped into them."""
        views = self.views(images)
        params = self.views.params
        return ViewBatch(views, warp_to_views(labels, params, threshold=self.threshold), params)

    def labeled_views(self) -> ViewBatch:
        """The next clean batch (the clean loader is cycled) expanded into its views."""
        return self.make_views(*self._prepare(self._next_clean(), "a clean batch"))

    def autocast(self) -> torch.autocast:
        """The trainer's autocast setting for plain forwards (disabled without ``amp``)."""
        if not self.amp:
            return torch.autocast(self.state.device.type, enabled=False)
        return torch.autocast(self.state.device.type, **self.amp_kwargs)

    def run_network(self, module: Callable[..., torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """``module``'s logits (float32) of ``images`` through the inferer, under the trainer's autocast setting."""
        with self.autocast():
            return self.inferer(images, module).float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The student's logits (float32) through the inferer, under the trainer's autocast setting."""
        return self.run_network(self.network, images)

    def _teacher_probs(self, views: torch.Tensor) -> torch.Tensor:
        return self.mean_teacher.probs(views)  # type: ignore[union-attr]

    def _trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in unwrap_network(self.network).named_parameters() if p.requires_grad]

    def clean_loss(self, batch: ViewBatch) -> torch.Tensor:
        """
        The clean loss on the clean views: the student's mean BCE against the expert labels (on ``clean_augment`` of
        the views, when given) plus every term's weighted clean part; profiled as ``mlbseg.clean_loss`` inside the
        phase that asks for it (``clean_step``, or ``unlabeled_terms`` for a joint step).
        """
        with record_function("mlbseg.clean_loss"):
            batch, student_views = self._clean_views(batch)
            with self.clean_perturbation.forward(self.network):
                logits = self.forward(student_views)
            return self._clean_loss(LabeledViews(batch, logits, torch.sigmoid(logits), self._teacher, self.forward))

    @property
    def _teacher(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        return None if self.mean_teacher is None else self._teacher_probs

    def _clean_views(self, batch: ViewBatch) -> tuple[ViewBatch, torch.Tensor]:
        """What the student sees of clean views, and the batch with its labels moved like their pixels."""
        if self.clean_augment is None:
            return batch, batch.views
        student_views = self.clean_perturbation(batch.views)
        return batch._replace(labels=self.clean_perturbation.targets(batch.labels)), student_views

    def _clean_loss(self, views: LabeledViews) -> torch.Tensor:
        loss = F.binary_cross_entropy_with_logits(views.logits, views.batch.labels)
        for term in self.terms:
            value = term.clean(views)
            if value is not None:
                loss = loss + term.weight * value
        return loss

    def step(self, loss: torch.Tensor, what: str, event: Any, grad_clip: float | None) -> None:
        """
        Check the loss, then backward, fire ``event``, clip the gradient norm to ``grad_clip``, optimizer step
        (with the AMP grad scaler if any).

        Raises:
            FloatingPointError: when ``loss`` is not finite (before any step).
        """
        check_finite(loss, self, what)
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.fire_event(event)
        self._clip_and_step(grad_clip, scaled=self.scaler is not None)

    def apply_gradients(
        self, loss: torch.Tensor, grads: Mapping[str, torch.Tensor], what: str, event: Any, grad_clip: float | None
    ) -> None:
        """
        Check ``loss`` (whose gradient ``grads`` is) is finite, set the student's gradients by parameter name (the
        others none), fire ``event``, clip to ``grad_clip``, optimizer step (without the AMP scaler: the gradients
        are unscaled).

        Raises:
            FloatingPointError: when ``loss`` is not finite (before any step).
        """
        check_finite(loss, self, what)
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        for name, param in unwrap_network(self.network).named_parameters():
            if name in grads:
                param.grad = grads[name].detach().clone()
        self.fire_event(event)
        self._clip_and_step(grad_clip, scaled=False)

    def _clip_and_step(self, grad_clip: float | None, scaled: bool) -> None:
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), grad_clip)
        if scaled:
            assert self.scaler is not None
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        self.network.train()
        iteration = self._supervised_iteration if self.supervised_only else self._meta_iteration
        if not self.compile:
            return iteration(batchdata)
        # a compiled backward may donate its saved buffers, but the student's graph is differentiated twice (the
        # other terms' gradient for the look-ahead, then the real step); the setting is read when the graph is
        # compiled and when it is differentiated
        from torch._functorch import config as functorch_config

        with functorch_config.patch(donated_buffer=False):
            return iteration(batchdata)

    def _meta_iteration(self, batchdata: Any) -> dict:
        with record_function("mlbseg.views"):
            ctx = self.state.stage2 = self._views_phase(batchdata)
        with record_function("mlbseg.label_sources"):
            sources = {source.name: source(ctx) for source in self.sources}
        with record_function("mlbseg.unlabeled_terms"):
            terms = {term.name: term(ctx) for term in self.terms}
            unlabeled = _sum([term.weight * terms[term.name] for term in self.terms])
            joint = self.schedule.joint_loss(self, ctx)
            step_terms = _sum([t for t in (unlabeled, joint) if t is not None])
        with record_function("mlbseg.weight_maps"):
            weights = self._weight_maps_phase(ctx, sources, step_terms)
        with record_function("mlbseg.weighted_step"):
            weighted = (
                self.loss_function(ctx.logits, list(sources.values()), weights.weights)
                if sources
                else ctx.logits.new_zeros(())
            )
            total = weighted if step_terms is None else weighted + step_terms
            self.state.output[Keys.LOSS] = total
            self.fire_event(IterationEvents.LOSS_COMPLETED)
            self.schedule.weighted_step(self, StepLosses(weighted, unlabeled, joint, total))
            self.fire_event(MetaIterationEvents.REAL_STEP_COMPLETED)
        with record_function("mlbseg.clean_step"):
            clean = self.schedule.clean_step(self, ctx, weights)
        output = self.state.output
        output.update(self._scalars(total, weighted, terms, clean if clean is not None else joint, sources, weights))
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        self.state.stage2 = None
        return output

    def _views_phase(self, batchdata: Any) -> Stage2Context:
        images, initial = self._prepare(batchdata, "an unlabeled batch (the initial label)")
        clean_images, clean_labels = self._prepare(self._next_clean(), "a clean batch")
        unlabeled = self.make_views(images, initial)
        student_views = self.student_perturbation(unlabeled.views)
        self.state.output = {Keys.IMAGE: student_views, Keys.LABEL: unlabeled.labels}
        with self.student_perturbation.forward(self.network):
            logits = self.state.output[Keys.PRED] = self.forward(student_views)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        probs = torch.sigmoid(logits)
        ple = ple_pseudo_labels(probs, unlabeled.params, self.threshold)
        teacher = None
        if self.mean_teacher is not None:
            teacher = functools.partial(_moved, self.student_perturbation, self._teacher_probs)
        ctx = Stage2Context(
            unlabeled,
            student_views,
            logits,
            probs,
            ple,
            self.threshold,
            labeled_views=functools.partial(self.make_views, clean_images, clean_labels),
            teacher=teacher,
            student=self.forward,
            parameters=self._trainable,
        )
        self.fire_event(MetaIterationEvents.PLE_COMPLETED)
        return ctx

    def _weight_maps_phase(
        self, ctx: Stage2Context, sources: dict[str, torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        views = ctx.unlabeled.views
        if sources:
            weights = self.weighting(ctx, list(sources.values()), step_terms)
        else:
            weights = WeightMaps(views.new_zeros((views.shape[0], 0, *views.shape[2:])))
        self.state.weight_maps = {
            "views": views.detach(),
            "initial": ctx.unlabeled.labels,
            "pseudo": ctx.pseudo,
            "sources": dict(sources),
            "weights": weights.weights.detach(),
            "num_views": ctx.unlabeled.params.num_views,
        }
        self.fire_event(MetaIterationEvents.WEIGHTS_COMPLETED)
        return weights

    def _scalars(
        self,
        total: torch.Tensor,
        weighted: torch.Tensor,
        terms: dict[str, torch.Tensor],
        clean: torch.Tensor | None,
        sources: dict[str, torch.Tensor],
        weights: WeightMaps,
    ) -> dict[str, float]:
        """The scalar entries of the iteration's output (one device-to-host copy)."""
        nan = total.new_tensor(float("nan"))
        scalars = {
            "loss": total.detach(),
            "loss_weighted": weighted.detach(),
            **{name: value.detach().float() for name, value in terms.items()},
            "loss_meta": nan if weights.meta_loss is None else weights.meta_loss.detach(),
            "loss_clean": nan if clean is None else clean.detach().float(),
            **{f"weight_{name}": weights.weights[:, i].sum() for i, name in enumerate(sources)},
            "weight_positive_fraction": (weights.weights > 0).float().mean() if sources else nan,
        }
        return dict(zip(scalars, torch.stack(list(scalars.values())).tolist()))

    def _next_clean(self) -> Any:
        if self._clean_batches is None:
            self._clean_batches = _cycle(self.clean_data_loader)
        return next(self._clean_batches)

    def _tensor(self, value: Any) -> torch.Tensor:
        """A plain float tensor on the training device."""
        value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        return value.to(self.state.device, non_blocking=self.non_blocking).float()

    def _prepare(self, batchdata: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and label of a batch through ``engine.prepare_batch``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, labels, *extra = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        if any(extra):
            raise ValueError("MetaTrainer runs the network on views: prepare_batch must not return network arguments.")
        if labels is None:
            raise KeyError(f"{what} needs an image and a label; prepare_batch found no label.")
        return self._tensor(images), self._tensor(labels)

    def _supervised_iteration(self, batchdata: Any) -> dict:
        images, labels = self._prepare(batchdata, "a clean batch")
        with record_function("mlbseg.clean_step"):
            batch, student_views = self._clean_views(self.make_views(images, labels))
            self.state.output = {Keys.IMAGE: student_views, Keys.LABEL: batch.labels}
            self.fire_event(MetaIterationEvents.CLEAN_STEP_STARTED)
            with self.clean_perturbation.forward(self.network):
                logits = self.state.output[Keys.PRED] = self.forward(student_views)
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            views = LabeledViews(batch, logits, torch.sigmoid(logits), self._teacher, self.forward)
            loss = self.state.output[Keys.LOSS] = self._clean_loss(views)
            self.fire_event(IterationEvents.LOSS_COMPLETED)
            self.step(loss, "clean-step loss", IterationEvents.BACKWARD_COMPLETED, self.schedule.grad_clip)
            self.fire_event(MetaIterationEvents.CLEAN_STEP_COMPLETED)
        value = float(loss.detach())
        self.state.output.update(loss=value, loss_clean=value)
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return self.state.output


def _is_empty(loader: Iterable) -> bool:
    try:
        return len(loader) == 0  # type: ignore[arg-type]
    except TypeError:
        return False


def _moved(
    perturbation: Perturbation, probs: Callable[[torch.Tensor], torch.Tensor], views: torch.Tensor
) -> torch.Tensor:
    """``probs`` of ``views`` moved like the pixels of ``perturbation``'s last batch."""
    return perturbation.targets(probs(views))
