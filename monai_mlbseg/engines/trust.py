"""
Pseudo-label trust: pixel weightings that decide how much each pseudo-label pixel (or slice) counts, beyond the fixed
confidence threshold of :py:class:`~monai_mlbseg.engines.ConfidenceWeighting`:

- :py:class:`AdaptiveConfidenceWeighting`: a label-free soft threshold that follows the teacher's confidence
  (SoftMatch's truncated Gaussian, per predicted class, from exponential moving averages);
- :py:class:`NormalisedMetaWeighting`: MLB-Seg's per-pixel meta-gradient, scale-normalised and bounded, correcting a
  prior weighting instead of replacing it;
- :py:class:`InstanceMetaWeighting`: one meta weight per unlabeled view, from the clean data's gradient direction;
- :py:class:`AmortisedMetaWeighting`: a small persistent network mapping per-pixel features to a weight, trained
  across iterations by the look-ahead's meta-gradient;
- :py:class:`QualityWeighting` with a :py:class:`QualityPredictor`: a per-view weight from a predictor of a label's
  Dice, trained on the labeled slices only, and :py:class:`QualityTerm`, its quality-aware regulariser.

Every one works with any label source, in the weak-to-strong method (the teacher's labels of the views, the student on
their strong perturbation) as in the reference (initial and pseudo labels). A weighting with a state (running
statistics, a network and its optimizer) saves it with the trainer's checkpoint (``state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn

from .context import Stage2Context
from .parts import (
    ConfidenceWeighting,
    MetaWeighting,
    PixelWeighting,
    UnlabeledTerm,
    WeightMaps,
    _named_grads,
    _shape,
)

if TYPE_CHECKING:
    from .meta_trainer import MetaTrainer

__all__ = [
    "TRUSTS",
    "AdaptiveConfidenceWeighting",
    "AmortisedMetaWeighting",
    "InstanceMetaWeighting",
    "NormalisedMetaWeighting",
    "QualityPredictor",
    "QualityTerm",
    "QualityWeighting",
    "pseudo_label_trust",
    "soft_dice_per_view",
]


def _confidence_probs(ctx: Stage2Context) -> torch.Tensor:
    """The probabilities a confidence is read from: the mean teacher's, or the student's own (detached)."""
    return ctx.teacher_probs() if ctx.trainer.mean_teacher is not None else ctx.probs.detach()


def _per_pixel(ctx: Stage2Context, sources: Sequence[torch.Tensor], weights: torch.Tensor) -> WeightMaps:
    """``[N, 1 or n, *S]`` weights in ``[0, 1]`` (or a little above) as maps of every source, divided by their count."""
    weights = weights.expand(_shape(ctx, sources))
    return WeightMaps(weights / weights.numel())


class AdaptiveConfidenceWeighting(PixelWeighting):
    """
    A label-free adaptive confidence weight (SoftMatch, Chen et al. 2023, per class as FreeMatch): with ``c`` the
    teacher's confidence ``max(t, 1 - t)`` of a pixel predicted as class ``k`` (foreground or background), the weight
    is 1 where ``c >= mu_k`` and ``exp(-(c - mu_k)^2 / (2 var_k))`` below, where ``mu_k`` and ``var_k`` are
    exponential moving averages of the mean and variance of ``c`` over the class's pixels. The threshold follows the
    teacher as it grows surer, and foreground pixels (rarer, less sure) get their own. Weights are divided by the
    number of entries, as :py:class:`~monai_mlbseg.engines.ConfidenceWeighting`'s.

    Args:
        momentum: the moving averages' momentum (SoftMatch: 0.999 over a million iterations; stage 2 is short).
        initial_mean: ``mu_k`` before the first batch (SoftMatch: ``1 / classes``).
        initial_var: ``var_k`` before the first batch.

    Raises:
        ValueError: when ``momentum`` is outside ``[0, 1)`` or ``initial_var`` is not positive.

    Example::

        trainer = MetaTrainer(..., sources=[TeacherLabels()], weighting=AdaptiveConfidenceWeighting(momentum=0.99))
    """

    def __init__(self, momentum: float = 0.99, initial_mean: float = 0.5, initial_var: float = 1.0) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}.")
        if initial_var <= 0:
            raise ValueError(f"initial_var must be positive, got {initial_var}.")
        self.momentum, self.initial_mean, self.initial_var = float(momentum), float(initial_mean), float(initial_var)
        self.mean = torch.full((2,), self.initial_mean, dtype=torch.float64)
        self.var = torch.full((2,), self.initial_var, dtype=torch.float64)

    def update(self, confidence: torch.Tensor, predicted: torch.Tensor) -> None:
        """Move ``mean`` and ``var`` of each class towards the batch's (a class absent from the batch keeps its)."""
        for k in range(2):
            values = confidence[predicted == k].double().cpu()
            if values.numel() == 0:
                continue
            var = values.var(unbiased=False)
            self.mean[k] = self.momentum * self.mean[k] + (1 - self.momentum) * values.mean()
            self.var[k] = self.momentum * self.var[k] + (1 - self.momentum) * var

    def weights(self, probs: torch.Tensor) -> torch.Tensor:
        """Update the averages with ``probs`` (teacher probabilities), then the per-pixel weights in ``[0, 1]``."""
        confidence = torch.maximum(probs, 1 - probs)
        predicted = (probs > 0.5).long()
        self.update(confidence, predicted)
        mean = self.mean.to(probs)[predicted]
        var = self.var.to(probs)[predicted].clamp_min(1e-12)
        soft = torch.exp(-((confidence - mean) ** 2) / (2 * var))
        return torch.where(confidence >= mean, torch.ones_like(soft), soft)

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        return _per_pixel(ctx, sources, self.weights(_confidence_probs(ctx)))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The moving averages."""
        return {"mean": self.mean.clone(), "var": self.var.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the moving averages."""
        self.mean, self.var = state["mean"].clone().double(), state["var"].clone().double()


def _bounded(score: torch.Tensor, temperature: float) -> torch.Tensor:
    """``2 sigmoid(score / (mean |score| T))``: 1 where the score is 0, in ``(0, 2)``, free of the score's scale."""
    scale = score.abs().mean().clamp_min(1e-20)
    return 2 * torch.sigmoid(score / (scale * temperature))


class _PriorMetaWeighting(MetaWeighting):
    """A meta weighting that corrects the weights of a ``prior`` weighting (the look-ahead differentiates them)."""

    def __init__(
        self, prior: PixelWeighting | None = None, temperature: float = 1.0, meta_params: Sequence[str] | None = None
    ) -> None:
        super().__init__(meta_params)
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}.")
        self.prior = ConfidenceWeighting(0.95) if prior is None else prior
        self.temperature = float(temperature)

    def attach(self, trainer: MetaTrainer) -> None:
        super().attach(trainer)
        self.prior.attach(trainer)

    def correction(self, prior: torch.Tensor, neg_meta_grad: torch.Tensor) -> torch.Tensor:
        """The factor the prior's weights are multiplied with."""
        raise NotImplementedError

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        prior = self.prior(ctx, sources, step_terms).weights
        clean = ctx.clean()
        result = self.lookahead(
            ctx.student_views, sources, clean.views, clean.labels, lookahead_grads=_named_grads(ctx, step_terms)
        )
        weights = prior * self.correction(prior, result.neg_meta_grad)
        return WeightMaps(weights, result.meta_loss, result.meta_grads)


class NormalisedMetaWeighting(_PriorMetaWeighting):
    """
    MLB-Seg's per-pixel meta-gradient made usable (the normalisation L2B applies): with ``x = -dL_meta/d eps`` of a
    pixel (the look-ahead of :py:class:`~monai_mlbseg.engines.MetaWeighting`), its weight is the ``prior``'s times
    ``2 sigmoid(x / (mean |x| T))``, so the meta signal raises (up to twice) or lowers (towards 0) a pixel's trust
    without its scale mattering, and a few large-gradient boundary pixels cannot take all the weight.

    Args:
        prior: the weighting corrected (default: the fixed 0.95 confidence threshold); the look-ahead is taken at
            ``eps = 0`` whatever the prior.
        temperature: ``T``; larger flattens the correction towards 1.
        meta_params: as :py:class:`~monai_mlbseg.engines.MetaWeighting`.

    Raises:
        ValueError: when ``temperature`` is not positive.
        TypeError: (at attach) as :py:class:`~monai_mlbseg.engines.MetaWeighting`.
    """

    def correction(self, prior: torch.Tensor, neg_meta_grad: torch.Tensor) -> torch.Tensor:
        return _bounded(neg_meta_grad, self.temperature)


class InstanceMetaWeighting(_PriorMetaWeighting):
    """
    One meta weight per unlabeled view (instance-level meta re-weighting, as DII weighs weakly-labeled instances by
    the strong labels' gradient direction): ``X_n = sum_p prior_np x_np`` is ``-dL_meta/d s_n`` for a factor ``s_n``
    on view ``n``'s prior-weighted loss, i.e. how far one step on that view's labels moves the model towards the
    clean data; the view's weights are the ``prior``'s times ``2 sigmoid(X_n / (mean |X| T))``. Per-pixel noise of
    the meta-gradient averages out over a view.

    Args:
        prior: the per-pixel weighting scaled per view (default: the fixed 0.95 confidence threshold).
        temperature: ``T``.
        meta_params: as :py:class:`~monai_mlbseg.engines.MetaWeighting`.

    Raises:
        ValueError: when ``temperature`` is not positive.
        TypeError: (at attach) as :py:class:`~monai_mlbseg.engines.MetaWeighting`.
    """

    def correction(self, prior: torch.Tensor, neg_meta_grad: torch.Tensor) -> torch.Tensor:
        per_view = (prior * neg_meta_grad).flatten(1).sum(1)
        shape = (-1,) + (1,) * (prior.ndim - 1)
        return _bounded(per_view, self.temperature).view(shape)


def pixel_features(ctx: Stage2Context, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """
    ``[N, 5, *S]`` per-pixel features of the trust in a label, all in ``[0, 1]`` and label-free: the teacher's
    confidence ``2 max(t, 1 - t) - 1``, its predicted class, the disagreement ``|s - t|`` of the student's
    probability on what it saw (the strong view) with the teacher's, and the agreement of the first label source
    with the initial labels and with the PLE pseudo labels.
    """
    teacher = _confidence_probs(ctx)
    hard = (teacher > 0.5).float()
    label = sources[0] if sources else hard
    features = [
        2 * torch.maximum(teacher, 1 - teacher) - 1,
        hard,
        (ctx.probs.detach() - teacher).abs(),
        (label == ctx.unlabeled.labels).float(),
        (label == ctx.pseudo).float(),
    ]
    return torch.cat(features, dim=1)


class _WeightNet(nn.Module):
    """``sigmoid(k (f_0 - c) + mlp(f))``: a confidence threshold at first (``mlp``'s last layer starts at 0)."""

    def __init__(self, spatial_dims: int, features: int, hidden: int, threshold: float, sharpness: float) -> None:
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.mlp = nn.Sequential(conv(features, hidden, 1), nn.ReLU(), conv(hidden, 1, 1))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)
        self.offset = 2 * threshold - 1
        self.sharpness = sharpness

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.sharpness * (features[:, :1] - self.offset) + self.mlp(features))


class AmortisedMetaWeighting(MetaWeighting):
    """
    An amortised meta weighting (Meta-Weight-Net's idea for pixels): a small persistent network maps label-free
    per-pixel features (:py:func:`pixel_features`: teacher confidence and class, view disagreement, agreement of the
    label sources) to a weight in ``(0, 1)``. It starts as a soft 0.95 confidence threshold and learns across
    iterations from the look-ahead's meta-gradient ``x = -dL_meta/d eps``: each iteration takes one Adam step on
    ``-sum (x - mean x) w(f) / mean |x|``, raising the weight of pixels like those whose labels move the model
    towards the clean data relative to the others. The network decides how the weight is shared, not how much there
    is: its weights are rescaled so that their mean is that of the ``threshold``'s hard weights on the same pixels
    (capped at ``max_weight``), since its objective, blind to a common shift of the weights, let their scale drift to
    0 (mean weight 0.01 after 300 iterations on real scans: the unlabeled loss switched off). Its weights are divided
    by the number of entries.

    Args:
        hidden: width of the network's hidden layer (1x1 convolutions).
        lr: its Adam learning rate.
        threshold: the confidence threshold it starts as.
        sharpness: the slope of the starting threshold in the confidence feature ``2 c - 1``: soft enough that the
            meta-gradient reaches pixels some way from the threshold (at 50 the sigmoid saturates and nothing learns
            outside ``0.95 +- 0.02``).
        max_weight: the largest weight of a pixel after the rescaling.
        meta_params: as :py:class:`~monai_mlbseg.engines.MetaWeighting`.

    Raises:
        TypeError: (at attach) as :py:class:`~monai_mlbseg.engines.MetaWeighting`.

    Example::

        trainer = MetaTrainer(..., sources=[TeacherLabels()], weighting=AmortisedMetaWeighting(lr=1e-2))
    """

    def __init__(
        self,
        hidden: int = 16,
        lr: float = 1e-2,
        threshold: float = 0.95,
        sharpness: float = 20.0,
        max_weight: float = 2.0,
        meta_params: Sequence[str] | None = None,
    ) -> None:
        super().__init__(meta_params)
        self.hidden, self.lr, self.threshold, self.sharpness = int(hidden), float(lr), float(threshold), sharpness
        self.max_weight = float(max_weight)
        self.net: _WeightNet | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def attach(self, trainer: MetaTrainer) -> None:
        super().attach(trainer)
        self.net = _WeightNet(trainer.spatial_dims, 5, self.hidden, self.threshold, self.sharpness)
        self.net.to(trainer.state.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        clean = ctx.clean()
        result = self.lookahead(
            ctx.student_views, sources, clean.views, clean.labels, lookahead_grads=_named_grads(ctx, step_terms)
        )
        features = pixel_features(ctx, sources)
        x = result.neg_meta_grad.sum(1, keepdim=True)
        with torch.enable_grad():
            objective = -((x - x.mean()) * self.net(features)).sum() / x.abs().sum().clamp_min(1e-20)
            self.optimizer.zero_grad(set_to_none=True)
            objective.backward()
        self.optimizer.step()
        with torch.no_grad():
            weights = self.net(features)
            hard = (features[:, :1] >= 2 * self.threshold - 1).to(weights.dtype)  # the threshold's own weights
            weights = (weights * hard.mean() / weights.mean().clamp_min(1e-12)).clamp(max=self.max_weight)
        maps = _per_pixel(ctx, sources, weights)
        return WeightMaps(maps.weights, result.meta_loss, result.meta_grads)

    def state_dict(self) -> dict[str, Any]:
        """The weight network and its optimizer."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weight network and its optimizer."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])


def soft_dice_per_view(mask: torch.Tensor, truth: torch.Tensor, empty: float = 1.0) -> torch.Tensor:
    """
    ``[N]`` the Dice of each view's ``mask`` (``[N, 1, *S]``, values in ``[0, 1]``) against ``truth``; ``empty``
    where both are empty.
    """
    inter = (mask * truth).flatten(1).sum(1)
    total = mask.flatten(1).sum(1) + truth.flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.full_like(total, empty))


def corrupt_masks(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """
    Imperfect versions of binary ``labels`` ``[N, 1, H, W]``: per view a random mix of dilation or erosion (by a
    random odd kernel), a shift of up to an eighth of the size, and a dropped or added box, so that their Dice against
    ``labels`` spreads over ``[0, 1]``.
    """
    out = []
    size = labels.shape[-1]
    for label in labels:
        mask = label[None]
        k = 2 * int(torch.randint(0, 4, (1,), generator=generator)) + 1
        if k > 1:
            if torch.rand((), generator=generator) < 0.5:
                mask = F.max_pool2d(mask, k, 1, k // 2)
            else:
                mask = -F.max_pool2d(-mask, k, 1, k // 2)
        if torch.rand((), generator=generator) < 0.5:
            dy, dx = (int(v) for v in torch.randint(-size // 8, size // 8 + 1, (2,), generator=generator))
            mask = torch.roll(mask, (dy, dx), dims=(-2, -1))
        if torch.rand((), generator=generator) < 0.5:
            half = max(1, size // 6)
            y, x = (int(v) for v in torch.randint(0, size - half, (2,), generator=generator))
            mask = mask.clone()
            mask[..., y : y + half, x : x + half] = float(torch.rand((), generator=generator) < 0.5)
        out.append(mask[0])
    return torch.stack(out)


class QualityPredictor(nn.Module):
    """
    Predicts the Dice of a segmentation from the image and the mask (quality-guided semi-supervised learning's idea,
    for 2D slices): a small CNN on ``[image, mask]`` with a sigmoid output. It is fitted once, before stage 2's first
    iteration, on the labeled slices only: :py:func:`corrupt_masks` of their expert labels and the student's own
    predictions of their strongly perturbed views, each with its true Dice as the target (mean squared error).

    Args:
        in_channels: image channels.
        width: channels of the first convolution (doubled twice).
        steps: Adam steps of the fit.
        batch_views: views per fitting step.
        lr: Adam learning rate.
        augment: perturbs the labeled views before the student predicts them (default: the student's own
            ``student_augment``, or the views as they are).
        seed: seed of the fit's corruptions.

    Example::

        predictor = QualityPredictor()
        trainer = MetaTrainer(..., sources=[TeacherLabels()], weighting=QualityWeighting(predictor),
                              terms=[QualityTerm(predictor, weight=0.1)])
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 16,
        steps: int = 300,
        batch_views: int = 16,
        lr: float = 1e-3,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels, self.width, self.steps, self.batch_views = in_channels, width, int(steps), int(batch_views)
        self.lr, self.augment, self.seed = float(lr), augment, int(seed)
        layers: list[nn.Module] = []
        channels = in_channels + 1
        for i in range(3):
            layers += [nn.Conv2d(channels, width * 2**i, 3, stride=2, padding=1), nn.InstanceNorm2d(width * 2**i)]
            layers.append(nn.LeakyReLU(0.1))
            channels = width * 2**i
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 1)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        #: the last fit's mean absolute error on its final 10 % of steps
        self.fit_error = math.nan
        self._attached: set[int] = set()

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``[N]`` predicted Dice of ``masks`` (``[N, 1, H, W]`` in ``[0, 1]``) for ``images``."""
        pooled = self.features(torch.cat([images, masks], dim=1)).mean(dim=(-2, -1))
        return torch.sigmoid(self.head(pooled))[:, 0]

    def attach(self, trainer: MetaTrainer) -> None:
        """Fit on the trainer's labeled (clean) loader when it starts, unless a resumed checkpoint has a fit."""
        if id(trainer) in self._attached:
            return
        if trainer.spatial_dims != 2:
            raise ValueError("QualityPredictor works on 2D slices; the trainer's spatial_dims is not 2.")
        self._attached.add(id(trainer))
        self.to(trainer.state.device)
        trainer.add_event_handler(Events.STARTED, self._fit_unless_fitted)

    def _fit_unless_fitted(self, trainer: MetaTrainer) -> None:
        if not bool(self.fitted):
            self.fit(trainer)

    def training_pairs(self, trainer: MetaTrainer, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Views of a labeled batch, imperfect masks of them and the masks' true Dice."""
        images, labels = trainer._prepare(trainer._next_clean(), "a clean batch")
        batch = trainer.make_views(images, labels)
        views, truth = batch.views[: self.batch_views], batch.labels[: self.batch_views]
        augment = self.augment or trainer.student_augment
        with torch.no_grad():
            seen = views if augment is None else augment(views)
            predicted = (torch.sigmoid(trainer.forward(seen)) > trainer.threshold).float()
        half = views.shape[0] // 2
        masks = torch.cat([corrupt_masks(truth[:half], generator), predicted[half:]])
        return views, masks, soft_dice_per_view(masks, truth)

    def fit(self, trainer: MetaTrainer) -> None:
        """Fit on the labeled slices (the student is only read); restores the student's train/eval mode."""
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        errors = []
        was_training = trainer.network.training
        trainer.network.eval()
        self.train()
        for _ in range(self.steps):
            views, masks, dice = self.training_pairs(trainer, generator)
            with torch.enable_grad():
                predicted = self(views, masks)
                loss = F.mse_loss(predicted, dice)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            errors.append(float((predicted.detach() - dice).abs().mean()))
        trainer.network.train(was_training)
        self.eval()
        self.requires_grad_(False)
        self.fitted.fill_(True)
        tail = errors[-max(1, len(errors) // 10) :]
        self.fit_error = sum(tail) / len(tail)
        trainer.logger.info(f"quality predictor fitted in {self.steps} steps, mean absolute error {self.fit_error:.3f}")


class QualityWeighting(PixelWeighting):
    """
    Per-view pseudo-label weights from a :py:class:`QualityPredictor`: each view's ``prior`` weights times the
    predicted Dice of its first label source, ``q^power``.

    Args:
        predictor: the quality predictor (shared with a :py:class:`QualityTerm`).
        prior: the per-pixel weighting scaled per view (default: the fixed 0.95 confidence threshold).
        power: sharpens (above 1) or flattens the predicted quality.

    Raises:
        ValueError: when ``power`` is negative.
    """

    def __init__(self, predictor: QualityPredictor, prior: PixelWeighting | None = None, power: float = 1.0) -> None:
        if power < 0:
            raise ValueError(f"power must be >= 0, got {power}.")
        self.predictor = predictor
        self.prior = ConfidenceWeighting(0.95) if prior is None else prior
        self.power = float(power)

    def attach(self, trainer: MetaTrainer) -> None:
        self.prior.attach(trainer)
        self.predictor.attach(trainer)

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        prior = self.prior(ctx, sources, step_terms).weights
        with torch.no_grad():
            quality = self.predictor(ctx.unlabeled.views, sources[0]) ** self.power
        return WeightMaps(prior * quality.view((-1,) + (1,) * (prior.ndim - 1)))

    def state_dict(self) -> dict[str, Any]:
        """The predictor's fit."""
        return self.predictor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the predictor's fit."""
        self.predictor.load_state_dict(state)
        if bool(self.predictor.fitted):
            self.predictor.requires_grad_(False).eval()


class QualityTerm(UnlabeledTerm):
    """
    The quality-aware regulariser: ``mean(1 - q(views, student probabilities))`` with the (frozen) predictor's
    quality ``q`` of the student's own soft prediction, pushing it towards what a good segmentation looks like.

    Args:
        predictor: the quality predictor (fitted when the trainer starts, see :py:meth:`QualityPredictor.attach`).
        weight: the term's weight.
    """

    name = "loss_quality"

    def __init__(self, predictor: QualityPredictor, weight: float = 0.1) -> None:
        super().__init__(weight)
        self.predictor = predictor

    def attach(self, trainer: MetaTrainer) -> None:
        self.predictor.attach(trainer)

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return (1 - self.predictor(ctx.unlabeled.views, ctx.probs)).mean()


#: the pseudo-label trusts by name (fresh objects; ``quality`` builds its own predictor)
TRUSTS: dict[str, Callable[[], PixelWeighting]] = {
    "fixed": lambda: ConfidenceWeighting(0.95),
    "adaptive": AdaptiveConfidenceWeighting,
    "meta": MetaWeighting,
    "meta_normalised": NormalisedMetaWeighting,
    "meta_instance": InstanceMetaWeighting,
    "meta_amortised": AmortisedMetaWeighting,
    "quality": lambda: QualityWeighting(QualityPredictor()),
}


def pseudo_label_trust(name: str) -> PixelWeighting:
    """
    A pseudo-label trust of :py:data:`TRUSTS` by name, freshly built (bundles: ``--train#trainer#weighting
    "$monai_mlbseg.engines.pseudo_label_trust('adaptive')"``).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    if name not in TRUSTS:
        raise ValueError(f"unknown pseudo-label trust {name!r}; known: {', '.join(TRUSTS)}.")
    return TRUSTS[name]()
