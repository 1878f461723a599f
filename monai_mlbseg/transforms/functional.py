"""
Functional core of the PLE (pseudo-label enhancement) view set.

Every view is a centred isotropic zoom followed by an optional flip: the original view is zoom 1 and no flip,
a zoom-in view has scale > 1 (the border that leaves the field of view is cropped away), a zoom-out view has
scale < 1 (the shrunken image sits in the centre of a zero canvas) and a flip view has zoom 1 and flips.
All functions work on batches stacked in the first dimension, for any number of spatial dimensions, on any device,
without leaving torch. Zooms are one batched ``grid_sample`` (through :py:class:`monai.networks.layers.AffineTransform`)
over the views whose scale differs from 1; flips are exact (``torch.flip``).

The zoom about the centre with ``align_corners=False`` is exactly "resize by ``s``, then centre-crop or zero-pad back
to the input size" (the pull map in normalised coordinates is ``u -> u / s``), so a scale of ``(S + 2p) / S`` reproduces
"resize to ``S + 2p`` and crop ``p`` pixels on each side".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from monai.networks.layers import AffineTransform

from monai_mlbseg.utils.profiling import profiled

__all__ = [
    "ViewParams",
    "PLEResult",
    "warp_to_views",
    "warp_from_views",
    "map_view_pairs",
    "ple_pseudo_labels",
    "view_pairs",
    "random_box_masks",
]


@dataclass(frozen=True)
class ViewParams:
    """
    Parameters of ``K`` views of each of ``B`` images.

    Args:
        scales: ``[B, K]`` zoom factor of every view (1: no zoom, > 1: zoom-in, < 1: zoom-out). Kept on the CPU.
        flips: ``[B, K, spatial_dims]`` bool, whether view ``k`` of image ``b`` is flipped along each spatial axis.

    Raises:
        ValueError: when the shapes disagree or a scale is not positive.
    """

    scales: torch.Tensor
    flips: torch.Tensor

    def __post_init__(self) -> None:
        scales = torch.as_tensor(self.scales, dtype=torch.float64, device="cpu")
        flips = torch.as_tensor(self.flips, dtype=torch.bool, device="cpu")
        if scales.ndim != 2 or flips.ndim != 3 or flips.shape[:2] != scales.shape:
            raise ValueError(
                f"ViewParams needs scales [B, K] and flips [B, K, spatial_dims], got {tuple(scales.shape)} and "
                f"{tuple(flips.shape)}."
            )
        if not bool((scales > 0).all()):
            raise ValueError(f"view scales must be positive, got {scales.tolist()}.")
        object.__setattr__(self, "scales", scales)
        object.__setattr__(self, "flips", flips)

    @property
    def batch_size(self) -> int:
        return int(self.scales.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.scales.shape[1])

    @property
    def spatial_dims(self) -> int:
        return int(self.flips.shape[2])

    def select(self, views: Sequence[int]) -> ViewParams:
        """Return the parameters of the listed views (in that order) of every image."""
        index = torch.as_tensor(list(views), dtype=torch.long)
        return ViewParams(self.scales[:, index], self.flips[:, index])

    @classmethod
    def cat(cls, params: Sequence[ViewParams]) -> ViewParams:
        """Concatenate view sets of the same images along the view dimension."""
        return cls(torch.cat([p.scales for p in params], dim=1), torch.cat([p.flips for p in params], dim=1))

    def to_dict(self) -> dict:
        """Plain-python form, for a MONAI transform trace."""
        return {"scales": self.scales.tolist(), "flips": self.flips.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ViewParams:
        """Inverse of :py:meth:`to_dict`."""
        return cls(torch.as_tensor(data["scales"], dtype=torch.float64), torch.as_tensor(data["flips"]))


class PLEResult(NamedTuple):
    """
    Output of :py:func:`ple_pseudo_labels`.

    Attributes:
        mean_prob: ``[B, C, *S]`` mean of the ``K`` view probabilities mapped back to the original frame.
        pseudo_labels: ``[B * K, C, *S]`` pseudo label of every view: ``1[A_k(mean_prob) > threshold]``, or
            ``A_k(mean_prob)`` without a threshold.
        back: ``[B * K, C, *S]`` every view probability mapped back to the original frame, ``A_k^-1(p_k)``.
    """

    mean_prob: torch.Tensor
    pseudo_labels: torch.Tensor
    back: torch.Tensor


def _zoom(x: torch.Tensor, scales: torch.Tensor, mode: str, inverse: bool) -> torch.Tensor:
    """Zoom every item ``x[i]`` about its centre by ``scales[i]`` (``1 / scales[i]`` when ``inverse``), keeping size."""
    spatial_dims = x.ndim - 2
    index = torch.nonzero(scales != 1).flatten()
    if index.numel() == 0:
        return x
    factors = scales[index] if inverse else 1.0 / scales[index]
    theta = torch.zeros(index.numel(), spatial_dims, spatial_dims + 1, dtype=torch.float64)
    diag = torch.arange(spatial_dims)
    theta[:, diag, diag] = factors[:, None]
    resample = AffineTransform(
        normalized=True, mode=mode, padding_mode="zeros", align_corners=False, reverse_indexing=False
    )
    theta = theta.to(device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    if index.numel() == x.shape[0]:
        return resample(x, theta)
    dev_index = index.to(x.device)
    return x.index_copy(0, dev_index, resample(x.index_select(0, dev_index), theta))


def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Flip item ``x[i]`` along every spatial axis ``d`` with ``flips[i, d]``; exact."""
    for axis in range(flips.shape[1]):
        index = torch.nonzero(flips[:, axis]).flatten()
        if index.numel() == 0:
            continue
        if index.numel() == x.shape[0]:
            x = x.flip(axis + 2)
        else:
            dev_index = index.to(x.device)
            x = x.index_copy(0, dev_index, x.index_select(0, dev_index).flip(axis + 2))
    return x


def _check(x: torch.Tensor, params: ViewParams, items: int, name: str) -> None:
    if x.ndim != params.spatial_dims + 2:
        raise ValueError(
            f"{name} must be [batch, channels, *spatial] with {params.spatial_dims} spatial dims, got {tuple(x.shape)}."
        )
    if x.shape[0] != items:
        raise ValueError(f"{name} has {x.shape[0]} items but the view parameters describe {items}.")


@profiled("warp_to_views")
def warp_to_views(
    x: torch.Tensor, params: ViewParams, mode: str = "bilinear", threshold: float | None = None
) -> torch.Tensor:
    """
    Map original-frame images or maps into every view: ``V_k = A_k(x)``.

    Args:
        x: ``[B, C, *S]`` images (or probability / label maps) in the original frame.
        params: the views, ``B`` images by ``K`` views.
        mode: interpolation of the zooms, ``"bilinear"`` or ``"nearest"`` (``"bilinear"`` is also trilinear in 3D).
        threshold: when given, the warped maps are re-binarised: ``1[A_k(x) > threshold]`` in ``x``'s dtype.

    Returns:
        ``[B * K, C, *S]``, view ``k`` of image ``b`` at row ``b * K + k``.

    Raises:
        ValueError: when ``x`` does not match ``params``.
    """
    _check(x, params, params.batch_size, "x")
    if not x.is_floating_point():
        x = x.float()
    views = x.repeat_interleave(params.num_views, dim=0)
    views = _flip(
        _zoom(views, params.scales.reshape(-1), mode, inverse=False), params.flips.reshape(-1, params.spatial_dims)
    )
    return views if threshold is None else (views > threshold).to(views.dtype)


@profiled("warp_from_views")
def warp_from_views(views: torch.Tensor, params: ViewParams, mode: str = "bilinear") -> torch.Tensor:
    """
    Map every view back to the original frame: ``A_k^-1(V_k)``.

    Zoom-in views leave the border that was cropped away empty (0, i.e. background); zoom-out views are cropped
    to their centre and resized up.

    Args:
        views: ``[B * K, C, *S]`` maps in the view frames, ordered as :py:func:`warp_to_views` returns them.
        params: the views.
        mode: interpolation, ``"bilinear"`` or ``"nearest"``.

    Returns:
        ``[B * K, C, *S]`` maps in the original frame, in the same order.

    Raises:
        ValueError: when ``views`` does not match ``params``.
    """
    _check(views, params, params.batch_size * params.num_views, "views")
    if not views.is_floating_point():
        views = views.float()
    unflipped = _flip(views, params.flips.reshape(-1, params.spatial_dims))
    return _zoom(unflipped, params.scales.reshape(-1), mode, inverse=True)


def view_pairs(num_views: int) -> tuple[list[int], list[int]]:
    """The index lists ``(ks, ls)`` of all pairs ``k < l`` of ``num_views`` views (10 pairs for 5 views)."""
    pairs = [(k, j) for k in range(num_views) for j in range(k + 1, num_views)]
    return [k for k, _ in pairs], [j for _, j in pairs]


@profiled("map_view_pairs")
def map_view_pairs(back: torch.Tensor, params: ViewParams, mode: str = "bilinear") -> torch.Tensor:
    """
    For every pair ``k < l``, map view ``l`` into the frame of view ``k`` through the original frame.

    Args:
        back: ``[B * K, C, *S]`` the views already mapped back to the original frame (``A_l^-1(V_l)``, see
            :py:func:`warp_from_views`).
        params: the views.
        mode: interpolation.

    Returns:
        ``[B * P, C, *S]`` with ``P = K (K - 1) / 2`` and row ``b * P + i`` holding ``A_k(A_l^-1(V_l))`` for the
        ``i``-th pair of :py:func:`view_pairs`.
    """
    _check(back, params, params.batch_size * params.num_views, "back")
    ks, ls = view_pairs(params.num_views)
    batch, num_views = params.batch_size, params.num_views
    partners = back.reshape(batch, num_views, *back.shape[1:])[:, ls].reshape(batch * len(ls), *back.shape[1:])
    pair_params = params.select(ks)
    flat = ViewParams(pair_params.scales.reshape(-1, 1), pair_params.flips.reshape(-1, 1, params.spatial_dims))
    return warp_to_views(partners, flat, mode=mode)


@profiled("ple_pseudo_labels")
def ple_pseudo_labels(view_probs: torch.Tensor, params: ViewParams, threshold: float | None = 0.5) -> PLEResult:
    """
    PLE ensemble: map the ``K`` view predictions back, average them, and warp the mean into every view.

    ``mean = (1/K) sum_k A_k^-1(p_k)``; the pseudo label of view ``k`` is ``1[A_k(mean) > threshold]`` (``A_k(mean)``
    itself, soft, with ``threshold=None``). The result carries no gradient.

    Args:
        view_probs: ``[B * K, C, *S]`` probabilities of the views (sigmoid outputs).
        params: the views.
        threshold: binarisation threshold of the pseudo labels; ``None``: soft pseudo labels.

    Returns:
        :py:class:`PLEResult` (mean probability, per-view pseudo labels, per-view maps in the original frame).

    Example::

        views = PLEViews(spatial_dims=2)
        v = views(images)                                   # [B*5, 1, H, W]
        result = ple_pseudo_labels(torch.sigmoid(net(v)), views.params)
    """
    with torch.no_grad():
        back = warp_from_views(view_probs.detach(), params)
        mean = back.reshape(params.batch_size, params.num_views, *back.shape[1:]).mean(dim=1)
        pseudo = warp_to_views(mean, params, threshold=threshold)
    return PLEResult(mean, pseudo, back)


def random_box_masks(
    num: int,
    spatial_shape: Sequence[int],
    fraction: float,
    generator: torch.Generator | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """
    ``num`` masks, each 1 inside one axis-aligned box and 0 elsewhere, for copy-paste mixing of images.

    Every side of a box is ``round(fraction * size)`` pixels (at least one), at a uniformly random position
    inside the image, drawn independently per mask.

    Args:
        num: how many masks.
        spatial_shape: the image's spatial shape ``S`` (2D or 3D).
        fraction: the box's side relative to the image's, in ``(0, 1]``.
        generator: the random generator of the positions (default: ``torch``'s global one).
        device: the device of the masks.

    Returns:
        ``[num, 1, *S]`` float masks.

    Raises:
        ValueError: when ``fraction`` is outside ``(0, 1]``.

    Example::

        box = random_box_masks(4, (64, 64), 2 / 3)
        mixed = box * labeled_images + (1 - box) * unlabeled_images
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    spatial_shape = [int(s) for s in spatial_shape]
    masks = torch.zeros(num, 1, *spatial_shape, device=device)
    sides = [max(1, round(fraction * s)) for s in spatial_shape]
    starts = [torch.randint(0, s - b + 1, (num,), generator=generator).tolist() for s, b in zip(spatial_shape, sides)]
    for i in range(num):
        box = tuple(slice(start[i], start[i] + b) for start, b in zip(starts, sides))
        masks[(i, slice(None), *box)] = 1.0
    return masks
