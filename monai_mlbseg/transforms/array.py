"""
The PLE view set as MONAI array transforms.

Each transform draws view parameters with MONAI's :py:class:`~monai.transforms.Randomizable` contract
(``set_random_state``, ``randomize``) and applies them with the functional core of
:py:mod:`monai_mlbseg.transforms.functional`. Inputs are either

- one channel-first image ``[C, *S]`` (MONAI's usual contract). With meta tracking on (MONAI's default,
  :py:func:`monai.data.set_track_meta`) the output is a :py:class:`~monai.data.MetaTensor` whatever the input type
  (tensor, array or MetaTensor): it keeps the input's meta data (affine, file name) and its ``applied_operations``,
  plus one entry of this transform whose ``extra_info`` holds the drawn views (``{"scales": [[...]], "flips":
  [[[...]]]}``). A transform placed after the views in a ``Compose`` therefore receives ``[C, *S]`` for a single
  view and ``[K, C, *S]`` for ``K`` views (the views stacked in front of the channels, not a collated batch), as a
  MetaTensor whose last trace entry is the view transform; :py:meth:`ViewTransform.inverse` reads the views from
  that entry only. With meta tracking off the output is a plain tensor, which cannot be inverted.
- a batch ``[B, C, *S]`` (the training hot path): views are stacked in the batch dimension, ``[B * K, C, *S]``, as
  a plain tensor without trace; map predictions back with
  :py:func:`~monai_mlbseg.transforms.functional.warp_from_views` and the transform's :py:attr:`ViewTransform.params`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.transforms import InvertibleTransform, Randomizable, Transform
from monai.utils import TraceKeys, TransformBackends, convert_to_tensor

from monai_mlbseg.utils.profiling import profiled

from .functional import ViewParams, warp_from_views, warp_to_views

__all__ = [
    "DEFAULT_ZOOM_IN_RANGE",
    "DEFAULT_ZOOM_OUT_RANGE",
    "ViewTransform",
    "RandZoomView",
    "RandFlipView",
    "PLEViews",
]

#: zoom-in scales of the reference: pads p of 4..30 pixels at 144 px, scale (S + 2p) / S (about 1.06 to 1.42).
DEFAULT_ZOOM_IN_RANGE = (1.0 + 8.0 / 144.0, 1.0 + 60.0 / 144.0)
#: zoom-out scales of the reference: scale (S - 2p) / S (about 0.58 to 0.94).
DEFAULT_ZOOM_OUT_RANGE = (1.0 - 60.0 / 144.0, 1.0 - 8.0 / 144.0)


def _check_range(scale_range: Sequence[float], name: str, zoom_in: bool | None = None) -> tuple[float, float]:
    """``(low, high)`` with ``0 < low <= high``; above 1 when ``zoom_in``, below 1 when ``zoom_in`` is false."""
    lo, hi = (float(v) for v in scale_range)
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high, got {tuple(scale_range)}.")
    if zoom_in is True and lo <= 1.0:
        raise ValueError(f"{name} must lie above 1 (zoom-in), got {tuple(scale_range)}.")
    if zoom_in is False and hi >= 1.0:
        raise ValueError(f"{name} must lie below 1 (zoom-out), got {tuple(scale_range)}.")
    return lo, hi


def _check_axes(spatial_dims: int, spatial_axes: Sequence[int] | None) -> tuple[int, ...]:
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
    axes = tuple(range(spatial_dims)) if spatial_axes is None else tuple(int(a) for a in spatial_axes)
    if not axes or any(not 0 <= a < spatial_dims for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"spatial_axes must be distinct axes in [0, {spatial_dims}), got {spatial_axes}.")
    return axes


class ViewTransform(Randomizable, InvertibleTransform, Transform):
    """
    Base of the view transforms: draws ``K`` views per image and maps images into the views and back.

    Subclasses implement :py:meth:`draw` (the random view parameters of ``n`` images). ``__call__`` draws new
    parameters (unless ``randomize=False``) and returns the views; :py:meth:`warp` maps further original-frame
    maps (labels, probabilities) into the *same* views; :py:meth:`inverse` maps the views of one image back to the
    original frame, with the parameters recorded in their trace (see the module docstring for what a ``Compose``
    after the views receives).

    Args:
        spatial_dims: number of spatial dimensions of the images (2 or 3; 1 is accepted for tests).
        mode: interpolation of the zooms, ``"bilinear"`` (trilinear in 3D) or ``"nearest"``.
        threshold: the threshold of binary maps warped into the views and of their pseudo-label ensemble (what a
            stage-2 trainer reads), in ``(0, 1)``.

    Raises:
        ValueError: for an unknown ``mode`` or a ``threshold`` outside ``(0, 1)``.
    """

    backend = [TransformBackends.TORCH]
    num_views: int = 1

    def __init__(self, spatial_dims: int = 2, mode: str = "bilinear", threshold: float = 0.5) -> None:
        _check_axes(spatial_dims, None)
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}.")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {threshold}.")
        self.spatial_dims = spatial_dims
        self.mode = mode
        self.threshold = float(threshold)
        self._params: ViewParams | None = None

    @property
    def params(self) -> ViewParams:
        """The most recently drawn view parameters.

        Raises:
            RuntimeError: when no parameters have been drawn yet.
        """
        if self._params is None:
            raise RuntimeError(f"{type(self).__name__}: no views drawn yet; call the transform or randomize() first.")
        return self._params

    def draw(self, n: int) -> ViewParams:
        """Draw the view parameters of ``n`` images from ``self.R``."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw().")

    def randomize(self, data: int | NdarrayOrTensor | None = None) -> None:
        """
        Draw new view parameters.

        Args:
            data: the number of images, or the image / batch the views are for (its batch size is used).
        """
        if data is None or isinstance(data, int):
            n = 1 if data is None else int(data)
        else:
            n = self._batch_size(data)
        self._params = self.draw(n)

    def _batch_size(self, img: NdarrayOrTensor) -> int:
        if img.ndim == self.spatial_dims + 1:
            return 1
        if img.ndim == self.spatial_dims + 2:
            return int(img.shape[0])
        raise ValueError(
            f"{type(self).__name__} expects [C, *spatial] or [B, C, *spatial] with {self.spatial_dims} spatial dims, "
            f"got shape {tuple(img.shape)}."
        )

    def _apply(self, img: NdarrayOrTensor, params: ViewParams, threshold: float | None) -> torch.Tensor:
        single = img.ndim == self.spatial_dims + 1
        data = convert_to_tensor(img, track_meta=False)
        out = warp_to_views(data[None] if single else data, params, mode=self.mode, threshold=threshold)
        if not single:
            return out
        out = out if self.num_views > 1 else out[0]
        if not get_track_meta():
            return out
        if isinstance(img, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=list(img.applied_operations))
        else:
            out = MetaTensor(out)
        self.push_transform(out, orig_size=tuple(img.shape[1:]), extra_info=params.to_dict())
        return out

    @profiled("view_transform")
    def __call__(self, img: NdarrayOrTensor, randomize: bool = True, threshold: float | None = None) -> torch.Tensor:
        """
        Args:
            img: ``[C, *S]`` one image, or ``[B, C, *S]`` a batch.
            randomize: draw new view parameters first (``False`` reuses the last ones, like :py:meth:`warp`).
            threshold: re-binarise the views at this value (for label maps).

        Returns:
            ``[C, *S]`` (one view of one image), ``[K, C, *S]`` (``K`` views of one image), both MetaTensors with
            the views in their trace when meta tracking is on, or ``[B * K, C, *S]`` (a plain tensor).
        """
        n = self._batch_size(img)
        if randomize:
            self.randomize(n)
        params = self.params
        if params.batch_size != n:
            raise ValueError(f"the drawn views are for {params.batch_size} images, got {n}; call with randomize=True.")
        return self._apply(img, params, threshold)

    def warp(self, img: NdarrayOrTensor, threshold: float | None = None) -> torch.Tensor:
        """Map an original-frame map into the most recently drawn views (e.g. a label, with ``threshold=0.5``)."""
        return self(img, randomize=False, threshold=threshold)

    def inverse(self, data: NdarrayOrTensor) -> torch.Tensor:
        """
        Map the views of one image back to the original frame (each view separately; zoom-in borders become 0).

        The view parameters are read from the most recent entry of this transform in ``data.applied_operations``
        (which is popped, as MONAI's inverses do), never from the transform's last draw: the result is right even
        if the transform has drawn other views since.

        Args:
            data: ``[C, *S]`` / ``[K, C, *S]`` views of one image, a MetaTensor as returned by this transform.

        Returns:
            the views in the original frame, same shape as ``data``, a MetaTensor without this transform's entry.

        Raises:
            ValueError: when ``data`` is not a MetaTensor with a trace (a batch, or meta tracking off: map those back
                with :py:func:`~monai_mlbseg.transforms.functional.warp_from_views` and :py:attr:`params`).
            RuntimeError: when the most recent trace entry is another transform's (MONAI's check).
        """
        if not isinstance(data, MetaTensor) or not data.applied_operations:
            raise ValueError(
                f"{type(self).__name__}.inverse needs the views as a MetaTensor carrying this transform's trace "
                "(single-image input with meta tracking on); map batches back with "
                "warp_from_views(views, transform.params)."
            )
        params = ViewParams.from_dict(self.pop_transform(data)[TraceKeys.EXTRA_INFO])
        tensor = convert_to_tensor(data, track_meta=False)
        squeeze = tensor.ndim == self.spatial_dims + 1
        out = warp_from_views(tensor[None] if squeeze else tensor, params, mode=self.mode)
        return MetaTensor(out[0] if squeeze else out, meta=data.meta, applied_operations=data.applied_operations)


def draw_scales(R: np.random.RandomState, n: int, scale_range: tuple[float, float]) -> np.ndarray:
    """``n`` scales drawn uniformly from ``scale_range``."""
    return R.uniform(scale_range[0], scale_range[1], size=n)


def draw_flips(R: np.random.RandomState, n: int, spatial_dims: int, axes: tuple[int, ...]) -> np.ndarray:
    """``[n, spatial_dims]`` flip flags: a uniformly drawn non-empty subset of ``axes`` for every image."""
    subsets = 2 ** len(axes) - 1
    codes = R.randint(1, subsets + 1, size=n)
    flips = np.zeros((n, spatial_dims), dtype=bool)
    for i, axis in enumerate(axes):
        flips[:, axis] = (codes >> i) & 1 == 1
    return flips


class RandZoomView(ViewTransform):
    """
    Zoom view: zoom about the centre by a scale drawn uniformly from ``scale_range``, keeping the input size. A
    scale above 1 zooms in (the border that leaves the field of view is cropped away), a scale below 1 zooms out
    (the shrunken image sits in the centre of a zero canvas). The reference's ranges are
    :py:data:`DEFAULT_ZOOM_IN_RANGE` and :py:data:`DEFAULT_ZOOM_OUT_RANGE`.

    Args:
        scale_range: ``(low, high)`` with ``0 < low <= high``.
        spatial_dims: number of spatial dimensions.
        mode: interpolation.
        threshold: as :py:class:`ViewTransform`.

    Raises:
        ValueError: for an invalid ``scale_range``, ``spatial_dims`` or ``mode``.

    Example::

        zoom_in = RandZoomView(DEFAULT_ZOOM_IN_RANGE, spatial_dims=2).set_random_state(0)
        view = zoom_in(image)             # MetaTensor [C, H, W], the drawn scale in its trace
        back = zoom_in.inverse(view)      # original frame, border outside the view is 0
    """

    def __init__(
        self, scale_range: Sequence[float], spatial_dims: int = 2, mode: str = "bilinear", threshold: float = 0.5
    ) -> None:
        super().__init__(spatial_dims, mode, threshold)
        self.scale_range = _check_range(scale_range, "scale_range")

    def draw(self, n: int) -> ViewParams:
        scales = draw_scales(self.R, n, self.scale_range)[:, None]
        return ViewParams(torch.as_tensor(scales), torch.zeros(n, 1, self.spatial_dims, dtype=torch.bool))


class RandFlipView(ViewTransform):
    """
    Flip view: flip along a random non-empty subset of ``spatial_axes`` (uniform over the subsets; in 2D one of
    "axis 0", "axis 1", "both"). Exact, its own inverse.

    Args:
        spatial_dims: number of spatial dimensions.
        spatial_axes: the axes that may be flipped (default: all).
        threshold: as :py:class:`ViewTransform`.
    """

    def __init__(
        self, spatial_dims: int = 2, spatial_axes: Sequence[int] | None = None, threshold: float = 0.5
    ) -> None:
        super().__init__(spatial_dims, threshold=threshold)
        self.spatial_axes = _check_axes(spatial_dims, spatial_axes)

    def draw(self, n: int) -> ViewParams:
        flips = draw_flips(self.R, n, self.spatial_dims, self.spatial_axes)[:, None]
        return ViewParams(torch.ones(n, 1, dtype=torch.float64), torch.as_tensor(flips))


class PLEViews(ViewTransform):
    """
    The ``K = 5`` views of PLE: original, zoom-in, two distinct zoom-outs and a flip, in that order.

    For a batch ``[B, C, *S]`` the output is ``[B * 5, C, *S]`` with view ``k`` of image ``b`` at row ``5 b + k``;
    every image gets its own random scales and flip axes.

    Args:
        spatial_dims: number of spatial dimensions (2 or 3).
        zoom_in_range: range of the zoom-in scale, above 1 (default: the reference's,
            :py:data:`DEFAULT_ZOOM_IN_RANGE`).
        zoom_out_range: range of the two zoom-out scales, below 1 (default: the reference's,
            :py:data:`DEFAULT_ZOOM_OUT_RANGE`); the two are drawn until they differ.
        flip_axes: axes the flip view may flip (default: all spatial axes).
        mode: interpolation of the zooms.
        threshold: as :py:class:`ViewTransform`.

    Example::

        views = PLEViews(spatial_dims=2).set_random_state(seed=0)
        v = views(images)                          # [B*5, C, H, W]
        y = views.warp(labels, threshold=0.5)      # the same views of the labels
        back = warp_from_views(torch.sigmoid(net(v)), views.params)  # every view's prediction in the original frame
    """

    num_views = 5

    def __init__(
        self,
        spatial_dims: int = 2,
        zoom_in_range: Sequence[float] = DEFAULT_ZOOM_IN_RANGE,
        zoom_out_range: Sequence[float] = DEFAULT_ZOOM_OUT_RANGE,
        flip_axes: Sequence[int] | None = None,
        mode: str = "bilinear",
        threshold: float = 0.5,
    ) -> None:
        super().__init__(spatial_dims, mode, threshold)
        self.zoom_in_range = _check_range(zoom_in_range, "zoom_in_range", zoom_in=True)
        self.zoom_out_range = _check_range(zoom_out_range, "zoom_out_range", zoom_in=False)
        if self.zoom_out_range[0] == self.zoom_out_range[1]:
            raise ValueError(
                f"zoom_out_range must not be a single value (two distinct zoom-outs are drawn), got {zoom_out_range}."
            )
        self.flip_axes = _check_axes(spatial_dims, flip_axes)

    def draw(self, n: int) -> ViewParams:
        zoom_in = draw_scales(self.R, n, self.zoom_in_range)
        out_a = draw_scales(self.R, n, self.zoom_out_range)
        out_b = draw_scales(self.R, n, self.zoom_out_range)
        while np.any(same := out_a == out_b):
            out_b[same] = draw_scales(self.R, int(same.sum()), self.zoom_out_range)
        ones = np.ones(n)
        scales = np.stack([ones, zoom_in, out_a, out_b, ones], axis=1)
        flips = np.zeros((n, 5, self.spatial_dims), dtype=bool)
        flips[:, 4] = draw_flips(self.R, n, self.spatial_dims, self.flip_axes)
        return ViewParams(torch.as_tensor(scales), torch.as_tensor(flips))
