"""
Traits of the perturbations a stage-2 student sees (as MONAI declares transform capabilities in
``monai.transforms.traits``): a perturbation declares what it does besides changing pixel values, and the stage-2
engine reads the declaration (:py:class:`~monai_mlbseg.engines.stage2.Perturbation`) instead of probing attributes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

__all__ = ["FeaturePerturbingTrait", "PixelMovingTrait", "WrappingTrait"]


class WrappingTrait:
    """
    A perturbation applied after another one, ``base`` (``None``: none); the traits of ``base`` hold for the
    composition too.
    """

    base: Callable[[torch.Tensor], torch.Tensor] | None = None


class PixelMovingTrait(ABC):
    """
    A perturbation that moves pixels between positions or images of a batch (e.g. CutMix): anything aligned with the
    batch it last perturbed (labels, a teacher's probabilities) must be moved alike, with :py:meth:`targets`.
    """

    @abstractmethod
    def targets(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, aligned with the last batch perturbed, moved like its pixels."""


class FeaturePerturbingTrait(ABC):
    """
    A perturbation of the network's features as well as of its input (e.g. feature dropout): the network's forward
    of a perturbed batch runs inside :py:meth:`perturbing`.
    """

    @abstractmethod
    def perturbing(self, network: nn.Module) -> AbstractContextManager:
        """The context in which ``network``'s forward of a perturbed batch runs."""
