"""Feature dropout: a perturbation of the student's features, not of its input (UniMatch's feature perturbation)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable, Transform
from monai.utils import TransformBackends
from torch import nn

from .traits import FeaturePerturbingTrait, WrappingTrait

__all__ = ["FeatureDropout"]

#: the encoder blocks of :py:class:`~monai_mlbseg.networks.NestedUNet` whose outputs UniMatch-style feature dropout
#: perturbs by default: the first (low-level) and the deepest (high-level) encoder features
NESTED_UNET_FEATURES = ("nodes.conv0_0", "nodes.conv4_0")


class FeatureDropout(Randomizable, Transform, WrappingTrait, FeaturePerturbingTrait):
    """
    A strong perturbation of the student's features (the feature perturbation of UniMatch): on a batch, it applies
    an optional input perturbation ``base``; inside :py:meth:`perturbing`, the outputs of the network's ``modules``
    lose each channel of each image with probability ``prob`` (channel dropout, the kept channels scaled by
    ``1 / (1 - prob)``). A :py:class:`~monai_mlbseg.engines.MetaTrainer` given it as ``student_augment`` runs the
    student's forward of the perturbed unlabeled views inside :py:meth:`perturbing` (the teacher, a separate network,
    never sees it); as ``clean_augment`` (the matched labeled-only control) the forward of the labeled views. The
    channel masks are drawn from the transform's own random state, so a seeded run is reproducible.

    Args:
        base: an input perturbation applied first (e.g. :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment`);
            ``None``: none. When it is ``Randomizable`` it is seeded with this transform's seed + 1.
        prob: probability of dropping a channel, in ``[0, 1)``.
        modules: names (as in ``network.named_modules()``) of the modules whose outputs are perturbed; the default
            names the first and the deepest encoder blocks of :py:class:`~monai_mlbseg.networks.NestedUNet`.

    Raises:
        ValueError: for ``prob`` outside ``[0, 1)`` or no module names.

    Example::

        perturb = FeatureDropout(StrongIntensityAugment(), prob=0.5).set_random_state(seed=0)
        with perturb.perturbing(network):
            logits = network(perturb(views))
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        base: Callable[[torch.Tensor], torch.Tensor] | None = None,
        prob: float = 0.5,
        modules: Sequence[str] = NESTED_UNET_FEATURES,
    ) -> None:
        if not 0 <= prob < 1:
            raise ValueError(f"FeatureDropout needs 0 <= prob < 1; got {prob}.")
        if isinstance(modules, str) or not modules:
            raise ValueError(f"FeatureDropout needs a sequence of module names; got {modules!r}.")
        self.base = base
        self.prob = float(prob)
        self.modules = tuple(str(m) for m in modules)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> FeatureDropout:
        super().set_random_state(seed, state)
        if isinstance(self.base, Randomizable):
            self.base.set_random_state(None if seed is None else seed + 1)
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw per batch: the channel masks are drawn per forward, in :py:meth:`perturbing`'s hooks."""

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """The batch perturbed by ``base`` (or itself): the input side of the perturbation."""
        return images if self.base is None else self.base(images)

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        n, c = output.shape[:2]
        keep = torch.as_tensor(self.R.uniform(size=(n, c)) >= self.prob, dtype=output.dtype, device=output.device)
        return output * keep.view(n, c, *([1] * (output.ndim - 2))) / (1 - self.prob)

    @contextmanager
    def perturbing(self, network: nn.Module) -> Iterator[None]:
        """
        Within the block, the outputs of ``network``'s ``modules`` are channel-dropped on every forward.

        Raises:
            ValueError: when a name of ``modules`` is not a module of ``network`` (the message lists its modules).
        """
        named = dict(network.named_modules())
        missing = [m for m in self.modules if m not in named]
        if missing:
            known = ", ".join(n for n in named if n)
            raise ValueError(f"FeatureDropout: {missing} are not modules of the network; its modules: {known}.")
        handles = [named[m].register_forward_hook(self._hook) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
