"""
Figures for reports: prediction overlays, the per-view weight (trust) maps of a stage-2 method's label sources
(MLB-Seg's learned ones, a mean teacher's confidence...), and training curves.

Figures are drawn on matplotlib's Agg canvas directly (no ``pyplot``: no global backend switch, no figure registry,
usable in threads and headless jobs) and saved atomically through :py:func:`~monai_mlbseg.utils.atomic_path`. The
file format follows the suffix: ``.png`` (default use), ``.pdf`` or ``.svg``. Arrays may be numpy arrays or
(Meta)Tensors, on any device.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from monai_mlbseg.evaluation import dice_score
from monai_mlbseg.utils import atomic_path

__all__ = ["DEFAULT_VIEW_NAMES", "moving_average", "save_overlays", "save_training_curves", "save_weight_maps"]

#: column titles of :py:func:`save_weight_maps` for the paper's five views.
DEFAULT_VIEW_NAMES = ("original", "zoom-in", "zoom-out", "zoom-out", "flip")
_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
_GT_COLOR = "lime"
_PRED_COLOR = "red"


def _np(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        x = x.as_tensor() if hasattr(x, "as_tensor") else x
        x = x.float().numpy() if x.dtype in (torch.bfloat16, torch.float16) else x.numpy()
    try:
        return np.asarray(x, dtype=float)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}.") from e


def _slice2d(x: Any, name: str) -> np.ndarray:
    a = _np(x, name)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2D slice [H, W] (or [1, H, W]), got shape {a.shape}.")
    return a


def _stack(x: Any, name: str, ndim: int) -> np.ndarray:
    """``[K, *rest]`` with ``ndim`` dims; a singleton channel axis after K is dropped."""
    a = _np(x, name)
    if a.ndim == ndim + 1 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {a.shape}.")
    return a


def _save(fig: Figure, path: str | os.PathLike, dpi: int) -> Path:
    target = Path(path)
    fmt = _FORMATS.get(target.suffix.lower())
    if fmt is None:
        raise ValueError(f"{target}: the file name must end with one of {sorted(_FORMATS)}.")
    FigureCanvasAgg(fig)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return target


def _contour(ax: Any, mask: np.ndarray, color: str) -> None:
    if mask.any() and not mask.all():  # a constant mask has no contour (matplotlib would warn)
        ax.contour(mask.astype(float), levels=[0.5], colors=[color], linewidths=1.0)


def _image(ax: Any, img: np.ndarray, **kwargs: Any) -> Any:
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.imshow(img, interpolation="nearest", **kwargs)


def save_overlays(
    path: str | os.PathLike,
    images: Sequence[Any],
    labels: Sequence[Any],
    predictions: Mapping[str, Sequence[Any]],
    titles: Sequence[str] | None = None,
    max_rows: int = 8,
    dpi: int = 100,
) -> Path:
    """
    A grid of test slices: one row per slice; the first column is the image, then one column per method showing
    the image with the ground-truth contour (green) and the method's prediction contour (red), titled with the
    method name and, below it, the slice's Dice (1 when both masks are empty).

    Args:
        path: output file (``.png``, ``.pdf`` or ``.svg``); written atomically.
        images: ``N`` 2D slices ``[H, W]`` (or ``[1, H, W]``; an array ``[N, H, W]`` works too).
        labels: ``N`` ground-truth masks, each of its image's shape (``>= 0.5`` is foreground).
        predictions: method name -> ``N`` predicted masks (or probabilities), e.g.
            ``{"labeled only": stage1_preds, "MLB-Seg": stage2_preds}``.
        titles: ``N`` row titles (e.g. case id and slice index).
        max_rows: at most this many rows; with more slices, ``max_rows`` evenly spaced ones are shown.
        dpi: resolution.

    Returns:
        the path written.

    Raises:
        ValueError: for no slices or methods, lists of different lengths, or a mask whose shape differs from its
            image (the method and slice are named).
    """
    n = len(images)
    if n == 0:
        raise ValueError("save_overlays needs at least one slice.")
    if not predictions:
        raise ValueError("save_overlays needs at least one method in predictions.")
    if max_rows < 1:
        raise ValueError(f"max_rows must be >= 1, got {max_rows}.")
    if len(labels) != n:
        raise ValueError(f"{n} images but {len(labels)} labels.")
    for method, preds in predictions.items():
        if len(preds) != n:
            raise ValueError(f"{n} images but {len(preds)} predictions of {method!r}.")
    if titles is not None and len(titles) != n:
        raise ValueError(f"{n} images but {len(titles)} titles.")
    rows = list(range(n)) if n <= max_rows else sorted({int(round(i)) for i in np.linspace(0, n - 1, max_rows)})

    data = []
    for i in rows:
        img = _slice2d(images[i], f"images[{i}]")
        lab = _slice2d(labels[i], f"labels[{i}]") >= 0.5
        if lab.shape != img.shape:
            raise ValueError(f"labels[{i}] has shape {lab.shape} but images[{i}] has {img.shape}.")
        preds = {}
        for method, seq in predictions.items():
            p = _slice2d(seq[i], f"predictions[{method!r}][{i}]") >= 0.5
            if p.shape != img.shape:
                raise ValueError(f"predictions[{method!r}][{i}] has shape {p.shape} but images[{i}] has {img.shape}.")
            preds[method] = p
        data.append((i, img, lab, preds))

    h, w = data[0][1].shape
    cell = 2.6
    ncols = 1 + len(predictions)
    fig = Figure(figsize=(cell * ncols, cell * len(rows) * h / w + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(len(rows), ncols, squeeze=False))
    for r, (i, img, lab, preds) in enumerate(data):
        lo, hi = np.percentile(img, (0.5, 99.5)) if img.size else (0.0, 1.0)
        shown = {"cmap": "gray", "vmin": lo, "vmax": hi if hi > lo else lo + 1}
        _image(axes[r, 0], img, **shown)
        axes[r, 0].set_title(titles[i] if titles is not None else f"slice {i}", fontsize=9)
        for c, (method, p) in enumerate(preds.items(), start=1):
            ax = axes[r, c]
            _image(ax, img, **shown)
            _contour(ax, lab, _GT_COLOR)
            _contour(ax, p, _PRED_COLOR)
            ax.set_title(f"{method}\nDice {100 * dice_score(p, lab):.1f}%", fontsize=9)
    fig.suptitle("green: ground truth, red: prediction", fontsize=9)
    return _save(fig, path, dpi)


def save_weight_maps(
    path: str | os.PathLike,
    views: Any,
    weights: Any,
    initial_labels: Any | None = None,
    pseudo_labels: Any | None = None,
    view_names: Sequence[str] | None = None,
    weight_range: tuple[float, float] | None = None,
    dpi: int = 100,
    source_names: Sequence[str] | None = None,
    source_labels: Mapping[str, Any] | None = None,
) -> Path:
    """
    The weight-map (trust-map) figure of a stage-2 method with label sources: for each of the ``K`` views
    (columns), the view image, then the label sources' labels in that view and one row per label source with its
    per-pixel weight. With ``source_labels`` (the sources by name, as in ``engine.state.weight_maps["sources"]``,
    whatever their names, e.g. ``{"teacher": ...}``), each source gets its label row followed by its weight row;
    otherwise (MLB-Seg's figure) the optional initial and pseudo label rows come first, then one weight row per
    source (the initial label's and the pseudo label's by default). Each weight row has one colour scale (shared by
    its ``K`` maps) with its colour bar.

    Args:
        path: output file (``.png``, ``.pdf`` or ``.svg``); written atomically.
        views: ``[K, H, W]`` (or ``[K, 1, H, W]``) view images, K = 5 in the paper: original, zoom-in, zoom-out,
            zoom-out, flip.
        weights: ``[K, S, H, W]`` per-pixel weights, channel ``i`` for the ``i``-th label source (with the defaults:
            channel 0 weighs the initial label, channel 1 the pseudo label).
        initial_labels: optional ``[K, H, W]`` (or ``[K, 1, H, W]``) initial labels in the views.
        pseudo_labels: optional ``[K, H, W]`` (or ``[K, 1, H, W]``) pseudo labels in the views.
        view_names: ``K`` column titles (default: :py:data:`DEFAULT_VIEW_NAMES` for K = 5, else ``view i``).
        weight_range: fixed ``(min, max)`` of both weight colour scales (default: each row's data range).
        dpi: resolution.
        source_names: ``S`` names of the weight rows (default: the keys of ``source_labels``, else
            ``("initial label", "pseudo label")``; the keys of ``engine.state.weight_maps["sources"]`` for a trainer
            with other sources).
        source_labels: optional ``{name: [K, H, W]}`` (or ``[K, 1, H, W]``) label of each source in the views, one
            per weight channel and in its order: each is drawn above its weight row. Not with ``initial_labels`` or
            ``pseudo_labels``.

    Returns:
        the path written.

    Raises:
        ValueError: when the shapes disagree (named), or ``view_names`` does not have ``K`` entries, or
            ``source_names`` not one per weight channel, or ``source_labels`` names other sources than
            ``source_names`` or comes with ``initial_labels`` / ``pseudo_labels``.

    Example::

        maps = engine.state.weight_maps  # after MetaIterationEvents.WEIGHTS_COMPLETED
        k = maps["num_views"]
        labels = {name: label[:k] for name, label in maps["sources"].items()}
        save_weight_maps("trust.png", maps["views"][:k], maps["weights"][:k], source_labels=labels)
    """
    v = _stack(views, "views", 3)
    k, h, w = v.shape
    wt = _np(weights, "weights")
    if source_labels is not None and (initial_labels is not None or pseudo_labels is not None):
        raise ValueError("give the labels either as source_labels or as initial_labels / pseudo_labels, not both.")
    default_names = list(source_labels) if source_labels is not None else ("initial label", "pseudo label")
    names = [str(n) for n in (source_names or default_names)]
    if wt.ndim != 4 or wt.shape != (k, wt.shape[1], h, w):
        raise ValueError(
            f"weights must have shape [K, S, H, W] = {(k, 'S', h, w)} for views {v.shape}, got {wt.shape}."
        )
    if wt.shape[1] != len(names):
        raise ValueError(f"weights have {wt.shape[1]} source channels for {len(names)} source names {names}.")
    if source_labels is not None and [str(n) for n in source_labels] != names:
        raise ValueError(f"source_labels name the sources {list(source_labels)}, the weight rows are {names}.")
    label_rows = []  # (name, [K, H, W], the weight channel drawn right below it or None)
    given = (
        [(f"{n} label", lab, c) for c, (n, lab) in enumerate(source_labels.items())]
        if source_labels is not None
        else [("initial label", initial_labels, None), ("pseudo label", pseudo_labels, None)]
    )
    for name, lab, channel in given:
        if lab is not None:
            what = f"source_labels[{names[channel]!r}]" if channel is not None else name.replace(" ", "_") + "s"
            a = _stack(lab, what, 3)
            if a.shape != v.shape:
                raise ValueError(f"{what} must have the views' shape {v.shape}, got {a.shape}.")
            label_rows.append((name, a, channel))
    if view_names is None:
        view_names = DEFAULT_VIEW_NAMES if k == len(DEFAULT_VIEW_NAMES) else [f"view {i}" for i in range(k)]
    if len(view_names) != k:
        raise ValueError(f"{len(view_names)} view names for {k} views.")
    if weight_range is not None and not weight_range[0] < weight_range[1]:
        raise ValueError(f"weight_range must be (min, max) with min < max, got {weight_range}.")

    # the rows: the views, then each source's label (when given) right above its weight, or (MLB-Seg's figure) the
    # initial and pseudo labels first, then every weight
    rows: list[tuple[str, str, Any]] = [("view", "view", None)]
    if source_labels is not None:
        labels_of = {channel: (name, a) for name, a, channel in label_rows}
        for c, n in enumerate(names):
            if c in labels_of:
                rows.append(("label", labels_of[c][0], labels_of[c][1]))
            rows.append(("weight", f"{n} weight", c))
    else:
        rows += [("label", name, a) for name, a, _ in label_rows]
        rows += [("weight", f"{n} weight", c) for c, n in enumerate(names)]
    nrows = len(rows)
    cell = 2.2
    fig = Figure(figsize=(cell * k + 1.0, cell * nrows * h / w + 0.3), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, k, squeeze=False))
    for j in range(k):
        _image(axes[0, j], v[j], cmap="gray")
        axes[0, j].set_title(view_names[j], fontsize=9)
    axes[0, 0].set_ylabel("view", fontsize=9)
    for r, (kind, name, a) in enumerate(rows):
        if kind != "label":
            continue
        for j in range(k):
            _image(axes[r, j], a[j], cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(name, fontsize=9)
    for r, (kind, name, c) in enumerate(rows):
        if kind != "weight":
            continue
        if weight_range is None:
            finite = wt[:, c][np.isfinite(wt[:, c])]
            lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        else:
            lo, hi = weight_range
        if hi <= lo:  # a constant row (e.g. no confident pixel): a readable scale around it
            hi = lo + (abs(lo) or 1.0)
        im = None
        for j in range(k):
            im = _image(axes[r, j], wt[j, c], cmap="viridis", vmin=lo, vmax=hi)
        axes[r, 0].set_ylabel(name, fontsize=9)
        fig.colorbar(im, ax=list(axes[r, :]), shrink=0.9)
    return _save(fig, path, dpi)


def moving_average(values: Sequence[float] | np.ndarray, window: int) -> np.ndarray:
    """Trailing mean of ``window`` consecutive values (``len(values) - window + 1`` results).

    Raises:
        ValueError: when ``window`` is not between 1 and ``len(values)``.
    """
    arr = np.asarray(values, dtype=float)
    if not 1 <= window <= len(arr):
        raise ValueError(f"window must be between 1 and {len(arr)}, got {window}.")
    return np.convolve(arr, np.ones(window) / window, mode="valid")


def save_training_curves(
    path: str | os.PathLike,
    history: Mapping[str, Sequence[tuple[int, float]]],
    title: str | None = None,
    dpi: int = 100,
    smooth: int = 1,
) -> Path:
    """
    Line plots of named series against the iteration, one subplot per prefix: ``"stage1/loss"`` and
    ``"stage1/dice"`` share the ``stage1`` subplot, a name without ``/`` is its own subplot. Points are sorted by
    iteration; NaN values leave gaps; empty series are skipped.

    Args:
        path: output file (``.png``, ``.pdf`` or ``.svg``); written atomically.
        history: series name -> ``[(iteration, value), ...]``, e.g. ``{"stage1/loss": [...],
            "stage2/loss": [...], "stage2/weight_initial": [...], "validation/dice": [...]}``.
        title: figure title.
        dpi: resolution.
        smooth: moving-average window; above 1, each series is drawn faintly with its moving average on top.

    Returns:
        the path written.

    Raises:
        ValueError: when no series has points, or a point is not an ``(iteration, value)`` pair (the series is
            named).
    """
    groups: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
    for name, points in history.items():
        try:
            arr = np.asarray([(float(p[0]), float(p[1])) for p in points], dtype=float).reshape(-1, 2)
            if any(len(p) != 2 for p in points):
                raise ValueError
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"series {name!r} must be a list of (iteration, value) pairs.") from e
        if not len(arr):
            continue
        arr = arr[np.argsort(arr[:, 0], kind="stable")]
        group, _, label = str(name).partition("/")
        groups.setdefault(group, []).append((label or group, arr[:, 0], arr[:, 1]))
    if not groups:
        raise ValueError("save_training_curves needs at least one non-empty series.")

    ncols = min(2, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.2 * nrows + (0.4 if title else 0.0)), layout="constrained")
    axes = np.asarray(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax, (group, series) in zip(axes, groups.items()):
        for label, x, y in series:
            if smooth > 1 and len(y) >= smooth:
                line = ax.plot(x, y, linewidth=0.6, alpha=0.25)[0]
                ax.plot(x[smooth - 1 :], moving_average(y, smooth), label=label, linewidth=1.4, color=line.get_color())
            else:
                ax.plot(x, y, label=label, linewidth=1.2, marker="." if len(x) < 30 else None)
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[len(groups) :]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    return _save(fig, path, dpi)
