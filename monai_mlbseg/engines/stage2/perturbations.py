"""
Perturbations, a declared part kind of stage 2: what the student sees of a batch of views instead of the views.

Any callable on a batch ``[N, C, *S]`` can be a perturbation (e.g.
:py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`); what it does besides changing pixel values it declares
with the traits of :py:mod:`monai_mlbseg.transforms.traits`, and :py:class:`Perturbation` reads them along the chain
of wrapped perturbations: a :py:class:`~monai_mlbseg.transforms.traits.PixelMovingTrait` (CutMix) moves the targets
with its pixels, a :py:class:`~monai_mlbseg.transforms.traits.FeaturePerturbingTrait` (feature dropout) perturbs the
network's forward. A new perturbation of either kind declares its trait and touches no engine file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from monai.transforms import Randomizable
from torch import nn

from monai_mlbseg.transforms.traits import FeaturePerturbingTrait, PixelMovingTrait, WrappingTrait

__all__ = ["Perturbation"]


class Perturbation:
    """
    A perturbation of views as the stage-2 engine applies it: the transform itself, the targets moved like its pixels
    (:py:meth:`targets`) and the network's forward inside its feature perturbation (:py:meth:`forward`).

    Args:
        transform: the perturbation (``None``: the views as they are).

    Example::

        perturb = Perturbation(CutMix(StrongIntensityAugment()))
        seen = perturb(views)
        with perturb.forward(network):
            logits = network(seen)
        target = perturb.targets(teacher_probs)
    """

    def __init__(self, transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.transform = transform

    def chain(self) -> Iterator[Any]:
        """The transform and those it wraps (:py:class:`~monai_mlbseg.transforms.traits.WrappingTrait`), outermost
        first."""
        part: Any = self.transform
        while part is not None:
            yield part
            part = part.base if isinstance(part, WrappingTrait) else None

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        """What the student sees of ``views``."""
        return views if self.transform is None else self.transform(views)

    def targets(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor``, aligned with the last batch perturbed, moved like its pixels (innermost mover first)."""
        for part in reversed(list(self.chain())):
            if isinstance(part, PixelMovingTrait):
                tensor = part.targets(tensor)
        return tensor

    @contextmanager
    def forward(self, network: nn.Module) -> Iterator[None]:
        """The context of ``network``'s forward of a perturbed batch: every feature perturbation of the chain."""
        with ExitStack() as stack:
            for part in self.chain():
                if isinstance(part, FeaturePerturbingTrait):
                    stack.enter_context(part.perturbing(network))
            yield

    def set_random_state(self, seed: int) -> Perturbation:
        """Seed the transform when it is MONAI ``Randomizable`` (it seeds what it wraps)."""
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed)
        return self
