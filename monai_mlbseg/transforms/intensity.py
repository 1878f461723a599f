"""The strong intensity perturbation of weak-to-strong consistency, for batches on any device."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable, Transform
from monai.utils import TransformBackends

__all__ = ["StrongIntensityAugment"]


class StrongIntensityAugment(Randomizable, Transform):
    """
    A strong, geometry-preserving perturbation of a batch ``[N, C, *S]`` (2D or 3D), drawn independently per image:
    an intensity scale ``a ~ U(1 - contrast, 1 + contrast)`` and shift ``b ~ U(-shift, shift)`` (``x -> a x + b``),
    with probability ``blur_prob`` a box blur of 3 pixels per side, then Gaussian noise of std ``noise_std``. Every
    pixel stays where it was, so a prediction on the perturbed image is aligned with one on the original: the
    student of :py:class:`~monai_mlbseg.engines.MetaTrainer` (``student_augment``) sees the perturbed views while
    the mean teacher sees the views themselves (weak-to-strong consistency, as in FixMatch and UniMatch). The
    defaults are meant for images scaled to [0, 1] (the slice pipeline's ``ScaleIntensityd``).

    Args:
        contrast: half-width of the scale's range, in ``[0, 1)``.
        shift: half-width of the shift's range, ``>= 0``.
        noise_std: std of the additive Gaussian noise, ``>= 0``.
        blur_prob: probability of the box blur per image, in ``[0, 1]``.

    Raises:
        ValueError: on a value outside its range.

    Example::

        augment = StrongIntensityAugment().set_random_state(seed=0)
        strong = augment(views)  # [N, C, H, W], same shape and device
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self, contrast: float = 0.25, shift: float = 0.2, noise_std: float = 0.08, blur_prob: float = 0.5
    ) -> None:
        if not 0 <= contrast < 1 or shift < 0 or noise_std < 0 or not 0 <= blur_prob <= 1:
            raise ValueError(
                "StrongIntensityAugment needs 0 <= contrast < 1, shift >= 0, noise_std >= 0 and 0 <= blur_prob <= 1, "
                f"got {contrast}, {shift}, {noise_std}, {blur_prob}."
            )
        self.contrast = float(contrast)
        self.shift = float(shift)
        self.noise_std = float(noise_std)
        self.blur_prob = float(blur_prob)
        self.scale = self.offset = self.blur = np.zeros(0)
        self.noise_seed = 0

    def randomize(self, data: int) -> None:
        """Draw the scales, shifts, blur choices and the noise seed of ``data`` images."""
        self.scale = self.R.uniform(1 - self.contrast, 1 + self.contrast, data)
        self.offset = self.R.uniform(-self.shift, self.shift, data)
        self.blur = self.R.uniform(size=data) < self.blur_prob
        self.noise_seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, img: torch.Tensor, randomize: bool = True) -> torch.Tensor:
        """
        Args:
            img: ``[N, C, *S]`` float images, 2 or 3 spatial dims.
            randomize: draw new parameters first (``False`` reuses the last ones, for the same ``N``).

        Returns:
            the perturbed batch, same shape, dtype and device (a new tensor).

        Raises:
            ValueError: when ``img`` is not ``[N, C, H, W]`` or ``[N, C, D, H, W]``, or the drawn parameters are for
                another batch size.
        """
        if img.ndim not in (4, 5):
            raise ValueError(f"StrongIntensityAugment expects [N, C, *S], 2 or 3 spatial dims; got {tuple(img.shape)}.")
        n = img.shape[0]
        if randomize:
            self.randomize(n)
        if len(self.scale) != n:
            raise ValueError(f"the parameters drawn are for {len(self.scale)} images, got {n}; use randomize=True.")
        shape = (n,) + (1,) * (img.ndim - 1)
        scale = torch.as_tensor(self.scale, dtype=img.dtype, device=img.device).reshape(shape)
        offset = torch.as_tensor(self.offset, dtype=img.dtype, device=img.device).reshape(shape)
        out = scale * img + offset
        if self.blur.any():
            pool = F.avg_pool2d if img.ndim == 4 else F.avg_pool3d
            blurred = pool(out, 3, stride=1, padding=1, count_include_pad=False)
            pick = torch.as_tensor(self.blur, device=img.device).reshape(shape)
            out = torch.where(pick, blurred, out)
        if self.noise_std > 0:
            generator = torch.Generator(device=img.device).manual_seed(self.noise_seed)
            noise = torch.randn(img.shape, generator=generator, dtype=img.dtype, device=img.device)
            out = out + self.noise_std * noise
        return out
