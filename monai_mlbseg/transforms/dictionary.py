"""
Dictionary forms of the PLE view transforms: one draw per call, the same views applied to every key.

Every key of one sample ``[C, *S]`` becomes its views, ``[C, *S]`` for one view and ``[K, C, *S]`` for ``K``
views, a MetaTensor with the views recorded in its trace (see :py:mod:`monai_mlbseg.transforms.array`), so
``Compose.inverse`` maps them back.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import InvertibleTransform, MapTransform, Randomizable
from monai.utils import ensure_tuple

from .array import DEFAULT_ZOOM_IN_RANGE, DEFAULT_ZOOM_OUT_RANGE, PLEViews, RandFlipView, RandZoomView, ViewTransform

__all__ = ["ViewTransformd", "RandZoomViewd", "RandFlipViewd", "PLEViewsd"]


class ViewTransformd(Randomizable, MapTransform, InvertibleTransform):
    """
    Dictionary wrapper of a :py:class:`~monai_mlbseg.transforms.ViewTransform`: draws the views once per call
    (for the batch size of the first present key) and applies them to all ``keys``; ``label_keys`` are
    re-binarised at ``threshold`` after the warp.

    Args:
        keys: keys of the images / maps to transform.
        views: the array view transform.
        label_keys: the subset of ``keys`` holding binary labels.
        threshold: re-binarisation threshold of the labels.
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    backend = ViewTransform.backend

    def __init__(
        self,
        keys: KeysCollection,
        views: ViewTransform,
        label_keys: KeysCollection = (),
        threshold: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.views = views
        self.label_keys = set(ensure_tuple(label_keys))
        unknown = self.label_keys - set(self.keys)
        if unknown:
            raise ValueError(f"label_keys {sorted(map(str, unknown))} are not among keys {list(self.keys)}.")
        self.threshold = threshold

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ViewTransformd:
        super().set_random_state(seed, state)
        self.views.set_random_state(seed, state)
        return self

    def randomize(self, data: int | None = None) -> None:
        self.views.randomize(data)

    @property
    def params(self):
        """The most recently drawn view parameters (see :py:attr:`ViewTransform.params`)."""
        return self.views.params

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        first = True
        for key in self.key_iterator(d):
            if first:
                self.views.randomize(d[key])
                first = False
            threshold = self.threshold if key in self.label_keys else None
            d[key] = self.views(d[key], randomize=False, threshold=threshold)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.views.inverse(d[key])
        return d


class RandZoomViewd(ViewTransformd):
    """
    Dictionary form of :py:class:`~monai_mlbseg.transforms.RandZoomView`.

    Args:
        keys: keys to transform.
        scale_range: range of the zoom scale (above 1: zoom-in, below 1: zoom-out).
        spatial_dims: number of spatial dimensions.
        label_keys: keys re-binarised at ``threshold`` after the warp.
        threshold: label threshold.
        mode: interpolation.
        allow_missing_keys: don't raise an exception if a key is missing.

    Example::

        zoom_out = RandZoomViewd(["image", "label"], DEFAULT_ZOOM_OUT_RANGE, label_keys="label")
    """

    def __init__(
        self,
        keys: KeysCollection,
        scale_range: Sequence[float],
        spatial_dims: int = 2,
        label_keys: KeysCollection = (),
        threshold: float = 0.5,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandZoomView(scale_range, spatial_dims, mode), label_keys, threshold, allow_missing_keys)


class RandFlipViewd(ViewTransformd):
    """
    Dictionary form of :py:class:`~monai_mlbseg.transforms.RandFlipView` (a flip is exact, so labels stay binary
    without re-binarisation).

    Args:
        keys: keys to transform.
        spatial_dims: number of spatial dimensions.
        spatial_axes: axes that may be flipped (default: all).
        allow_missing_keys: don't raise an exception if a key is missing.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 2,
        spatial_axes: Sequence[int] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, RandFlipView(spatial_dims, spatial_axes), allow_missing_keys=allow_missing_keys)


class PLEViewsd(ViewTransformd):
    """
    Dictionary form of :py:class:`~monai_mlbseg.transforms.PLEViews`: every key of one sample ``[C, *S]``
    becomes its five views ``[5, C, *S]`` (original, zoom-in, two zoom-outs, flip), the same views for all keys.

    Args:
        keys: keys to transform.
        spatial_dims: number of spatial dimensions.
        zoom_in_range: range of the zoom-in scale.
        zoom_out_range: range of the two zoom-out scales.
        flip_axes: axes the flip view may flip (default: all).
        label_keys: keys re-binarised at ``threshold`` after the warp.
        threshold: label threshold.
        mode: interpolation.
        allow_missing_keys: don't raise an exception if a key is missing.

    Example::

        pipeline = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"]),
                            PLEViewsd(["image", "label"], label_keys="label")])
        sample = pipeline({"image": "img.nii.gz", "label": "seg.nii.gz"})
        # sample["image"]: MetaTensor [5, 1, H, W], the file's meta data, the views in applied_operations[-1]
        original = pipeline.inverse(sample)   # every view mapped back to the original frame
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_dims: int = 2,
        zoom_in_range: Sequence[float] = DEFAULT_ZOOM_IN_RANGE,
        zoom_out_range: Sequence[float] = DEFAULT_ZOOM_OUT_RANGE,
        flip_axes: Sequence[int] | None = None,
        label_keys: KeysCollection = (),
        threshold: float = 0.5,
        mode: str = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        views = PLEViews(spatial_dims, zoom_in_range, zoom_out_range, flip_axes, mode)
        super().__init__(keys, views, label_keys, threshold, allow_missing_keys)
