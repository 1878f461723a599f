"""The stage-2 trainer of MLB-Seg: PLE pseudo labels, meta-learned pixel weights, a weighted step and a clean step."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Engine, EventEnum
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader

from monai_mlbseg.evaluation import dice_score
from monai_mlbseg.losses import MeanTeacherLoss, MetaReweightLoss, ViewConsistencyLoss
from monai_mlbseg.meta import WEIGHTINGS, MetaLookAhead, unwrap_network
from monai_mlbseg.transforms import PLEViews, ViewParams, ViewTransform, ple_pseudo_labels, warp_to_views

from .guards import check_finite
from .teacher import MeanTeacherHandler

__all__ = ["BATCH_NORM_MODES", "LABEL_SOURCES", "MetaIterationEvents", "MetaTrainer", "STAGE2_TERMS", "stage2_terms"]

#: the label sources of the weighted term: the bootstrapped initial labels and the PLE pseudo labels.
LABEL_SOURCES = ("initial", "pseudo")

#: how stage 2 treats BatchNorm layers (see :py:class:`MetaTrainer`).
BATCH_NORM_MODES = ("train", "frozen")

#: the scalar entries of ``engine.state.output`` of a :py:class:`MetaTrainer` iteration.
STAGE2_TERMS = (
    "loss",
    "loss_weighted",
    "loss_pc",
    "loss_mt",
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


class MetaIterationEvents(EventEnum):
    """
    Events fired inside a :py:class:`MetaTrainer` iteration (in addition to MONAI's ``IterationEvents``).

    - ``PLE_COMPLETED``: views, student predictions and pseudo labels are in ``engine.state.output``.
    - ``WEIGHTS_COMPLETED``: the weight maps are in ``engine.state.weight_maps`` (see :py:class:`MetaTrainer`).
    - ``REAL_STEP_COMPLETED``: after the weighted optimizer step (the mean teacher updates here).
    - ``CLEAN_STEP_COMPLETED``: after the clean-batch optimizer step (the mean teacher updates here too).
    """

    PLE_COMPLETED = "ple_completed"
    WEIGHTS_COMPLETED = "weights_completed"
    REAL_STEP_COMPLETED = "real_step_completed"
    CLEAN_STEP_COMPLETED = "clean_step_completed"


def _cycle(loader: Iterable) -> Iterator:
    """Iterate ``loader`` forever, re-iterating the same loader object (never rebuilding it)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the clean data loader is empty.")


class MetaTrainer(SupervisedTrainer):
    """
    Stage 2 of MLB-Seg (ALGORITHM steps A-E) as a MONAI ``SupervisedTrainer``.

    Every iteration takes one batch of unlabeled images with their initial labels (``train_data_loader``, keys
    ``image`` and ``label``; a ground truth under ``gt`` is used only for monitoring) and one clean batch
    (``clean_data_loader``, cycled without being rebuilt), and

    1. expands both into the PLE views and runs the student once on the unlabeled views: this forward serves the
       pseudo labels, the regularisers, the look-ahead and the weighted step;
    2. PLE pseudo labels: the view predictions mapped back, averaged, warped into every view, thresholded;
    3. look-ahead weight maps for (initial label, pseudo label) per pixel
       (:py:class:`~monai_mlbseg.meta.MetaLookAhead`);
    4. weighted step: ``sum(w * l) + pc_weight * L_pc + mt_weight * L_mt``, gradient-norm clip, SGD step, EMA;
    5. clean step: mean BCE on the clean views ``+ L_pc + L_mt``, clip, SGD step, EMA.

    ``engine.state.output`` holds MONAI's ``image``/``label``/``pred``/``loss`` plus the scalar terms of
    :py:data:`STAGE2_TERMS` (and ``dice_*_gt`` monitoring entries when a ground truth is given);
    ``engine.state.weight_maps`` holds the latest views, labels and weight maps for visualisation handlers.
    When the unlabeled loader is empty, the trainer falls back to supervised training on the clean loader
    (clean steps only), so a bundle still trains when it is handed labeled pairs only.

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
        use_teacher: add the mean-teacher term L_mt.
        use_ple: PLE pseudo labels; off: each view's own thresholded prediction.
        reweight: meta-learned weights; off: uniform weights (plain bootstrapping).
        pc_weight: weight of L_pc.
        mt_weight: weight of L_mt.
        grad_clip: gradient-norm clip of both steps (``None``: no clipping).
        ema_decay: EMA decay of the teacher.
        teacher_noise: std of the Gaussian noise added to the teacher's input.
        meta_params: restrict the meta-gradient to these parameter names/prefixes (approximation; default all).
        reuse_meta_grad: fast mode: the clean step uses ``grad L_meta(theta_hat)`` from the look-ahead instead of
            its own forward/backward (approximation; needs ``reweight`` and the full ``meta_params``).
        threshold: threshold of the pseudo labels and the warped labels.
        label_sources: the label sources of the weighted term, a subset of :py:data:`LABEL_SOURCES` in that
            order (default both, as the reference). ``("initial",)`` with ``reweight=False`` is plain self-training
            on the bootstrapped labels; ``()`` drops the weighted term (e.g. a mean-teacher baseline: only the
            regularisers act on the unlabeled views).
        meta_weighting: how the meta-gradient becomes weight maps: ``"gradient"`` (the reference: proportional to
            the positive part of ``-dL_meta/d eps``, which grows with each pixel's loss gradient) or ``"sign"`` (every
            pixel with a positive entry weighted alike), see :py:func:`~monai_mlbseg.meta.normalise_weights`.
        batch_norm: ``"train"`` (the reference): BatchNorm layers normalise every forward with its batch's
            statistics (the five views of one slice) and update their running statistics; ``"frozen"``: BatchNorm
            layers of the student and the teacher stay in eval mode throughout stage 2, normalising with the
            stage-1 running statistics (their affine parameters are still trained).
        seed: seed of the view transform; default: drawn from ``torch``'s global generator, so that
            ``monai.utils.set_determinism`` makes runs repeatable.
        image_key, label_key, gt_key: batch keys.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (handlers, amp, epoch_length, ...).
            ``amp`` runs the plain forwards under ``torch.autocast`` (``amp_kwargs={"dtype": torch.bfloat16}`` for
            bf16); ``compile=True`` (with ``compile_kwargs``) wraps the student's and the teacher's plain forwards
            in ``torch.compile``. The look-ahead always runs eagerly in float32 (forward-mode AD through a
            functional call of the unwrapped network).

    Raises:
        TypeError: when the optimizer is not SGD (with ``reweight``).
        ValueError: on inconsistent options.

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
        use_teacher: bool = True,
        use_ple: bool = True,
        reweight: bool = True,
        pc_weight: float = 1.0,
        mt_weight: float = 1.0,
        grad_clip: float | None = 0.2,
        ema_decay: float = 0.99,
        teacher_noise: float = 0.02,
        meta_params: Sequence[str] | None = None,
        reuse_meta_grad: bool = False,
        threshold: float = 0.5,
        label_sources: Sequence[str] = LABEL_SOURCES,
        batch_norm: str = "train",
        meta_weighting: str = "gradient",
        seed: int | None = None,
        image_key: str = "image",
        label_key: str = "label",
        gt_key: str = "gt",
        loss_function: Callable | None = None,
        event_names: list | None = None,
        decollate: bool = False,
        **kwargs: Any,
    ) -> None:
        if reuse_meta_grad and (not reweight or meta_params is not None or not clean_step):
            raise ValueError("reuse_meta_grad needs reweight=True, clean_step=True and the full meta_params (None).")
        label_sources = tuple(label_sources)
        if any(s not in LABEL_SOURCES for s in label_sources) or len(set(label_sources)) != len(label_sources):
            raise ValueError(f"label_sources must be distinct names of {LABEL_SOURCES}, got {label_sources}.")
        if reweight and not label_sources:
            raise ValueError("reweight=True needs at least one label source.")
        if not label_sources and pc_weight <= 0 and not (use_teacher and mt_weight > 0):
            raise ValueError("without label sources, pc_weight or the mean teacher must act on the unlabeled views.")
        if meta_weighting not in WEIGHTINGS:
            raise ValueError(f"meta_weighting must be one of {WEIGHTINGS}, got {meta_weighting!r}.")
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm must be one of {BATCH_NORM_MODES}, got {batch_norm!r}.")
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
            loss_function=loss_function or MetaReweightLoss(),
            event_names=event_names,
            decollate=decollate,
            **kwargs,
        )
        self.clean_data_loader = clean_data_loader
        self._clean_batches: Iterator | None = None
        self.spatial_dims = spatial_dims
        self.views = views if views is not None else PLEViews(spatial_dims)
        if self.views.spatial_dims != spatial_dims:
            raise ValueError(f"views are {self.views.spatial_dims}D but spatial_dims is {spatial_dims}.")
        self.set_random_state(int(torch.randint(0, 2**31 - 1, (1,)).item()) if seed is None else seed)
        self.clean_step = clean_step
        self.use_teacher = use_teacher and mt_weight > 0
        self.use_ple = use_ple
        self.reweight = reweight
        self.pc_weight = float(pc_weight)
        self.mt_weight = float(mt_weight)
        self.grad_clip = grad_clip
        self.teacher_noise = float(teacher_noise)
        self.reuse_meta_grad = reuse_meta_grad
        self.threshold = threshold
        self.label_sources = tuple(label_sources)
        self.batch_norm = batch_norm
        self.image_key, self.label_key, self.gt_key = image_key, label_key, gt_key
        self.pc_loss = ViewConsistencyLoss()
        self.mt_loss = MeanTeacherLoss()
        self.lookahead = MetaLookAhead(network, optimizer, meta_params, weighting=meta_weighting) if reweight else None
        self.teacher: nn.Module | None = None
        if self.use_teacher:
            self.teacher = teacher if teacher is not None else copy.deepcopy(unwrap_network(network))
            MeanTeacherHandler(self.teacher, decay=ema_decay).attach(self)
        self._teacher_forward = self.teacher
        if self.teacher is not None and self.compile:
            self._teacher_forward = torch.compile(self.teacher, **(kwargs.get("compile_kwargs") or {}))
        self.state.weight_maps = None

    def set_random_state(self, seed: int) -> MetaTrainer:
        """Seed the view transform (the other randomness follows ``torch``'s global generator)."""
        self.views.set_random_state(seed)
        return self

    def _train_mode(self) -> None:
        """The student in train mode; with ``batch_norm="frozen"`` its and the teacher's BatchNorm layers in eval."""
        self.network.train()
        if self.batch_norm == "frozen":
            for module in [self.network, *([self.teacher] if self.teacher is not None else [])]:
                for m in module.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def _next_clean(self) -> dict:
        if self._clean_batches is None:
            self._clean_batches = _cycle(self.clean_data_loader)
        return next(self._clean_batches)

    def _tensor(self, batch: dict, key: str) -> torch.Tensor | None:
        value = batch.get(key)
        if value is None:
            return None
        value = value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)
        return value.to(self.state.device, non_blocking=self.non_blocking).float()

    def _views(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, ViewParams]:
        views = self.views(images)
        params = self.views.params
        return views, warp_to_views(labels, params, threshold=self.threshold), params

    def _autocast(self):
        if not self.amp:
            return torch.autocast(self.state.device.type, enabled=False)
        return torch.autocast(self.state.device.type, **self.amp_kwargs)

    def _forward(self, views: torch.Tensor) -> torch.Tensor:
        """The student's logits (float32) under the trainer's autocast setting."""
        with self._autocast():
            return self.network(views).float()

    def _teacher_probs(self, views: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            noisy = views + self.teacher_noise * torch.randn_like(views)
            return torch.sigmoid(self._teacher_forward(noisy).float())

    def _regularisers(
        self, probs: torch.Tensor, views: torch.Tensor, params: ViewParams, back: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zero = probs.new_zeros(())
        l_pc = self.pc_loss(probs, params, back) if self.pc_weight > 0 else zero
        l_mt = self.mt_loss(probs, self._teacher_probs(views)) if self.use_teacher else zero
        return l_pc, l_mt

    def _step(self, loss: torch.Tensor, what: str) -> None:
        """Check the loss, then backward, clip, optimizer step (with the AMP grad scaler when there is one)."""
        check_finite(loss, self, what)
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        self.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _clean_loss(
        self, views: torch.Tensor, labels: torch.Tensor, params: ViewParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._forward(views)
        probs = torch.sigmoid(logits)
        l_pc, l_mt = self._regularisers(probs, views, params, None)
        loss = F.binary_cross_entropy_with_logits(logits, labels) + self.pc_weight * l_pc + self.mt_weight * l_mt
        return loss, logits

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if not self.compile:
            return self._meta_iteration(engine, batchdata)
        # a compiled backward may donate its saved buffers, but the student's graph is differentiated twice (the
        # regularisers' gradient for the look-ahead, then the real step); the setting is read when the graph is
        # compiled and when it is differentiated
        from torch._functorch import config as functorch_config

        with functorch_config.patch(donated_buffer=False):
            return self._meta_iteration(engine, batchdata)

    def _meta_iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        self._train_mode()
        if self.supervised_only:
            return self._supervised_iteration(batchdata)
        images = self._tensor(batchdata, self.image_key)
        initial = self._tensor(batchdata, self.label_key)
        if images is None or initial is None:
            raise KeyError(f"an unlabeled batch needs '{self.image_key}' and '{self.label_key}' (the initial label).")
        gt = self._tensor(batchdata, self.gt_key)
        clean = self._next_clean()
        clean_images, clean_labels = self._tensor(clean, self.image_key), self._tensor(clean, self.label_key)

        views, initial_views, params = self._views(images, initial)
        logits = self._forward(views)
        probs = torch.sigmoid(logits)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if self.use_ple:
            ple = ple_pseudo_labels(probs, params, self.threshold)
            pseudo, back = ple.pseudo_labels, ple.back
        else:
            pseudo, back = (probs.detach() > self.threshold).float(), None
        available = {"initial": initial_views, "pseudo": pseudo}
        sources = [available[name] for name in self.label_sources]
        engine.state.output = {Keys.IMAGE: views, Keys.LABEL: initial_views, Keys.PRED: logits}
        engine.fire_event(MetaIterationEvents.PLE_COMPLETED)

        l_pc, l_mt = self._regularisers(probs, views, params, back)
        extra = self.pc_weight * l_pc + self.mt_weight * l_mt
        clean_views = clean_view_labels = clean_params = None
        meta_loss, meta_grads = None, None
        if self.reweight:
            clean_views, clean_view_labels, clean_params = self._views(clean_images, clean_labels)
            lookahead_grads = None
            if extra.requires_grad:
                named = [(n, p) for n, p in unwrap_network(self.network).named_parameters() if p.requires_grad]
                grads = torch.autograd.grad(extra, [p for _, p in named], retain_graph=True, allow_unused=True)
                lookahead_grads = {n: g for (n, _), g in zip(named, grads)}
            # the look-ahead runs in float32: autocast does not combine with forward-mode AD (jvp)
            result = self.lookahead(views, sources, clean_views, clean_view_labels, lookahead_grads=lookahead_grads)
            weights, meta_loss, meta_grads = result.weights, result.meta_loss, result.meta_grads
        else:
            weights = torch.full((views.shape[0], len(sources), *views.shape[2:]), 1.0, device=views.device)
            weights = weights / weights.numel()
        engine.state.weight_maps = {
            "views": views.detach(),
            "initial": initial_views,
            "pseudo": pseudo,
            "weights": weights.detach(),
            "num_views": params.num_views,
        }
        engine.fire_event(MetaIterationEvents.WEIGHTS_COMPLETED)

        weighted = self.loss_function(logits, sources, weights) if sources else logits.new_zeros(())
        loss = weighted + extra
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._step(loss, "weighted-step loss")
        engine.fire_event(MetaIterationEvents.REAL_STEP_COMPLETED)

        clean_loss = None
        if self.clean_step:
            if self.reuse_meta_grad:
                check_finite(meta_loss, self, "meta loss")
                self._apply_meta_grads(meta_grads)
                clean_loss = meta_loss
            else:
                if clean_views is None:
                    clean_views, clean_view_labels, clean_params = self._views(clean_images, clean_labels)
                clean_loss, _ = self._clean_loss(clean_views, clean_view_labels, clean_params)
                self._step(clean_loss, "clean-step loss")
            engine.fire_event(MetaIterationEvents.CLEAN_STEP_COMPLETED)

        scalars = torch.stack(
            [
                loss.detach(),
                weighted.detach(),
                l_pc.detach(),
                l_mt.detach(),
                loss.new_tensor(float("nan")) if meta_loss is None else meta_loss.detach(),
                loss.new_tensor(float("nan")) if clean_loss is None else clean_loss.detach().float(),
                *(self._source_weight(weights, name) for name in LABEL_SOURCES),
                (weights > 0).float().mean() if sources else loss.new_tensor(float("nan")),
            ]
        ).tolist()
        output = engine.state.output
        output.update(zip(STAGE2_TERMS, scalars))
        if gt is not None:
            self._monitor(output, gt, params, initial_views, pseudo, probs, weights)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _source_weight(self, weights: torch.Tensor, name: str) -> torch.Tensor:
        """The total weight of label source ``name`` (NaN when it is not one of ``label_sources``)."""
        if name not in self.label_sources:
            return weights.new_tensor(float("nan"))
        return weights[:, self.label_sources.index(name)].sum()

    def _apply_meta_grads(self, meta_grads: dict[str, torch.Tensor]) -> None:
        """Fast mode: one SGD step along ``grad L_meta(theta_hat)`` (clipped), instead of a clean forward/backward."""
        self.optimizer.zero_grad(set_to_none=self.optim_set_to_none)
        for name, param in unwrap_network(self.network).named_parameters():
            if name in meta_grads:
                param.grad = meta_grads[name].detach().clone()
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        self.optimizer.step()

    def _monitor(
        self,
        output: dict,
        gt: torch.Tensor,
        params: ViewParams,
        initial_views: torch.Tensor,
        pseudo: torch.Tensor,
        probs: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Agreement with the ground truth (monitoring only; never used for training)."""
        with torch.no_grad():
            gt_views = warp_to_views(gt, params, threshold=self.threshold)
            output["dice_initial_gt"] = dice_score(initial_views, gt_views)
            output["dice_pseudo_gt"] = dice_score(pseudo, gt_views)
            output["dice_pred_gt"] = dice_score((probs > self.threshold).float(), gt_views)
            wrong = (initial_views != gt_views).float()
            if "initial" not in self.label_sources:
                return
            w0 = weights[:, self.label_sources.index("initial")][:, None]
            if 0 < wrong.sum() < wrong.numel():
                output["weight_initial_when_wrong"] = float((w0 * wrong).sum() / wrong.sum())
                output["weight_initial_when_right"] = float((w0 * (1 - wrong)).sum() / (1 - wrong).sum())

    def _supervised_iteration(self, batchdata: dict[str, Any]) -> dict:
        images, labels = self._tensor(batchdata, self.image_key), self._tensor(batchdata, self.label_key)
        if images is None or labels is None:
            raise KeyError(f"a clean batch needs '{self.image_key}' and '{self.label_key}'.")
        views, view_labels, params = self._views(images, labels)
        loss, logits = self._clean_loss(views, view_labels, params)
        self.state.output = {Keys.IMAGE: views, Keys.LABEL: view_labels, Keys.PRED: logits}
        self.fire_event(IterationEvents.FORWARD_COMPLETED)
        self.fire_event(IterationEvents.LOSS_COMPLETED)
        self._step(loss, "clean-step loss")
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
