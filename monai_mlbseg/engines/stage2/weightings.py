"""
Weightings, a part kind of stage 2: how much each pixel of each label source counts in the weighted term.

Every weighting of the product and of :py:mod:`monai_mlbseg.experimental` is in one registry,
:py:data:`WEIGHTINGS`, built by name with :py:func:`pixel_weighting`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from monai_mlbseg.meta import MetaLookAhead

from .context import Stage2Context
from .host import Stage2Host

__all__ = [
    "WEIGHTINGS",
    "ConfidenceWeighting",
    "MetaWeighting",
    "PixelWeighting",
    "UniformWeighting",
    "WeightMaps",
    "per_pixel",
    "pixel_weighting",
    "weight_shape",
]


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

    ``__call__(ctx, sources, step_terms)`` gets the iteration's context, the sources (a list of ``[N, 1, *S]``) and
    the weighted step's other terms (a scalar with a graph, or ``None``), which a look-ahead must include in the step
    it differentiates. A weighting that acts (a look-ahead, a fitted model) prepares itself in :py:meth:`attach`,
    called once with the engine's :py:class:`~monai_mlbseg.engines.stage2.Stage2Host`. A weighting with a state of
    its own (``state_dict`` / ``load_state_dict``) is saved with the trainer's checkpoints.

    Example::

        class Flat(PixelWeighting):
            def __call__(self, ctx, sources, step_terms):
                shape = (ctx.unlabeled.views.shape[0], len(sources), *ctx.unlabeled.views.shape[2:])
                return WeightMaps(torch.full(shape, 1.0 / math.prod(shape)))
    """

    def attach(self, host: Stage2Host) -> None:
        """Check or prepare what the weighting needs from the engine (default: nothing)."""

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(ctx, sources, step_terms).")


def weight_shape(ctx: Stage2Context, sources: Sequence[torch.Tensor]) -> tuple[int, ...]:
    """``[N, len(sources), *S]``: the shape of the weight maps of ``sources``."""
    views = ctx.unlabeled.views
    return (views.shape[0], len(sources), *views.shape[2:])


def per_pixel(ctx: Stage2Context, sources: Sequence[torch.Tensor], weights: torch.Tensor) -> WeightMaps:
    """``[N, 1 or n, *S]`` weights as the maps of every source, divided by their count."""
    weights = weights.expand(weight_shape(ctx, sources))
    return WeightMaps(weights / weights.numel())


class UniformWeighting(PixelWeighting):
    """Every pixel of every source weighted alike, the weights summing to 1 (plain bootstrapping)."""

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        weights = torch.full(weight_shape(ctx, sources), 1.0, device=ctx.unlabeled.views.device)
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
        probs = ctx.confidence_probs()
        confident = (torch.maximum(probs, 1 - probs) >= self.threshold).float()
        return per_pixel(ctx, sources, confident)


class MetaWeighting(PixelWeighting):
    """
    MLB-Seg's meta-learned pixel weights (ALGORITHM step C): a look-ahead SGD step on the weighted loss with
    per-pixel weights ``eps = 0``, the labeled views' BCE after it, and weights proportional to the positive part of
    ``-dL_meta/d eps`` (:py:class:`~monai_mlbseg.meta.MetaLookAhead`, differentiating the engine's
    ``loss_function.pixel_loss``). The look-ahead runs eagerly in float32 on what the student saw.

    Args:
        meta_params: restrict the meta-gradient to these parameter names or prefixes (an approximation; default:
            all).

    Raises:
        TypeError: (at attach) when the optimizer is not SGD or the loss function has no ``pixel_loss``.
        ValueError: (at attach) when there is no label source.
    """

    #: how the meta-gradient becomes weights (:py:func:`~monai_mlbseg.meta.normalise_weights`)
    rule = "gradient"

    def __init__(self, meta_params: Sequence[str] | None = None) -> None:
        self.meta_params = None if meta_params is None else list(meta_params)
        self.lookahead: MetaLookAhead | None = None

    def attach(self, host: Stage2Host) -> None:
        if not host.sources:
            raise ValueError("MetaWeighting weighs label sources: give the trainer at least one.")
        pixel_loss = getattr(host.loss_function, "pixel_loss", None)
        if not callable(pixel_loss):
            raise TypeError(
                "MetaWeighting needs a loss function with a pixel_loss(logits, sources) for the look-ahead, "
                f"e.g. MetaReweightLoss(pixel_loss=...); got {type(host.loss_function).__name__}."
            )
        self.lookahead = MetaLookAhead(
            host.network, host.optimizer, self.meta_params, weighting=self.rule, pixel_loss=pixel_loss
        )

    def look_ahead(self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None):
        """The look-ahead of this iteration (:py:class:`~monai_mlbseg.meta.MetaLookAhead`'s result).

        Raises:
            RuntimeError: before :py:meth:`attach`.
        """
        if self.lookahead is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a trainer yet.")
        clean = ctx.clean()
        return self.lookahead(
            ctx.student_views, sources, clean.views, clean.labels, lookahead_grads=ctx.named_grads(step_terms)
        )

    def __call__(
        self, ctx: Stage2Context, sources: Sequence[torch.Tensor], step_terms: torch.Tensor | None
    ) -> WeightMaps:
        result = self.look_ahead(ctx, sources, step_terms)
        return WeightMaps(result.weights, result.meta_loss, result.meta_grads)


#: every weighting by name: a class, or the dotted path of an experimental one (imported when built)
WEIGHTINGS: dict[str, Callable[[], PixelWeighting] | str] = {
    "uniform": UniformWeighting,
    "fixed": ConfidenceWeighting,
    "meta": MetaWeighting,
    "adaptive": "monai_mlbseg.experimental.AdaptiveConfidenceWeighting",
    "meta_normalised": "monai_mlbseg.experimental.NormalisedMetaWeighting",
    "meta_instance": "monai_mlbseg.experimental.InstanceMetaWeighting",
    "meta_amortised": "monai_mlbseg.experimental.AmortisedMetaWeighting",
    "quality": "monai_mlbseg.experimental.quality_weighting",
}


def pixel_weighting(name: str) -> PixelWeighting:
    """
    A weighting of :py:data:`WEIGHTINGS` by name, freshly built with its defaults (``fixed``: the 0.95 confidence
    threshold).

    Raises:
        ValueError: for an unknown name (the message lists the known ones).

    Example::

        weighting = pixel_weighting("meta")
    """
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {name!r}; known: {', '.join(WEIGHTINGS)}.")
    factory = WEIGHTINGS[name]
    if isinstance(factory, str):
        module, _, attr = factory.rpartition(".")
        factory = getattr(importlib.import_module(module), attr)
    return factory()
