"""
Weightings that measured no gain on real left-atrium scans (``docs/results.md``), kept for experiments and reachable
by name through :py:data:`~monai_mlbseg.engines.stage2.WEIGHTINGS`; each docstring gives its measured effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from monai_mlbseg.engines.stage2 import (
    ConfidenceWeighting,
    MetaWeighting,
    PixelWeighting,
    Stage2Context,
    Stage2Host,
    WeightMaps,
    per_pixel,
)

__all__ = [
    "AdaptiveConfidenceWeighting",
    "AgreementMetaWeighting",
    "AmortisedMetaWeighting",
    "InstanceMetaWeighting",
    "NormalisedMetaWeighting",
    "SignMetaWeighting",
    "pixel_features",
]


class SignMetaWeighting(MetaWeighting):
    """
    Meta weights with every pixel whose meta-gradient agrees weighted alike (summing to 1), instead of in proportion
    to it. Measured (results.md finding 5, seed 0, 64 px): the weight on a wrong initial-label pixel falls to 1.06x
    that on a right one (12-18x with the reference's rule), but validation Dice is 0.86 below the reference's
    weights and 2.57 below labeled-only training; at 32 clean slices (finding 16) -0.27 against labeled-only.
    """

    rule = "sign"


class AgreementMetaWeighting(MetaWeighting):
    """
    The reference's meta weights scaled to sum to the agreeing share of the meta-gradient mass (at most 1), so the
    weighted term shrinks when the meta-gradient disagrees. Measured (finding 9, seed 0, with one joint step):
    79.09 against 79.07 Dice for the reference's weights, 2.11 below labeled-only training (4/16 cases better).
    """

    rule = "agreement"


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
        return per_pixel(ctx, sources, self.weights(ctx.confidence_probs()))

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

    def attach(self, host: Stage2Host) -> None:
        super().attach(host)
        self.prior.attach(host)

    def correction(self, prior: torch.Tensor, neg_meta_grad: torch.Tensor) -> torch.Tensor:
        """The factor the prior's weights are multiplied with."""
        raise NotImplementedError

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        prior = self.prior(ctx, sources, step_terms).weights
        result = self.look_ahead(ctx, sources, step_terms)
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
    teacher = ctx.confidence_probs()
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

    def attach(self, host: Stage2Host) -> None:
        super().attach(host)
        self.net = _WeightNet(host.views.spatial_dims, 5, self.hidden, self.threshold, self.sharpness)
        self.net.to(host.state.device)
        self.optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        result = self.look_ahead(ctx, sources, step_terms)
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
        maps = per_pixel(ctx, sources, weights)
        return WeightMaps(maps.weights, result.meta_loss, result.meta_grads)

    def state_dict(self) -> dict[str, Any]:
        """The weight network and its optimizer."""
        return {"net": self.net.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the weight network and its optimizer."""
        self.net.load_state_dict(state["net"])
        self.optimizer.load_state_dict(state["optimizer"])
