"""
Per-case metrics of binary segmentations: Dice, Jaccard, 95% Hausdorff distance and average symmetric surface
distance (conventions in :py:mod:`monai_mlbseg.evaluation`), and the one Dice helper of the package.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric
from monai.utils import convert_to_tensor

__all__ = ["METRIC_KEYS", "case_metrics", "dice_score", "selection_auc", "spacing_from_affine"]

#: metric columns, in report order (``*_mm`` only when a spacing is known).
METRIC_KEYS = ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm")


def _as_mask(x: NdarrayOrTensor, name: str) -> torch.Tensor:
    """``x`` as a boolean CPU tensor ``[*S]`` (a leading singleton channel of a 3D/4D input is dropped)."""
    if not isinstance(x, (torch.Tensor, np.ndarray)):
        try:
            x = np.asarray(x, dtype=float)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be an array or tensor, got {type(x).__name__}.") from e
    t = convert_to_tensor(x, track_meta=False)
    t = t.detach().cpu()
    shape = tuple(t.shape)
    if t.ndim in (3, 4) and t.shape[0] == 1:
        t = t[0]
    if t.ndim not in (2, 3):
        raise ValueError(
            f"{name} must be a 2D or 3D mask, [*S] or [1, *S], got shape {shape}; "
            "multi-channel outputs must be reduced to the foreground channel first."
        )
    return t if t.dtype == torch.bool else t >= 0.5


def _check_spacing(spacing: float | Sequence[float] | NdarrayOrTensor, ndim: int) -> list[float]:
    if isinstance(spacing, torch.Tensor):
        spacing = spacing.detach().cpu().tolist()
    try:
        values = np.asarray(spacing, dtype=float).reshape(-1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spacing must be one number or one number per spatial axis, got {spacing!r}.") from e
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim or not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(
            f"spacing must be one positive number or {ndim} positive numbers (one per spatial axis), got {spacing!r}."
        )
    return [float(v) for v in values]


def spacing_from_affine(affine: NdarrayOrTensor, spatial_dims: int) -> list[float]:
    """
    The voxel spacing of an affine: the norms of its first ``spatial_dims`` columns (rotations and flips do not
    change it). This follows the affine rather than the ``pixdim`` meta data, which MONAI does not update when
    resampling.

    Args:
        affine: ``[N, N]`` (homogeneous, ``N >= spatial_dims + 1``) or ``[spatial_dims, spatial_dims]``.
        spatial_dims: number of spatial dimensions of the image.

    Returns:
        one spacing per spatial axis.

    Raises:
        ValueError: when the affine is too small for ``spatial_dims``.
    """
    a = np.asarray(convert_to_tensor(affine, track_meta=False).detach().cpu(), dtype=float)
    if a.ndim != 2 or min(a.shape) < spatial_dims:
        raise ValueError(f"affine of shape {a.shape} does not describe {spatial_dims} spatial dims.")
    return [float(v) for v in np.linalg.norm(a[:spatial_dims, :spatial_dims], axis=0)]


def _crop_to_union(pred: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop both masks to the bounding box of their union plus one voxel (clipped to the image). No metric changes:
    the cropped-away voxels are background in both, and MONAI's surface extraction crops the same way (treating
    the image border as background); this only saves the work on the background of large volumes."""
    union = pred | label
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        idx = torch.nonzero(union.any(dim=others) if others else union).flatten()
        box.append(slice(max(int(idx[0]) - 1, 0), min(int(idx[-1]) + 2, union.shape[axis])))
    return pred[tuple(box)], label[tuple(box)]


def _distances(pred: torch.Tensor, label: torch.Tensor, spacing: list[float] | None) -> tuple[float, float]:
    """(95HD, symmetric ASD) of two non-empty boolean masks ``[*S]``."""
    p, g = pred[None, None].float(), label[None, None].float()
    kwargs = {} if spacing is None else {"spacing": [spacing]}  # batch of one: no per-axis/per-batch ambiguity
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")
    asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal use of a deprecated argument of get_mask_edges
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        return float(hd(p, g, **kwargs).item()), float(asd(p, g, **kwargs).item())


def case_metrics(
    pred: NdarrayOrTensor, label: NdarrayOrTensor, spacing: float | Sequence[float] | None = None
) -> dict[str, float]:
    """
    Metrics of one binary segmentation against its label (conventions in the module docstring).

    Args:
        pred: the prediction, ``[*S]`` or ``[1, *S]`` with 2 or 3 spatial dims; values ``>= 0.5`` are foreground
            (binary masks, probabilities, label maps).
        label: the reference, same convention and spatial shape.
        spacing: voxel spacing (one number, or one per spatial axis, e.g. millimetres); adds ``hd95_mm`` and
            ``asd_mm``.

    Returns:
        ``{"dice", "jaccard", "hd95_voxel", "asd_voxel"[, "hd95_mm", "asd_mm"]}`` as floats. Both masks empty:
        Dice = Jaccard = 1 and distances 0; exactly one empty: Dice = Jaccard = 0 and distances NaN.

    Raises:
        ValueError: when the shapes differ (both are named), are not 2D/3D, or the spacing is invalid.

    Example::

        >>> import torch
        >>> pred = torch.zeros(8, 8); pred[2:6, 2:6] = 1
        >>> m = case_metrics(pred, pred, spacing=(0.5, 0.5))
        >>> m["dice"], m["hd95_mm"]
        (1.0, 0.0)
    """
    p, g = _as_mask(pred, "pred"), _as_mask(label, "label")
    if p.shape != g.shape:
        raise ValueError(
            f"pred and label shapes differ: pred {tuple(np.shape(pred))} vs label {tuple(np.shape(label))} "
            f"(spatial {tuple(p.shape)} vs {tuple(g.shape)})."
        )
    sp = None if spacing is None else _check_spacing(spacing, p.ndim)
    p_any, g_any = bool(p.any()), bool(g.any())
    out: dict[str, float] = {}
    if not p_any and not g_any:
        out.update(dice=1.0, jaccard=1.0, hd95_voxel=0.0, asd_voxel=0.0)
        if sp is not None:
            out.update(hd95_mm=0.0, asd_mm=0.0)
        return out
    if p_any != g_any:
        out.update(dice=0.0, jaccard=0.0, hd95_voxel=math.nan, asd_voxel=math.nan)
        if sp is not None:
            out.update(hd95_mm=math.nan, asd_mm=math.nan)
        return out
    p, g = _crop_to_union(p, g)
    # float64: exact voxel counts for any realistic volume
    p64, g64 = p[None, None].double(), g[None, None].double()
    out["dice"] = float(DiceMetric(include_background=True, reduction="none", ignore_empty=False)(p64, g64).item())
    out["jaccard"] = float(MeanIoU(include_background=True, reduction="none", ignore_empty=False)(p64, g64).item())
    out["hd95_voxel"], out["asd_voxel"] = _distances(p, g, None)
    if sp is not None:
        out["hd95_mm"], out["asd_mm"] = _distances(p, g, sp)
    return out


def dice_score(pred: NdarrayOrTensor, target: NdarrayOrTensor) -> float:
    """
    Dice ``2 |P & G| / (|P| + |G|)`` of two masks of the same shape, pooled over all their elements (e.g. a whole
    batch of views). Values ``>= 0.5`` are foreground, as in :py:func:`case_metrics`; tensors stay on their device.

    Two empty masks give 1.0 (a correct "nothing here"), MONAI's ``ignore_empty=False`` convention of
    :py:class:`~monai.metrics.DiceMetric` and the convention of :py:func:`case_metrics`; exactly one empty mask
    gives 0.0.

    Args:
        pred: the prediction, any shape.
        target: the reference, same shape.

    Returns:
        the Dice as a float in ``[0, 1]``.

    Raises:
        ValueError: when the shapes differ.

    Example::

        >>> import torch
        >>> dice_score(torch.zeros(4, 4), torch.zeros(4, 4))
        1.0
    """
    p = convert_to_tensor(pred, track_meta=False)
    g = convert_to_tensor(target, track_meta=False, device=p.device)
    if p.shape != g.shape:
        raise ValueError(f"pred and target shapes differ: {tuple(p.shape)} vs {tuple(g.shape)}.")
    p = p if p.dtype == torch.bool else p >= 0.5
    g = g if g.dtype == torch.bool else g >= 0.5
    p_count, g_count, both = torch.stack([p.sum(), g.sum(), (p & g).sum()]).tolist()  # one device sync
    total = p_count + g_count
    return 1.0 if total == 0 else 2.0 * both / total


def selection_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """
    How well ``scores`` (e.g. the weights of pseudo-label pixels) rank the ``positive`` entries (e.g. the pixels whose
    label is right) above the others: the area under the ROC curve, the probability that a random positive scores
    higher than a random negative, ties counting one half (the Mann-Whitney statistic with average ranks).

    Args:
        scores: any shape.
        positive: boolean (or 0/1) of the same shape.

    Returns:
        the AUC in ``[0, 1]`` (0.5: no selection), NaN when either class is empty.

    Raises:
        ValueError: when the shapes differ.

    Example::

        auc = selection_auc(weights, pseudo_labels == ground_truth)
    """
    if scores.shape != positive.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and positive {tuple(positive.shape)} shapes differ.")
    s, y = scores.detach().flatten().double().cpu(), positive.detach().flatten().bool().cpu()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    values, inverse, counts = torch.unique(s, sorted=True, return_inverse=True, return_counts=True)
    upper = torch.cumsum(counts, 0).double()
    average_rank = upper - (counts.double() - 1) / 2
    rank_sum = float(average_rank[inverse][y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
