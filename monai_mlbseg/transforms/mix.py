"""CutMix for the views of a batch, whose targets follow the same boxes (:py:meth:`CutMix.targets`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from monai.utils import TransformBackends

from .traits import PixelMovingTrait, WrappingTrait

__all__ = ["CutMix"]


class CutMix(Randomizable, Transform, WrappingTrait, PixelMovingTrait):
    """
    CutMix of a batch ``[N, C, *S]`` (2D or 3D), as the strong perturbation of semi-supervised segmentation
    (UniMatch, FixMatch for segmentation): after an optional ``base`` perturbation, each image gets, with probability
    ``prob``, a random box of another image of the batch pasted in (box volume a fraction ``U(*area)`` of the image,
    side ratios in ``[ratio, 1 / ratio]``). The boxes and partners of the last call are kept, and
    :py:meth:`targets` applies them to anything aligned with the batch (labels, a teacher's probabilities), so a
    target follows the pixels it belongs to (it declares :py:class:`~monai_mlbseg.transforms.traits.PixelMovingTrait`).
    In a :py:class:`~monai_mlbseg.engines.MetaTrainer`, as
    ``student_augment`` the teacher's probabilities are mixed like the student's views (the weak-to-strong methods,
    whose label source is the teacher); as ``clean_augment`` the expert labels are.

    Args:
        base: a perturbation applied first (e.g. :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`);
            ``None``: none. When it is ``Randomizable`` it is seeded with this transform's seed + 1.
        prob: probability that an image gets a box, in ``[0, 1]``.
        area: range of the box's fraction of the image, within ``(0, 1]``.
        ratio: the most elongated side ratio, in ``(0, 1]``.

    Raises:
        ValueError: on a value outside its range.

    Example::

        mix = CutMix(StrongIntensityAugment(), prob=0.5).set_random_state(seed=0)
        student_input = mix(views)
        target = mix.targets(teacher_probs)
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prob: float = 0.5,
        area: tuple[float, float] = (0.02, 0.4),
        ratio: float = 0.3,
    ) -> None:
        if not 0 <= prob <= 1 or not 0 < area[0] <= area[1] <= 1 or not 0 < ratio <= 1:
            raise ValueError(
                "CutMix needs 0 <= prob <= 1, 0 < area[0] <= area[1] <= 1, 0 < ratio <= 1; "
                f"got {prob}, {area}, {ratio}."
            )
        self.base = base
        self.prob = float(prob)
        self.area = (float(area[0]), float(area[1]))
        self.ratio = float(ratio)
        self.partner: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> CutMix:
        super().set_random_state(seed, state)
        if isinstance(self.base, Randomizable):
            self.base.set_random_state(None if seed is None else seed + 1)
        return self

    def randomize(self, data: torch.Tensor) -> None:
        """Draw each image's partner and box (``mask`` 1 inside the pasted box) for a batch like ``data``."""
        n, spatial = data.shape[0], data.shape[2:]
        self.partner = torch.as_tensor(self.R.permutation(n), device=data.device)
        mask = torch.zeros((n, 1, *spatial), device=data.device, dtype=data.dtype)
        for i in range(n):
            if n < 2 or self.R.uniform() >= self.prob:
                continue
            volume = self.R.uniform(*self.area)
            shape = np.exp(self.R.uniform(math.log(self.ratio), -math.log(self.ratio), len(spatial)))
            shape = shape / np.prod(shape) ** (1 / len(spatial)) * volume ** (1 / len(spatial))
            box = []
            for size, fraction in zip(spatial, shape):
                length = max(1, min(size, round(fraction * size)))
                start = int(self.R.randint(0, size - length + 1))
                box.append(slice(start, start + length))
            mask[(i, 0, *box)] = 1
        self.mask = mask

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The batch perturbed by ``base``, then mixed; the boxes are kept for :py:meth:`targets`."""
        images = images if self.base is None else self.base(images)
        self.randomize(images)
        return self.targets(images)

    def targets(self, tensor: torch.Tensor) -> torch.Tensor:
        """
        ``tensor`` (aligned with the last batch, any channels) mixed with the last call's partners and boxes.

        Raises:
            RuntimeError: before the first call, or when ``tensor``'s batch or spatial shape differs from it.
        """
        if self.mask is None or tensor.shape[0] != self.mask.shape[0] or tensor.shape[2:] != self.mask.shape[2:]:
            raise RuntimeError("CutMix.targets needs a tensor aligned with the last batch the transform mixed.")
        mask = self.mask.to(tensor.dtype)
        return tensor * (1 - mask) + tensor[self.partner] * mask
