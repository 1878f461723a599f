"""
Quality-guided pseudo-label weights (measured no gain on real left-atrium scans: -1.61 Dice against the fixed
threshold, seed 0, ``docs/results.md`` finding 36): a predictor of a label's Dice, fitted on the labeled slices, a
per-view weighting from it and a regulariser.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch import nn

from monai_mlbseg.engines.stage2 import (
    ConfidenceWeighting,
    Perturbation,
    PixelWeighting,
    Stage2Context,
    Stage2Host,
    UnlabeledTerm,
    WeightMaps,
)

__all__ = [
    "QualityPredictor",
    "QualityTerm",
    "QualityWeighting",
    "corrupt_masks",
    "quality_weighting",
    "soft_dice_per_view",
]


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
        augment: perturbs the labeled views before the student predicts them (default: the perturbation the
            student sees of the unlabeled views, its feature perturbation included).
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

    def attach(self, host: Stage2Host) -> None:
        """
        Fit on the engine's labeled loader when it starts, unless a resumed checkpoint has a fit.

        Raises:
            ValueError: when the views are not 2D.
        """
        if id(host) in self._attached:
            return
        if host.views.spatial_dims != 2:
            raise ValueError("QualityPredictor works on 2D slices; the trainer's views are not 2D.")
        self._attached.add(id(host))
        self.to(host.state.device)
        host.add_event_handler(Events.STARTED, self._fit_unless_fitted)

    def _fit_unless_fitted(self, host: Stage2Host) -> None:
        if not bool(self.fitted):
            self.fit(host)

    def training_pairs(self, host: Stage2Host, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Views of a labeled batch, imperfect masks of them and the masks' true Dice."""
        batch = host.labeled_views()
        views, truth = batch.views[: self.batch_views], batch.labels[: self.batch_views]
        perturbation = Perturbation(self.augment) if self.augment is not None else host.student_perturbation
        with torch.no_grad(), perturbation.forward(host.network):
            seen = perturbation(views)
            predicted = (torch.sigmoid(host.run_network(host.network, seen)) > host.views.threshold).float()
        half = views.shape[0] // 2
        masks = torch.cat([corrupt_masks(truth[:half], generator), predicted[half:]])
        return views, masks, soft_dice_per_view(masks, truth)

    def fit(self, host: Stage2Host) -> None:
        """Fit on the labeled slices (the student is only read); restores the student's train/eval mode."""
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        errors = []
        was_training = host.network.training
        host.network.eval()
        self.train()
        for _ in range(self.steps):
            views, masks, dice = self.training_pairs(host, generator)
            with torch.enable_grad():
                predicted = self(views, masks)
                loss = F.mse_loss(predicted, dice)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
            optimizer.step()
            errors.append(float((predicted.detach() - dice).abs().mean()))
        host.network.train(was_training)
        self.eval()
        self.requires_grad_(False)
        self.fitted.fill_(True)
        tail = errors[-max(1, len(errors) // 10) :]
        self.fit_error = sum(tail) / len(tail)
        host.logger.info(f"quality predictor fitted in {self.steps} steps, mean absolute error {self.fit_error:.3f}")


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

    def attach(self, host: Stage2Host) -> None:
        self.prior.attach(host)
        self.predictor.attach(host)

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

    def attach(self, host: Stage2Host) -> None:
        self.predictor.attach(host)

    def __call__(self, ctx: Stage2Context) -> torch.Tensor:
        return (1 - self.predictor(ctx.unlabeled.views, ctx.probs)).mean()


def quality_weighting() -> QualityWeighting:
    """A :py:class:`QualityWeighting` with a fresh :py:class:`QualityPredictor` (the registry's ``quality``)."""
    return QualityWeighting(QualityPredictor())
