"""The stage-2 trainer of MLB-Seg: PLE pseudo labels, meta-learned pixel weights, a weighted step and a clean step."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.transforms import Randomizable
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from monai_mlbseg.evaluation import dice_score
from monai_mlbseg.losses import ConfidentPseudoLabelLoss, MeanTeacherLoss, MetaReweightLoss, ViewConsistencyLoss
from monai_mlbseg.meta import WEIGHTINGS, MetaLookAhead
from monai_mlbseg.transforms import (
    PLEViews,
    ViewParams,
    ViewTransform,
    ple_pseudo_labels,
    random_box_masks,
    warp_to_views,
)
from monai_mlbseg.utils import describe_settings, unwrap_network

from .events import MetaIterationEvents
from .guards import check_finite
from .teacher import MeanTeacherHandler

__all__ = [
    "BATCH_NORM_MODES",
    "LABEL_SOURCES",
    "MetaTrainer",
    "STAGE2_PHASES",
    "STAGE2_TERMS",
    "Stage2State",
    "stage2_terms",
]

#: the built-in label sources of the weighted term: the bootstrapped initial labels and the PLE pseudo labels.
LABEL_SOURCES = ("initial", "pseudo")

#: how stage 2 treats BatchNorm layers (see :py:class:`MetaTrainer`).
BATCH_NORM_MODES = ("train", "frozen")

#: the phases of a :py:class:`MetaTrainer` iteration, in order; each runs in ``record_function("mlbseg.<phase>")``.
STAGE2_PHASES = ("views", "label_sources", "weight_maps", "weighted_step", "clean_step")

#: the scalar entries of ``engine.state.output`` of a :py:class:`MetaTrainer` iteration (plus ``weight_<name>`` of
#: any further label source).
STAGE2_TERMS = (
    "loss",
    "loss_weighted",
    "loss_pc",
    "loss_mt",
    "loss_mix",
    "loss_meta",
    "loss_clean",
    "weight_initial",
    "weight_pseudo",
    "weight_positive_fraction",
)


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


@dataclass
class Stage2State:
    """
    What the phases of one :py:class:`MetaTrainer` iteration share, filled phase by phase (``None`` until set).
    ``N = B K`` is the number of views of the ``B`` unlabeled images, ``S`` the spatial shape.

    Attributes:
        images: ``[B, C, *S]`` the unlabeled images, from ``engine.prepare_batch``.
        initial: ``[B, 1, *S]`` their initial labels.
        gt: their ground truth under ``gt_key`` (monitoring only) or ``None``.
        clean_images: ``[M, C, *S]`` the clean batch's images.
        clean_labels: ``[M, 1, *S]`` their expert labels.
        views: ``[N, C, *S]`` the PLE views of ``images``; ``params`` their view parameters.
        student_views: what the student sees of ``views``: ``student_augment(views)``, or ``views`` without one.
        initial_views: ``[N, 1, *S]`` the initial labels warped into the views.
        logits: ``[N, 1, *S]`` the student's logits on ``student_views`` (``probs`` their sigmoid).
        pseudo: ``[N, 1, *S]`` the pseudo labels; ``back`` the view predictions mapped back (``None`` without PLE).
        sources: the label sources of the weighted term by name, each ``[N, 1, *S]``
            (:py:meth:`MetaTrainer.label_source_maps`); weight channel ``i`` belongs to the ``i``-th.
        l_pc: the view-consistency term; ``l_mt`` the mean-teacher term; ``l_mix`` the copy-paste term.
        regularisation: ``pc_weight * l_pc + mt_weight * l_mt + mix_weight * l_mix``.
        clean_views: the clean batch's views (with ``clean_view_labels``, ``clean_params``), made when first needed.
        weights: ``[N, len(sources), *S]`` the weight maps.
        meta_loss: the look-ahead's meta loss; ``meta_grads`` its gradient by parameter name (``reweight`` only).
        loss_weighted: the weighted term; ``loss`` the weighted step's loss; ``loss_clean`` the clean step's.
    """

    images: torch.Tensor
    initial: torch.Tensor
    gt: torch.Tensor | None = None
    clean_images: torch.Tensor | None = None
    clean_labels: torch.Tensor | None = None
    views: torch.Tensor | None = None
    student_views: torch.Tensor | None = None
    initial_views: torch.Tensor | None = None
    params: ViewParams | None = None
    logits: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    pseudo: torch.Tensor | None = None
    back: torch.Tensor | None = None
    sources: dict[str, torch.Tensor] = field(default_factory=dict)
    l_pc: torch.Tensor | None = None
    l_mt: torch.Tensor | None = None
    l_mix: torch.Tensor | None = None
    regularisation: torch.Tensor | None = None
    clean_views: torch.Tensor | None = None
    clean_view_labels: torch.Tensor | None = None
    clean_params: ViewParams | None = None
    weights: torch.Tensor | None = None
    meta_loss: torch.Tensor | None = None
    meta_grads: dict[str, torch.Tensor] | None = None
    loss_weighted: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    loss_clean: torch.Tensor | None = None


class MetaTrainer(SupervisedTrainer):
    """
    Stage 2 of MLB-Seg (ALGORITHM steps A-E) as a MONAI ``SupervisedTrainer``.

    Every iteration takes one batch of unlabeled images with their initial labels (``train_data_loader``) and one
    clean batch (``clean_data_loader``, cycled without being rebuilt); both go through ``engine.prepare_batch``
    (image and label; a ground truth under ``gt_key`` of an unlabeled batch is used only for monitoring). The
    iteration runs these phases on one :py:class:`Stage2State`, each (the method ``_<phase>_phase``) inside
    ``torch.profiler.record_function("mlbseg.<phase>")`` (names in :py:data:`STAGE2_PHASES`):

    1. ``mlbseg.views``: both batches expand into the PLE views; the student runs once on the unlabeled views
       (through ``engine.inferer``; on ``student_augment`` of them when given): this forward serves the pseudo
       labels, the regularisers, the look-ahead and the weighted step; PLE pseudo labels: the view predictions
       mapped back, averaged, warped into every view, thresholded;
    2. ``mlbseg.label_sources``: the label sources of the weighted term, :py:meth:`label_source_maps` (a hook);
    3. ``mlbseg.weight_maps``: the regularisers L_pc and L_mt, and look-ahead weight maps for every label source
       per pixel (:py:class:`~monai_mlbseg.meta.MetaLookAhead`, differentiating the loss function's
       ``pixel_loss``);
    4. ``mlbseg.weighted_step``: ``sum(w * l) + pc_weight * L_pc + mt_weight * L_mt`` (``+ mix_weight * L_mix``),
       gradient-norm clip, SGD step, EMA;
    5. ``mlbseg.clean_step``: mean BCE on the clean views ``+ L_pc + L_mt``, clip, SGD step, EMA (with
       ``joint_step=True`` this loss joins step 4 instead, and the iteration makes one step).

    Events keep ``SupervisedTrainer``'s contract, with the weighted step as the iteration's model step:
    ``FORWARD_COMPLETED`` once ``engine.state.output`` holds ``image``/``label``/``pred`` (the student's views,
    initial labels in the views, logits), ``LOSS_COMPLETED`` once it holds ``loss``, ``BACKWARD_COMPLETED`` after
    the weighted backward, ``MODEL_COMPLETED`` at the end; each once per iteration. The other steps fire
    :py:class:`~monai_mlbseg.engines.MetaIterationEvents`. At ``MODEL_COMPLETED`` ``engine.state.output`` holds the
    scalar terms of :py:data:`STAGE2_TERMS` as floats (``weight_<name>`` for each label source; ``dice_*_gt``
    monitoring entries when a ground truth is given); ``engine.state.weight_maps`` holds the latest views, labels
    and weight maps for visualisation handlers. When the unlabeled loader is empty, the trainer falls back to
    supervised training on the clean loader (one clean step per iteration, firing MONAI's events like
    ``SupervisedTrainer``), so a bundle still trains when it is handed labeled pairs only.

    A further label source is a subclass overriding :py:meth:`label_source_maps`; the look-ahead, the loss, the
    output terms and ``engine.state.weight_maps["sources"]`` follow.

    Args:
        device: training device.
        max_epochs: epochs (an epoch is one pass over ``train_data_loader``).
        train_data_loader: unlabeled images with initial labels.
        clean_data_loader: clean images with expert labels.
        network: the student (logits out; may be DDP-wrapped).
        optimizer: ``torch.optim.SGD`` (the look-ahead differentiates an SGD step).
        teacher: the mean teacher (same architecture); default: a deep copy of the student. Never trained by
            gradients; updated by the attached :py:class:`~monai_mlbseg.engines.MeanTeacherHandler`.
        spatial_dims: 2 or 3.
        views: the view transform (default :py:class:`~monai_mlbseg.transforms.PLEViews` with the reference ranges).
        clean_step: run the clean step (E); on in the reference code.
        joint_step: one optimizer step per iteration instead of two: the clean step's loss (mean BCE on the clean
            views ``+ L_pc + L_mt``) joins the weighted step's loss, and the look-ahead's virtual step includes its
            gradient (the meta-gradient is taken for the step that is really made). Off (the reference): a
            weighted step, then a clean step. Every iteration then trains on the labeled data at the full rate;
            at equal optimizer steps a joint run has twice the iterations. No clean-step events are fired; the
            clean term is reported as ``loss_clean``. Needs ``clean_step=True``, not ``reuse_meta_grad``.
        use_teacher: add the mean-teacher term L_mt.
        use_ple: PLE pseudo labels; off: each view's own thresholded prediction.
        reweight: meta-learned weights; off: uniform weights (plain bootstrapping).
        pc_weight: weight of L_pc.
        mt_weight: weight of L_mt.
        student_augment: a perturbation of the unlabeled views that the student sees instead of the views
            themselves, e.g. :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`; it must keep every pixel in
            place (intensity, noise, blur: no geometry), since the teacher, the pseudo labels and the weight maps
            stay in the views' frame. ``None`` (the reference): the student sees the views. With the teacher on
            the unperturbed views this is weak-to-strong consistency (FixMatch, UniMatch).
        teacher_ensemble: the teacher's target on the unlabeled views (L_mt, and L_mix's label outside the box) is
            its PLE ensemble instead of each view's own prediction: the teacher's view probabilities mapped back,
            averaged over the views of their slice and warped into every view (soft, like the PLE mean). Off (the
            reference): each view's own teacher prediction. It costs no network forward.
        clean_augment: the same for the clean views: the student's forward of the clean step (and of labeled-only
            training, without unlabeled data) runs on ``clean_augment(views)``; the teacher and the look-ahead's
            meta loss keep the views themselves. ``None`` (the reference): no perturbation.
        mt_confidence: ``None`` (the reference): L_mt on the unlabeled views is the mean squared difference of the
            student's and the teacher's probabilities (:py:class:`~monai_mlbseg.losses.MeanTeacherLoss`); a value in
            ``[0.5, 1]``: it is the BCE against the teacher's thresholded prediction where the teacher's confidence
            reaches that value (:py:class:`~monai_mlbseg.losses.ConfidentPseudoLabelLoss`). L_mt of the clean
            views stays squared.
        mix_weight: weight of the copy-paste term L_mix (0, the reference: off). Each unlabeled view gets a box
            (sides ``mix_fraction`` of the image's) of a clean view pasted in, and the student is trained with BCE
            on the mixed image against the mixed target: the expert label inside the box, the mean teacher's
            thresholded prediction of the unlabeled view outside it (the PLE pseudo label without a teacher). The
            term joins the weighted step (and its look-ahead) like L_pc and L_mt; it costs one more student forward
            and backward on the unlabeled views. Copy-paste between labeled and unlabeled images is the
            bidirectional-copy-paste idea of semi-supervised segmentation, here in one direction.
        mix_fraction: the side of the pasted box relative to the image's, in ``(0, 1]``.
        grad_clip: gradient-norm clip of both steps (``None``: no clipping).
        clip_per_term: with ``joint_step``, clip the gradient of the clean loss and that of the unlabeled terms
            (weighted term and regularisers) each to ``grad_clip``, then add them, as the reference's two steps are
            clipped each on its own; off: one clip of the summed gradient, under which every unlabeled term shrinks
            the labeled part of a clipped step. It costs one more gradient buffer, no forward. Needs ``joint_step``.
        ema_decay: EMA decay of the teacher.
        teacher_noise: std of the Gaussian noise added to the teacher's input.
        meta_params: restrict the meta-gradient to these parameter names/prefixes (approximation; default all).
        reuse_meta_grad: fast mode: the clean step uses ``grad L_meta(theta_hat)`` from the look-ahead instead of
            its own forward/backward (approximation; needs ``reweight`` and the full ``meta_params``).
        threshold: threshold of the pseudo labels and the warped labels.
        label_sources: the built-in label sources of the weighted term, a subset of :py:data:`LABEL_SOURCES` in
            that order (default both, as the reference). ``("initial",)`` with ``reweight=False`` is plain
            self-training on the bootstrapped labels; ``()`` drops the weighted term (e.g. a mean-teacher baseline:
            only the regularisers act on the unlabeled views).
        batch_norm: ``"train"`` (the reference): BatchNorm layers normalise every forward with its batch's
            statistics (the five views of one slice) and update their running statistics; ``"frozen"``: BatchNorm
            layers of the student and the teacher stay in eval mode throughout stage 2, normalising with the
            stage-1 running statistics (their affine parameters are still trained).
        meta_weighting: how the meta-gradient becomes weight maps: ``"gradient"`` (the reference: proportional to
            the positive part of ``-dL_meta/d eps``, which grows with each pixel's loss gradient, summing to 1),
            ``"sign"`` (every pixel with a positive entry weighted alike, summing to 1) or ``"agreement"`` (the
            reference's maps scaled to sum to the agreeing share of the meta-gradient mass, at most 1), see
            :py:func:`~monai_mlbseg.meta.normalise_weights`.
        seed: seed of the view transform; default: drawn from ``torch``'s global generator, so that
            ``monai.utils.set_determinism`` makes runs repeatable.
        gt_key: key of the monitoring ground truth in an unlabeled batch.
        loss_function: the weighted term ``loss_function(logits, sources, weights)`` (default
            ``MetaReweightLoss(reduction="sum")``, :py:class:`~monai_mlbseg.losses.MetaReweightLoss`:
            ``sum(w * l)``, so that the total weight of ``meta_weighting="agreement"`` scales the term); with
            ``reweight`` it must have the ``pixel_loss`` attribute the look-ahead differentiates.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (handlers, amp, epoch_length, inferer,
            prepare_batch, ...). ``inferer`` runs the student's and the teacher's forwards (default
            ``SimpleInferer``); ``prepare_batch`` returns ``(image, label)`` of a batch (default
            ``default_prepare_batch``; extra network arguments are refused). ``amp`` runs the plain forwards under
            ``torch.autocast`` (``amp_kwargs={"dtype": torch.bfloat16}`` for bf16); ``compile=True`` (with
            ``compile_kwargs``) wraps the student's and the teacher's plain forwards in ``torch.compile``. The
            look-ahead always runs eagerly in float32 (forward-mode AD through a functional call of the
            unwrapped network, not through the inferer). ``accumulation_steps`` must be 1.

    Raises:
        TypeError: when the optimizer is not SGD or the loss function has no ``pixel_loss`` (with ``reweight``).
        ValueError: on inconsistent options, or ``accumulation_steps`` other than 1: the look-ahead differentiates
            the one SGD step that follows it, and both steps of an iteration update the student, so gradients
            cannot be accumulated across iterations.

    Example::

        trainer = MetaTrainer(device, max_epochs=120, train_data_loader=unlabeled, clean_data_loader=clean,
                              network=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.005, momentum=0.9,
                              weight_decay=5e-4))
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
        teacher: nn.Module | None = None,
        spatial_dims: int = 2,
        views: ViewTransform | None = None,
        clean_step: bool = True,
        joint_step: bool = False,
        use_teacher: bool = True,
        use_ple: bool = True,
        reweight: bool = True,
        pc_weight: float = 1.0,
        mt_weight: float = 1.0,
        student_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        clean_augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        mt_confidence: float | None = None,
        teacher_ensemble: bool = False,
        mix_weight: float = 0.0,
        mix_fraction: float = 2 / 3,
        grad_clip: float | None = 0.2,
        clip_per_term: bool = False,
        ema_decay: float = 0.99,
        teacher_noise: float = 0.02,
        meta_params: Sequence[str] | None = None,
        reuse_meta_grad: bool = False,
        threshold: float = 0.5,
        label_sources: Sequence[str] = LABEL_SOURCES,
        batch_norm: str = "train",
        meta_weighting: str = "gradient",
        seed: int | None = None,
        gt_key: str = "gt",
        loss_function: Callable | None = None,
        event_names: list | None = None,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        if reuse_meta_grad and (not reweight or meta_params is not None or not clean_step or joint_step):
            raise ValueError(
                "reuse_meta_grad needs reweight=True, clean_step=True, no joint_step and the full meta_params (None)."
            )
        if joint_step and not clean_step:
            raise ValueError("joint_step=True adds the clean loss to the weighted step: it needs clean_step=True.")
        if clip_per_term and not joint_step:
            raise ValueError(
                "clip_per_term=True clips the two terms of a joint step apart: it needs joint_step=True (the "
                "two-step iteration already clips each step on its own)."
            )
        label_sources = tuple(label_sources)
        if any(s not in LABEL_SOURCES for s in label_sources) or len(set(label_sources)) != len(label_sources):
            raise ValueError(f"label_sources must be distinct names of {LABEL_SOURCES}, got {label_sources}.")
        if reweight and not label_sources:
            raise ValueError("reweight=True needs at least one label source.")
        if not label_sources and pc_weight <= 0 and mix_weight <= 0 and not (use_teacher and mt_weight > 0):
            raise ValueError(
                "without label sources, pc_weight, mix_weight or the mean teacher must act on the unlabeled views."
            )
        if mix_weight < 0 or not 0 < mix_fraction <= 1:
            raise ValueError(f"mix_weight must be >= 0 and mix_fraction in (0, 1], got {mix_weight}, {mix_fraction}.")
        if meta_weighting not in WEIGHTINGS:
            raise ValueError(f"meta_weighting must be one of {WEIGHTINGS}, got {meta_weighting!r}.")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}.")
        if kwargs.get("accumulation_steps", 1) != 1:
            raise ValueError(
                "MetaTrainer needs accumulation_steps=1: the look-ahead differentiates the SGD step that follows it, "
                f"so gradients cannot be accumulated across iterations; got {kwargs['accumulation_steps']}."
            )
        loss_function = loss_function or MetaReweightLoss(reduction="sum")
        if reweight and not callable(getattr(loss_function, "pixel_loss", None)):
            raise TypeError(
                "with reweight=True the loss function must have a pixel_loss(logits, sources) for the look-ahead, "
                f"e.g. MetaReweightLoss(pixel_loss=...); got {type(loss_function).__name__}."
            )
        self.supervised_only = _is_empty(train_data_loader)
        if self.supervised_only:
            logging.getLogger(__name__).warning(
                "MetaTrainer: no unlabeled data; training supervised on the clean data loader (clean steps only)."
            )
            train_data_loader = clean_data_loader
        event_names = list(event_names or []) + [MetaIterationEvents]
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            event_names=event_names,
            decollate=decollate,
            **kwargs,
        )
        #: the method's settings, JSON-compatible: a resumed run must have the same (:py:class:`ResumeFromCheckpoint`)
        self.run_settings: dict[str, Any] = describe_settings(
            {
                "clean_step": clean_step,
                "joint_step": joint_step,
                "use_teacher": use_teacher,
                "use_ple": use_ple,
                "reweight": reweight,
                "pc_weight": pc_weight,
                "mt_weight": mt_weight,
                "student_augment": student_augment,
                "clean_augment": clean_augment,
                "mt_confidence": mt_confidence,
                "teacher_ensemble": teacher_ensemble,
                "mix_weight": mix_weight,
                "mix_fraction": mix_fraction,
                "grad_clip": grad_clip,
                "clip_per_term": clip_per_term,
                "ema_decay": ema_decay,
                "teacher_noise": teacher_noise,
                "meta_params": meta_params,
                "reuse_meta_grad": reuse_meta_grad,
                "threshold": threshold,
                "label_sources": label_sources,
                "batch_norm": batch_norm,
                "meta_weighting": meta_weighting,
                "supervised_only": self.supervised_only,
            }
        )
        self.clean_data_loader = clean_data_loader
        self._clean_batches: Iterator | None = None
        self.spatial_dims = spatial_dims
        self.views = views if views is not None else PLEViews(spatial_dims)
        self.run_settings["views"] = describe_settings(self.views)
        if self.views.spatial_dims != spatial_dims:
            raise ValueError(f"views are {self.views.spatial_dims}D but spatial_dims is {spatial_dims}.")
        self.student_augment = student_augment
        self.clean_augment = clean_augment
        self.set_random_state(int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed)
        self.clean_step = clean_step
        self.joint_step = joint_step
        self.use_teacher = use_teacher and mt_weight > 0
        self.teacher_ensemble = bool(teacher_ensemble)
        self.use_ple = use_ple
        self.reweight = reweight
        self.pc_weight = float(pc_weight)
        self.mt_weight = float(mt_weight)
        self.mix_weight = float(mix_weight)
        self.mix_fraction = float(mix_fraction)
        self.grad_clip = grad_clip
        self.clip_per_term = bool(clip_per_term)
        self.teacher_noise = float(teacher_noise)
        self.reuse_meta_grad = reuse_meta_grad
        self.threshold = threshold
        self.label_sources = label_sources
        self.batch_norm = batch_norm
        self.gt_key = gt_key
        self.pc_loss = ViewConsistencyLoss()
        self.mt_loss = MeanTeacherLoss()
        #: L_mt of the unlabeled views (``mt_loss`` is L_mt of the clean views)
        self.unlabeled_mt_loss = self.mt_loss if mt_confidence is None else ConfidentPseudoLabelLoss(mt_confidence)
        self.lookahead = None
        if reweight:
            self.lookahead = MetaLookAhead(
                network, optimizer, meta_params, weighting=meta_weighting, pixel_loss=loss_function.pixel_loss
            )
        self.teacher: nn.Module | None = None
        if self.use_teacher:
            self.teacher = teacher if teacher is not None else copy.deepcopy(unwrap_network(network))
            MeanTeacherHandler(self.teacher, decay=ema_decay).attach(self)
        self._teacher_forward = self.teacher
        if self.teacher is not None and self.compile:
            self._teacher_forward = torch.compile(self.teacher, **(kwargs.get("compile_kwargs") or {}))
        self.state.weight_maps = None

    def set_random_state(self, seed: int) -> MetaTrainer:
        """
        Seed the view transform, ``student_augment`` with ``seed + 1`` and ``clean_augment`` with ``seed + 2`` when
        they are MONAI ``Randomizable`` (the other randomness follows ``torch``'s global generator).
        """
        self.views.set_random_state(seed)
        for offset, augment in enumerate((self.student_augment, self.clean_augment), start=1):
            if isinstance(augment, Randomizable):
                augment.set_random_state(seed + offset)
        return self

    def label_source_maps(self, state: Stage2State) -> dict[str, torch.Tensor]:
        """
        The label sources of the weighted term (the phase ``mlbseg.label_sources``); override to add or replace
        sources. Each source gets a weight map from the look-ahead, a term in the weighted loss, a
        ``weight_<name>`` entry in ``engine.state.output`` and an entry in ``engine.state.weight_maps["sources"]``.

        Args:
            state: the iteration so far: views, student logits and probabilities, initial and pseudo labels.

        Returns:
            ``{name: [N, 1, *S] tensor}`` in the views' frame, values in [0, 1], treated as constants; default: the
            built-in sources selected by ``label_sources``.

        Example::

            class SmoothedPredictionSource(MetaTrainer):
                def label_source_maps(self, state):
                    smoothed = F.avg_pool2d(state.probs.detach(), 3, stride=1, padding=1)
                    return {**super().label_source_maps(state), "smoothed": smoothed}
        """
        built_in = {"initial": state.initial_views, "pseudo": state.pseudo}
        return {name: built_in[name] for name in self.label_sources}

    def _train_mode(self) -> None:
        """The student in train mode; with ``batch_norm="frozen"`` its and the teacher's BatchNorm layers in eval."""
        self.network.train()
        if self.batch_norm == "frozen":
            for module in [self.network, *([self.teacher] if self.teacher is not None else [])]:
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

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

    def _views(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ViewParams]:
        views = self.views(images)
        params = self.views.params
        return views, warp_to_views(labels, params, threshold=self.threshold), params

    def _clean_views(self, state: Stage2State) -> None:
        if state.clean_views is None:
            state.clean_views, state.clean_view_labels, state.clean_params = self._views(
                state.clean_images, state.clean_labels
            )

    def _autocast(self):
        if not self.amp:
            return torch.autocast(self.state.device.type, enabled=False)
        return torch.autocast(self.state.device.type, **self.amp_kwargs)

    def _forward(self, views: torch.Tensor) -> torch.Tensor:
        """The student's logits (float32) through the inferer, under the trainer's autocast setting."""
        with self._autocast():
            return self.inferer(views, self.network).float()

    def _teacher_probs(self, views: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            noisy = views + self.teacher_noise * torch.randn_like(views)
            return torch.sigmoid(self.inferer(noisy, self._teacher_forward).float())

    def _unlabeled_teacher_probs(self, views: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """The teacher's target on the unlabeled ``views``: its own view predictions, or their PLE ensemble."""
        probs = self._teacher_probs(views)
        return ple_pseudo_labels(probs, params, threshold=None).pseudo_labels if self.teacher_ensemble else probs

    def _regularisers(
        self,
        probs: torch.Tensor,
        views: torch.Tensor,
        params: ViewParams,
        back: torch.Tensor | None,
        teacher: torch.Tensor | None = None,
        mt_loss: Callable | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        L_pc and L_mt of ``probs``; ``teacher``: the teacher's probabilities on ``views`` if already computed;
        ``mt_loss``: L_mt's loss (default ``self.mt_loss``).
        """
        zero = probs.new_zeros(())
        l_pc = self.pc_loss(probs, params, back) if self.pc_weight > 0 else zero
        if self.use_teacher and teacher is None:
            teacher = self._teacher_probs(views)
        loss = self.mt_loss if mt_loss is None else mt_loss
        l_mt = loss(probs, teacher) if self.use_teacher else zero
        return l_pc, l_mt

    def _step(self, loss: torch.Tensor, what: str, event: Any) -> None:
        """Check the loss, then backward, fire ``event``, clip, optimizer step (with the AMP grad scaler if any)."""
        check_finite(loss, self, what)
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.fire_event(event)
        self._clip_and_step(scaled=self.scaler is not None)

    def _step_per_term(self, terms: Sequence[torch.Tensor], what: str, event: Any) -> None:
        """
        Like :py:meth:`_step` for a loss that is the sum of ``terms`` with disjoint graphs: the gradient of every term
        is clipped to ``grad_clip`` on its own, then they are added (the AMP grad scaler, if any, sees their sum).
        """
        check_finite(sum(terms), self, what)
        params = [p for p in self.network.parameters() if p.requires_grad]
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        total = [torch.zeros_like(p) for p in params]
        for term in terms:
            if not term.requires_grad:
                continue
            grads = torch.autograd.grad(term * scale, params, allow_unused=True)
            grads = [torch.zeros_like(p) if g is None else g / scale for g, p in zip(grads, params)]
            if self.grad_clip is not None:  # the coefficient of torch.nn.utils.clip_grad_norm_
                coef = torch.clamp(self.grad_clip / (torch.nn.utils.get_total_norm(grads) + 1e-6), max=1.0)
                grads = [g * coef for g in grads]
            total = [t + g for t, g in zip(total, grads)]
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        for p, g in zip(params, total):
            p.grad = g * scale
        self.fire_event(event)
        self._clip_and_step(scaled=self.scaler is not None, clip=False)

    def _clip_and_step(self, scaled: bool, clip: bool = True) -> None:
        if clip and self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if scaled:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _clean_loss(
        self, views: torch.Tensor, labels: torch.Tensor, params: ViewParams, logits: torch.Tensor
    ) -> torch.Tensor:
        """The clean step's loss from the student's ``logits`` on the clean ``views``."""
        l_pc, l_mt = self._regularisers(torch.sigmoid(logits), views, params, None)
        return F.binary_cross_entropy_with_logits(logits, labels) + self.pc_weight * l_pc + self.mt_weight * l_mt

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        self._train_mode()
        iteration = self._supervised_iteration if self.supervised_only else self._meta_iteration
        if not self.compile:
            return iteration(batchdata)
        # a compiled backward may donate its saved buffers, but the student's graph is differentiated twice (the
        # regularisers' gradient for the look-ahead, then the real step); the setting is read when the graph is
        # compiled and when it is differentiated
        from torch._functorch import config as functorch_config

        with functorch_config.patch(donated_buffer=False):
            return iteration(batchdata)

    def _meta_iteration(self, batchdata: Any) -> dict:
        images, initial = self._prepare(batchdata, "an unlabeled batch (the initial label)")
        gt = batchdata.get(self.gt_key) if isinstance(batchdata, dict) else None
        state = Stage2State(images, initial, gt=None if gt is None else self._tensor(gt))
        for name in STAGE2_PHASES:
            with record_function(f"mlbseg.{name}"):
                getattr(self, f"_{name}_phase")(state)
        output = self.state.output
        output.update(self._terms(state))
        if state.gt is not None:
            self._monitor(output, state)
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _views_phase(self, state: Stage2State) -> None:
        state.clean_images, state.clean_labels = self._prepare(self._next_clean(), "a clean batch")
        state.views, state.initial_views, state.params = self._views(state.images, state.initial)
        augment = self.student_augment
        state.student_views = state.views if augment is None else augment(state.views)
        self.state.output = {Keys.IMAGE: state.student_views, Keys.LABEL: state.initial_views}
        state.logits = self.state.output[Keys.PRED] = self._forward(state.student_views)
        state.probs = torch.sigmoid(state.logits)
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        if self.use_ple:
            ple = ple_pseudo_labels(state.probs, state.params, self.threshold)
            state.pseudo, state.back = ple.pseudo_labels, ple.back
        else:
            state.pseudo = (state.probs.detach() > self.threshold).float()
        self.fire_event(MetaIterationEvents.PLE_COMPLETED)

    def _label_sources_phase(self, state: Stage2State) -> None:
        state.sources = dict(self.label_source_maps(state))

    def _weight_maps_phase(self, state: Stage2State) -> None:
        # shared by L_mt and L_mix
        teacher = self._unlabeled_teacher_probs(state.views, state.params) if self.use_teacher else None
        state.l_pc, state.l_mt = self._regularisers(
            state.probs, state.views, state.params, state.back, teacher, self.unlabeled_mt_loss
        )
        state.l_mix = self._mix_loss(state, teacher) if self.mix_weight > 0 else state.l_pc.new_zeros(())
        state.regularisation = self.pc_weight * state.l_pc + self.mt_weight * state.l_mt + self.mix_weight * state.l_mix
        if self.joint_step:
            self._clean_views(state)
            state.loss_clean = self.state.output["loss_clean"] = self._clean_step_loss(state)
        sources, views = list(state.sources.values()), state.views
        if self.lookahead is not None:
            self._clean_views(state)
            # the look-ahead runs in float32: autocast does not combine with forward-mode AD (jvp); it differentiates
            # the weighted step, whose forward is on the student's views
            result = self.lookahead(
                state.student_views,
                sources,
                state.clean_views,
                state.clean_view_labels,
                lookahead_grads=self._regulariser_grads(state),
            )
            state.weights, state.meta_loss, state.meta_grads = result.weights, result.meta_loss, result.meta_grads
        else:
            weights = torch.full((views.shape[0], len(sources), *views.shape[2:]), 1.0, device=views.device)
            state.weights = weights / weights.numel()
        self.state.weight_maps = {
            "views": views.detach(),
            "initial": state.initial_views,
            "pseudo": state.pseudo,
            "sources": dict(state.sources),
            "weights": state.weights.detach(),
            "num_views": state.params.num_views,
        }
        self.fire_event(MetaIterationEvents.WEIGHTS_COMPLETED)

    def _mix_loss(self, state: Stage2State, teacher: torch.Tensor | None) -> torch.Tensor:
        """L_mix: the student's BCE on unlabeled views with a box of a clean view pasted in, against the mixed label."""
        self._clean_views(state)
        views, clean = state.views, state.clean_views
        pick = torch.arange(views.shape[0], device=views.device) % clean.shape[0]
        box = random_box_masks(views.shape[0], views.shape[2:], self.mix_fraction, device=views.device)
        outside = state.pseudo if teacher is None else (teacher > self.threshold).float()
        images = box * clean[pick] + (1 - box) * views
        targets = box * state.clean_view_labels[pick] + (1 - box) * outside
        return F.binary_cross_entropy_with_logits(self._forward(images), targets)

    def _step_terms(self, state: Stage2State) -> torch.Tensor:
        """The weighted step's loss except the weighted term: the regularisers (plus the clean loss if joint)."""
        return state.regularisation + state.loss_clean if self.joint_step else state.regularisation

    def _regulariser_grads(self, state: Stage2State) -> dict[str, torch.Tensor | None] | None:
        """The gradient of the step's other terms by parameter name, from the real forward (``None``: none)."""
        terms = self._step_terms(state)
        if not terms.requires_grad:
            return None
        named = [(n, p) for n, p in unwrap_network(self.network).named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(terms, [p for _, p in named], retain_graph=True, allow_unused=True)
        return {n: g for (n, _), g in zip(named, grads)}

    def _weighted_step_phase(self, state: Stage2State) -> None:
        sources = list(state.sources.values())
        logits = state.logits
        state.loss_weighted = self.loss_function(logits, sources, state.weights) if sources else logits.new_zeros(())
        state.loss = self.state.output[Keys.LOSS] = state.loss_weighted + self._step_terms(state)
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        if self.clip_per_term:
            unlabeled = state.loss_weighted + state.regularisation
            self._step_per_term([unlabeled, state.loss_clean], "weighted-step loss", IterationEvents.BACKWARD_COMPLETED)
        else:
            self._step(state.loss, "weighted-step loss", IterationEvents.BACKWARD_COMPLETED)
        self.fire_event(MetaIterationEvents.REAL_STEP_COMPLETED)

    def _clean_step_phase(self, state: Stage2State) -> None:
        if not self.clean_step or self.joint_step:
            return
        self.fire_event(MetaIterationEvents.CLEAN_STEP_STARTED)
        if self.reuse_meta_grad:
            check_finite(state.meta_loss, self, "meta loss")
            state.loss_clean = self.state.output["loss_clean"] = state.meta_loss
            self._apply_meta_grads(state.meta_grads)
        else:
            self._clean_views(state)
            state.loss_clean = self.state.output["loss_clean"] = self._clean_step_loss(state)
            self._step(state.loss_clean, "clean-step loss", MetaIterationEvents.CLEAN_BACKWARD_COMPLETED)
        self.fire_event(MetaIterationEvents.CLEAN_STEP_COMPLETED)

    def _clean_step_loss(self, state: Stage2State) -> torch.Tensor:
        """The clean step's forward (student, teacher, regularisers) and loss on the clean views."""
        logits = self._forward(self._clean_student_views(state.clean_views))
        return self._clean_loss(state.clean_views, state.clean_view_labels, state.clean_params, logits)

    def _clean_student_views(self, views: torch.Tensor) -> torch.Tensor:
        """What the student sees of clean ``views``: ``clean_augment(views)``, or the views without one."""
        return views if self.clean_augment is None else self.clean_augment(views)

    def _apply_meta_grads(self, meta_grads: dict[str, torch.Tensor]) -> None:
        """Fast mode: one SGD step along ``grad L_meta(theta_hat)`` (clipped), instead of a clean forward/backward."""
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        for name, param in unwrap_network(self.network).named_parameters():
            if name in meta_grads:
                param.grad = meta_grads[name].detach().clone()
        self.fire_event(MetaIterationEvents.CLEAN_BACKWARD_COMPLETED)
        self._clip_and_step(scaled=False)

    def _terms(self, state: Stage2State) -> dict[str, float]:
        """The scalar terms of the iteration (one device-to-host copy)."""
        nan = state.loss.new_tensor(float("nan"))
        names = list(state.sources)
        terms = {
            "loss": state.loss.detach(),
            "loss_weighted": state.loss_weighted.detach(),
            "loss_pc": state.l_pc.detach(),
            "loss_mt": state.l_mt.detach(),
            "loss_mix": state.l_mix.detach(),
            "loss_meta": nan if state.meta_loss is None else state.meta_loss.detach(),
            "loss_clean": nan if state.loss_clean is None else state.loss_clean.detach().float(),
            **{
                f"weight_{name}": state.weights[:, names.index(name)].sum() if name in names else nan
                for name in dict.fromkeys([*LABEL_SOURCES, *names])
            },
            "weight_positive_fraction": (state.weights > 0).float().mean() if names else nan,
        }
        return dict(zip(terms, torch.stack(list(terms.values())).tolist()))

    def _monitor(self, output: dict, state: Stage2State) -> None:
        """Agreement with the ground truth (monitoring only; never used for training)."""
        with torch.no_grad():
            gt_views = warp_to_views(state.gt, state.params, threshold=self.threshold)
            output["dice_initial_gt"] = dice_score(state.initial_views, gt_views)
            output["dice_pseudo_gt"] = dice_score(state.pseudo, gt_views)
            output["dice_pred_gt"] = dice_score((state.probs > self.threshold).float(), gt_views)
            wrong = (state.initial_views != gt_views).float()
            if "initial" not in state.sources:
                return
            w0 = state.weights[:, list(state.sources).index("initial")][:, None]
            if 0 < wrong.sum() < wrong.numel():
                output["weight_initial_when_wrong"] = float((w0 * wrong).sum() / wrong.sum())
                output["weight_initial_when_right"] = float((w0 * (1 - wrong)).sum() / (1 - wrong).sum())

    def _supervised_iteration(self, batchdata: Any) -> dict:
        images, labels = self._prepare(batchdata, "a clean batch")
        with record_function("mlbseg.clean_step"):
            views, view_labels, params = self._views(images, labels)
            student_views = self._clean_student_views(views)
            self.state.output = {Keys.IMAGE: student_views, Keys.LABEL: view_labels}
            self.fire_event(MetaIterationEvents.CLEAN_STEP_STARTED)
            logits = self.state.output[Keys.PRED] = self._forward(student_views)
            self.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = self.state.output[Keys.LOSS] = self._clean_loss(views, view_labels, params, logits)
            self.fire_event(IterationEvents.LOSS_COMPLETED)
            self._step(loss, "clean-step loss", IterationEvents.BACKWARD_COMPLETED)
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
