"""Inference on whole 3D volumes: a 2D network slice by slice (as the MLB-Seg reference), or a 3D network in windows."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import convert_to_dst_type

__all__ = ["MinMaxSlidingWindowInferer", "SliceResizeInferer", "minmax_slices", "ple_disagreement"]


def minmax_slices(x: torch.Tensor) -> torch.Tensor:
    """Min-max scale every item of ``x`` (``[N, C, *S]``) to [0, 1] over all its channels and pixels (constant
    items become 0), exactly like MONAI's ``ScaleIntensity(minv=0, maxv=1)`` applied to each slice."""
    flat = x.flatten(1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (x.ndim - 1)))
    span = hi - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(x))


class SliceResizeInferer(Inferer):
    """
    Runs a 2D network on every slice of ``[B, C, *S3]`` volumes: each slice is min-max scaled to [0, 1]
    (optional), resized to ``roi_size``, predicted, and the prediction is resized back to the slice size.
    The resize back is done on probabilities (sigmoid), as in the reference, and the result is returned as logits
    again (``logit`` of the resized probability), so the usual ``sigmoid > 0.5`` post-processing applies.

    Args:
        roi_size: the network's input size, e.g. ``(144, 144)``.
        axis: the spatial axis the slices are taken along (default: the last).
        sw_batch_size: slices per network call.
        normalize: per-slice min-max scaling (the training slices must be prepared the same way).
        mode: interpolation of the resizes.
        eps: probability clamp before the logit.

    Example::

        inferer = SliceResizeInferer(roi_size=(144, 144))
        logits = inferer(volume[None], net)        # volume [1, H, W, D] -> logits [1, 1, H, W, D]
    """

    def __init__(
        self,
        roi_size: Sequence[int] = (144, 144),
        axis: int = -1,
        sw_batch_size: int = 32,
        normalize: bool = True,
        mode: str = "bilinear",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if len(roi_size) != 2:
            raise ValueError(f"roi_size must have 2 entries, got {roi_size}.")
        if sw_batch_size < 1:
            raise ValueError(f"sw_batch_size must be positive, got {sw_batch_size}.")
        self.roi_size = tuple(int(s) for s in roi_size)
        self.axis = axis
        self.sw_batch_size = sw_batch_size
        self.normalize = normalize
        self.mode = mode
        self.eps = eps

    def __call__(
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: ``[B, C, *S]`` volumes with 3 spatial dims.
            network: 2D network, ``[N, C, H', W'] -> [N, K, H', W']`` logits.

        Returns:
            ``[B, K, *S]`` logits (a MetaTensor with the input's meta data when the input is one).

        Raises:
            ValueError: when the input is not ``[B, C, X, Y, Z]``.
        """
        if inputs.ndim != 5:
            raise ValueError(f"SliceResizeInferer expects [B, C, X, Y, Z] volumes, got shape {tuple(inputs.shape)}.")
        axis = self.axis % 3 + 2
        data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        vol = data.movedim(axis, 1)  # [B, D, C, H, W]
        batch, depth = vol.shape[:2]
        slices = vol.reshape(batch * depth, *vol.shape[2:])
        size = tuple(slices.shape[2:])
        outputs = []
        for start in range(0, slices.shape[0], self.sw_batch_size):
            chunk = slices[start : start + self.sw_batch_size].float()
            if self.normalize:
                chunk = minmax_slices(chunk)
            if size != self.roi_size:
                chunk = F.interpolate(chunk, size=self.roi_size, mode=self.mode, align_corners=False)
            logits = network(chunk, *args, **kwargs)
            if size != self.roi_size:
                probs = F.interpolate(torch.sigmoid(logits.float()), size=size, mode=self.mode, align_corners=False)
                logits = torch.logit(probs, eps=self.eps)
            outputs.append(logits)
        out = torch.cat(outputs, dim=0)
        out = out.reshape(batch, depth, *out.shape[1:]).movedim(1, axis)
        return convert_to_dst_type(out, inputs, dtype=out.dtype)[0] if isinstance(inputs, MetaTensor) else out


class MinMaxSlidingWindowInferer(SlidingWindowInferer):
    """
    MONAI's ``SlidingWindowInferer`` on volumes min-max scaled to [0, 1] first (each item of the batch over all its
    channels and voxels, like ``ScaleIntensity(minv=0, maxv=1)`` of the whole volume), so that a 3D network sees
    the intensities it was trained on, whatever the pre-processing of the caller (a bundle's ``preprocessing``,
    MONAI Label, the stage-1 bootstrap). The 3D counterpart of :py:class:`SliceResizeInferer`'s ``normalize``.

    Args:
        roi_size: the window size, e.g. ``(112, 112, 80)``.
        normalize: min-max scale the inputs (``False``: plain ``SlidingWindowInferer``).
        args: the other positional arguments of ``SlidingWindowInferer`` (``sw_batch_size``, ``overlap``, ...).
        kwargs: its keyword arguments (``overlap``, ``mode``, ``sw_device``, ...).

    Example::

        inferer = MinMaxSlidingWindowInferer(roi_size=(112, 112, 80), sw_batch_size=4, overlap=0.5, mode="gaussian")
        logits = inferer(volume[None], net)        # volume [1, H, W, D] -> logits [1, 1, H, W, D]
    """

    def __init__(self, roi_size: Sequence[int] | int, *args: Any, normalize: bool = True, **kwargs: Any) -> None:
        super().__init__(roi_size, *args, **kwargs)
        self.normalize = normalize

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """
        Args:
            inputs: ``[B, C, *S]`` volumes.
            network: ``[N, C, *roi_size] -> [N, K, *roi_size]`` logits.

        Returns:
            ``[B, K, *S]`` blended logits (a MetaTensor with the input's meta data when the input is one).
        """
        if self.normalize:
            data = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
            scaled = minmax_slices(data.float())
            inputs = (
                convert_to_dst_type(scaled, inputs, dtype=scaled.dtype)[0] if isinstance(inputs, MetaTensor) else scaled
            )
        return super().__call__(inputs, network, *args, **kwargs)  # type: ignore[return-value]


@torch.no_grad()
def ple_disagreement(
    network: Callable[[torch.Tensor], torch.Tensor],
    volume: torch.Tensor,
    inferer: SliceResizeInferer,
    views: Any = None,
    coverage: float = 1e-3,
) -> float:
    """
    How much the network's predictions of a volume disagree across MLB-Seg's PLE views (the original, a zoom-in, two
    zoom-outs and a flip, :py:class:`~monai_mlbseg.transforms.PLEViews`): every slice goes through ``inferer``'s path
    (min-max scaling, resize to its ``roi_size``), each view's probability is mapped back to the slice, and the
    standard deviation over the views is averaged over the pixels that every view sees (a zoom-in view crops the
    slice's border away). 0 when every view gives the same prediction; at most about 0.55. An active-learning
    signal from the method's own pseudo-label ensemble: the volume whose views disagree most is the one whose
    pseudo label is least trustworthy.

    Args:
        network: the 2D network (eval mode), ``[N, 1, H, W] -> [N, 1, H, W]`` logits.
        volume: ``[C, X, Y, Z]`` image.
        inferer: the bundle's slice inferer.
        views: the PLE view transform (default: ``PLEViews(spatial_dims=2)`` seeded with 0, so scores repeat).
        coverage: a pixel counts when every view, mapped back, covers it to within this fraction.

    Returns:
        the mean disagreement.

    Example::

        score = ple_disagreement(net.eval(), image, SliceResizeInferer(roi_size=(144, 144)))
    """
    from monai_mlbseg.transforms import PLEViews, warp_from_views

    views = PLEViews(spatial_dims=2).set_random_state(seed=0) if views is None else views
    total = {"spread": 0.0, "pixels": 0.0}

    def spread(chunk: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(network(views(chunk)).float())
        back = warp_from_views(probs, views.params).reshape(chunk.shape[0], views.num_views, *probs.shape[1:])
        seen = warp_from_views(torch.ones_like(probs), views.params).reshape(back.shape)
        covered = (seen > 1 - coverage).all(dim=1)  # pixels every view sees (a zoom-in crops the border away)
        total["spread"] += float(back.std(dim=1)[covered].sum())
        total["pixels"] += float(covered.sum())
        return probs[:: views.num_views]

    data = volume.as_tensor() if isinstance(volume, MetaTensor) else torch.as_tensor(volume)
    inferer(data[None].float(), spread)
    return total["spread"] / max(total["pixels"], 1.0)
