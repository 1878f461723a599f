"""
Building blocks of the reference 2D pipeline: the one definition of the slice preparation and augmentation. The
bundles' ``train.json`` instantiates them (``"_target_": "monai_mlbseg.pipeline.slice_preprocessing"``), the demo runs
the left-atrium bundle, and library users call them directly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.handlers import MetricLogger
from monai.transforms import Compose, RandFlipd, RandRotated, Resized, ScaleIntensityd

__all__ = ["slice_preprocessing", "slice_augmentation", "logged_series"]


def slice_preprocessing(
    image_size: Sequence[int] = (144, 144),
    image_key: str = "image",
    label_keys: Sequence[str] = ("label", "gt"),
) -> Compose:
    """
    The reference's per-slice preparation: min-max scaling of the image to [0, 1], then resizing the whole slice to
    ``image_size`` (bilinear for the image, nearest for labels). :py:class:`~monai_mlbseg.inferers.SliceResizeInferer`
    prepares inference slices identically.

    Args:
        image_size: the network input size.
        image_key: image key.
        label_keys: label keys (missing ones are skipped).

    Returns:
        the composed transform of one slice dict.

    Example::

        prep = slice_preprocessing((144, 144))
        out = prep({"image": torch.rand(1, 200, 180), "label": torch.zeros(1, 200, 180)})  # [1, 144, 144] each
    """
    keys = [image_key, *label_keys]
    modes = ["bilinear"] + ["nearest"] * len(label_keys)
    return Compose(
        [
            ScaleIntensityd(keys=image_key, minv=0.0, maxv=1.0),
            Resized(keys=keys, spatial_size=tuple(image_size), mode=modes, allow_missing_keys=True),
        ]
    )


def slice_augmentation(
    keys: Sequence[str] = ("image", "label", "gt"),
    label_keys: Sequence[str] = ("label", "gt"),
    rotate_degrees: float = 10.0,
    flip_prob: float = 0.5,
) -> Compose:
    """
    The reference's training augmentation of 2D slices: a random horizontal flip (probability ``flip_prob``) and a
    rotation by a uniform angle in ``[-rotate_degrees, rotate_degrees]``, image and labels alike (nearest
    interpolation for labels).

    Args:
        keys: the keys to augment (missing ones are skipped).
        label_keys: those of ``keys`` interpolated with nearest neighbours.
        rotate_degrees: the largest rotation angle, in degrees.
        flip_prob: probability of the horizontal flip.

    Returns:
        the composed random transform of one slice dict.
    """
    modes = ["nearest" if k in label_keys else "bilinear" for k in keys]
    angle = math.radians(rotate_degrees)
    return Compose(
        [
            RandFlipd(keys=keys, prob=flip_prob, spatial_axis=1, allow_missing_keys=True),
            RandRotated(keys=keys, range_x=angle, prob=1.0, mode=modes, padding_mode="zeros", allow_missing_keys=True),
        ]
    )


def logged_series(
    logger: MetricLogger, prefix: str, offset: int = 0, select: Sequence[str] | None = None
) -> dict[str, list[tuple[int, float]]]:
    """
    Turn a MONAI :py:class:`~monai.handlers.MetricLogger` whose ``loss_transform`` returns a dict of scalars (e.g.
    :py:func:`~monai_mlbseg.engines.stage2_terms`) into ``{f"{prefix}/{name}": [(iteration + offset, value)]}``
    series for :py:func:`~monai_mlbseg.visualize.save_training_curves`; non-finite values are dropped.

    Args:
        logger: the attached logger.
        prefix: series name prefix, e.g. ``"stage2"``.
        offset: added to the iteration numbers (e.g. the length of an earlier stage).
        select: keep only these names (default: all).
    """
    series: dict[str, list[tuple[int, float]]] = {}
    for iteration, values in logger.loss:
        items = values.items() if isinstance(values, dict) else [("loss", values)]
        for name, value in items:
            if (select is None or name in select) and math.isfinite(float(value)):
                series.setdefault(f"{prefix}/{name}", []).append((iteration + offset, float(value)))
    for name, values in logger.metrics.items():
        series[f"{prefix}/{name}"] = [(i + offset, float(v)) for i, v in values if math.isfinite(float(v))]
    return series
