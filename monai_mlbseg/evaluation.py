"""
Per-case evaluation of binary segmentations: Dice, Jaccard, 95% Hausdorff distance and average symmetric surface
distance (in voxels and, given the voxel spacing, in millimetres), a report that accumulates, summarises and writes
them, an Ignite handler that fills a report from a MONAI evaluator, and a file-based convenience for a command line.

The metric values come from MONAI (:py:class:`~monai.metrics.DiceMetric`, :py:class:`~monai.metrics.MeanIoU`,
:py:class:`~monai.metrics.HausdorffDistanceMetric` with ``percentile=95`` and
:py:class:`~monai.metrics.SurfaceDistanceMetric` with ``symmetric=True``); this module fixes the conventions MONAI
leaves open:

- **masks**: inputs are ``[*S]`` or ``[1, *S]`` (2D or 3D); anything ``>= 0.5`` is foreground, so binary masks,
  probabilities and label maps with foreground values ``>= 1`` (e.g. 255, or several structures to be merged) all
  work.
- **both masks empty**: Dice 1, Jaccard 1, distances 0 (a correct "nothing here").
- **exactly one mask empty**: Dice 0, Jaccard 0, distances NaN (undefined; MONAI would give NaN or inf depending on
  the metric). NaNs are excluded from means and standard deviations and counted separately.
- **95HD** is MONAI's: the 95th percentile (linear interpolation) of the distances from the prediction's surface
  voxels to the label's surface, the same from the label to the prediction, and the larger of the two.
- **ASD** is MONAI's symmetric variant: the mean of *all* surface distances of both directions pooled (not the mean
  of the two directed means, which differs when the surfaces have different sizes).
- surface voxels are the foreground voxels with a background face neighbour (the image border counts as
  background).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.metrics import DiceMetric, HausdorffDistanceMetric, MeanIoU, SurfaceDistanceMetric
from monai.utils import convert_to_tensor

from monai_mlbseg.utils import atomic_write_json, atomic_write_text

__all__ = [
    "METRIC_KEYS",
    "SegmentationReport",
    "SegmentationReportHandler",
    "case_metrics",
    "compare_markdown",
    "evaluate_files",
    "spacing_from_affine",
]

#: metric columns, in report order (``*_mm`` only when a spacing is known).
METRIC_KEYS = ("dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm")
_CASE_ID = "case_id"
_SUMMARY_ROWS = ("mean", "std")


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


def _finite_stats(values: Iterable[Any], ddof: int) -> dict[str, float | int]:
    arr = np.asarray([v for v in values], dtype=float)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    mean = float(finite.mean()) if n else math.nan
    std = float(finite.std(ddof=ddof)) if n > ddof else math.nan
    return {"mean": mean, "std": std, "count": n, "nan_count": int(arr.size - n)}


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.generic, torch.Tensor)) and np.ndim(v) == 0:
        return _json_safe(v.item())
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, ".10g")
    return "" if v is None else str(v)


def _pm(mean: float, std: float, digits: int, scale: float = 1.0) -> str:
    if math.isnan(mean):
        return "n/a"
    s = f"{mean * scale:.{digits}f}"
    return s if math.isnan(std) else f"{s} ± {std * scale:.{digits}f}"


class SegmentationReport:
    """
    Per-case metrics of a test set, with a summary, CSV/JSON output and markdown tables.

    Args:
        ddof: delta degrees of freedom of the standard deviations (0: population std, as ``numpy.std``).

    Example::

        report = SegmentationReport()
        for case_id, pred, label in cases:
            report.add(case_id, pred, label, spacing=(0.625, 0.625, 0.625), fold=0)
        report.write("runs/eval")  # runs/eval/metrics.csv, runs/eval/metrics.json
        print(report.to_markdown())
    """

    def __init__(self, ddof: int = 0) -> None:
        if ddof < 0:
            raise ValueError(f"ddof must be >= 0, got {ddof}.")
        self.ddof = int(ddof)
        self._rows: list[dict[str, Any]] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, case_id: object) -> bool:
        return str(case_id) in self._ids

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One dict per case (copies): ``case_id``, the metrics, then any extra columns."""
        return [dict(r) for r in self._rows]

    @property
    def metric_keys(self) -> list[str]:
        """The metrics present in at least one row, in :py:data:`METRIC_KEYS` order."""
        return [k for k in METRIC_KEYS if any(k in r for r in self._rows)]

    @property
    def columns(self) -> list[str]:
        """``case_id``, the metrics, then the extra columns in order of first appearance."""
        extra: dict[str, None] = {}
        for r in self._rows:
            extra.update((k, None) for k in r if k != _CASE_ID and k not in METRIC_KEYS)
        return [_CASE_ID, *self.metric_keys, *extra]

    def add_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """
        Add a precomputed row (e.g. from another process or a JSON report).

        Raises:
            ValueError: when ``case_id`` is missing or already in the report.
        """
        if _CASE_ID not in row:
            raise ValueError(f"a report row needs a {_CASE_ID!r}, got keys {sorted(row)}.")
        case_id = str(row[_CASE_ID])
        if case_id in _SUMMARY_ROWS:
            raise ValueError(f"case id {case_id!r} is reserved for the summary rows of the CSV.")
        if case_id in self._ids:
            raise ValueError(f"case {case_id!r} is already in the report.")
        new = {_CASE_ID: case_id, **{k: v for k, v in row.items() if k != _CASE_ID}}
        for k in METRIC_KEYS:
            if k in new:
                new[k] = math.nan if new[k] is None else float(new[k])
        self._rows.append(new)
        self._ids.add(case_id)
        return dict(new)

    def add(
        self,
        case_id: str,
        pred: NdarrayOrTensor,
        label: NdarrayOrTensor,
        spacing: float | Sequence[float] | None = None,
        **extra_columns: Any,
    ) -> dict[str, Any]:
        """
        Compute :py:func:`case_metrics` of one case and add them as a row.

        Args:
            case_id: unique id of the case.
            pred: prediction, see :py:func:`case_metrics`.
            label: reference, see :py:func:`case_metrics`.
            spacing: voxel spacing for the millimetre distances.
            extra_columns: further columns of the row (e.g. ``method="MLB-Seg"``, ``fold=0``).

        Returns:
            the row added.

        Raises:
            ValueError: on a duplicate case id, an extra column named like a metric, or invalid masks / spacing.
        """
        clash = sorted(set(extra_columns) & {*METRIC_KEYS, _CASE_ID})
        if clash:
            raise ValueError(f"extra columns {clash} clash with the report's own columns.")
        if str(case_id) in self._ids:
            raise ValueError(f"case {case_id!r} is already in the report.")
        return self.add_row({_CASE_ID: case_id, **case_metrics(pred, label, spacing), **extra_columns})

    def summary(self) -> dict[str, dict[str, float | int]]:
        """
        Per metric: ``mean`` and ``std`` of the finite values, ``count`` (number of finite values) and
        ``nan_count`` (cases where the metric is NaN, e.g. distances with exactly one empty mask; cases without
        the metric at all, e.g. ``*_mm`` without spacing, are in neither count).
        """
        return {k: _finite_stats((r[k] for r in self._rows if k in r), self.ddof) for k in self.metric_keys}

    def _csv_text(self) -> str:
        columns = self.columns
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in self._rows:
            writer.writerow([_fmt(r.get(c)) for c in columns])
        summary = self.summary()
        for stat in _SUMMARY_ROWS:
            writer.writerow([stat] + [_fmt(summary[c][stat]) if c in summary else "" for c in columns[1:]])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """``{"cases": rows, "summary": summary()}`` with NaN as ``None`` (strict JSON)."""
        return _json_safe({"cases": self.rows, "summary": self.summary()})

    def write(self, out_dir: str | os.PathLike, prefix: str = "metrics") -> dict[str, Path]:
        """
        Write ``<prefix>.csv`` (one row per case, then ``mean`` and ``std`` rows; NaN as ``nan``) and
        ``<prefix>.json`` (``{"cases": [...], "summary": {...}}``, NaN as ``null``), each atomically.

        Returns:
            ``{"csv": path, "json": path}``.
        """
        out = Path(out_dir)
        return {
            "csv": atomic_write_text(out / f"{prefix}.csv", self._csv_text()),
            "json": atomic_write_json(out / f"{prefix}.json", self.to_dict()),
        }

    @classmethod
    def from_json(cls, path: str | os.PathLike, ddof: int = 0) -> SegmentationReport:
        """Rebuild a report from a ``<prefix>.json`` written by :py:meth:`write` (e.g. to compare runs).

        Raises:
            FileNotFoundError: when the file does not exist.
            ValueError: when it is not a report.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"report file not found: {path}")
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("cases"), list):
            raise ValueError(f"{path} is not a segmentation report (no 'cases' list).")
        report = cls(ddof=ddof)
        for row in data["cases"]:
            report.add_row(row)
        return report

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 4) -> str:
        """
        A markdown table of the summary: one line per metric with ``mean ± std`` and the number of cases it is
        computed from.

        Args:
            columns: the metrics to show (default: all present).
            digits: decimals.

        Raises:
            ValueError: for an unknown metric.
        """
        summary = self.summary()
        keys = list(summary) if columns is None else list(columns)
        unknown = [k for k in keys if k not in summary]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; the report has {list(summary)}.")
        lines = ["| metric | mean ± std | cases |", "|---|---|---|"]
        for k in keys:
            s = summary[k]
            n = f"{s['count']}" + (f" (+{s['nan_count']} NaN)" if s["nan_count"] else "")
            lines.append(f"| {k} | {_pm(s['mean'], s['std'], digits)} | {n} |")
        return "\n".join(lines) + "\n"


def compare_markdown(reports: Mapping[str, SegmentationReport], digits: int = 2, unit: str = "voxel") -> str:
    """
    A markdown table comparing methods: one row per report with Dice (%), Jaccard (%), 95HD and ASD as
    ``mean ± std``. Cases with NaN distances (exactly one empty mask) are excluded from the distance columns; a
    note under the table says how many.

    Args:
        reports: method name -> report, e.g. ``{"labeled only (stage 1)": r1, "MLB-Seg (stage 2)": r2}``.
        digits: decimals.
        unit: ``"voxel"`` or ``"mm"`` (the reports then need a spacing).

    Raises:
        ValueError: for no reports, an unknown unit, or reports without the needed metrics.

    Example::

        print(compare_markdown({"labeled only (stage 1)": stage1, "MLB-Seg (stage 2)": stage2}))
    """
    if not reports:
        raise ValueError("compare_markdown needs at least one report.")
    if unit not in ("voxel", "mm"):
        raise ValueError(f"unit must be 'voxel' or 'mm', got {unit!r}.")
    cols = [("dice", "Dice (%)", 100.0), ("jaccard", "Jaccard (%)", 100.0)]
    cols += [(f"hd95_{unit}", f"95HD ({unit})", 1.0), (f"asd_{unit}", f"ASD ({unit})", 1.0)]
    lines = ["| Method | " + " | ".join(c[1] for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    notes = []
    for name, report in reports.items():
        summary = report.summary()
        missing = [k for k, _, _ in cols if k not in summary]
        if missing:
            raise ValueError(f"report {name!r} has no {missing} (no cases, or no spacing for 'mm').")
        cells = [_pm(summary[k]["mean"], summary[k]["std"], digits, scale) for k, _, scale in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        n_nan = max(summary[k]["nan_count"] for k, _, _ in cols)
        if n_nan:
            notes.append(f"{name}: {n_nan} of {len(report)} case(s) with an empty prediction or label")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nDistances exclude cases where they are undefined (" + "; ".join(notes) + ").\n"
    return text


def _strip_ext(name: str) -> str:
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".png", ".h5", ".gz"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def _foreground(x: torch.Tensor, name: str) -> torch.Tensor:
    """Channel-first ``[C, *S]`` -> ``[*S]`` foreground probability / mask (C == 1, or C == 2: channel 1)."""
    if x.ndim < 3:
        raise ValueError(f"{name} must be channel-first [C, *S], got shape {tuple(x.shape)}.")
    if x.shape[0] == 1:
        return x[0]
    if x.shape[0] == 2:
        return x[1]
    raise ValueError(f"{name} must have 1 channel (or 2, background/foreground), got shape {tuple(x.shape)}.")


class SegmentationReportHandler:
    """
    Ignite handler filling a :py:class:`SegmentationReport` from a MONAI evaluator
    (:py:class:`~monai.engines.SupervisedEvaluator`) and writing it when the evaluation completes.

    At every ``ITERATION_COMPLETED`` it reads ``engine.state.output``: MONAI evaluators decollate it into a list of
    per-item dicts, ``pred`` and ``label`` each ``[C, *S]`` (``C`` = 1, or 2 for a background/foreground one-hot or
    softmax, whose channel 1 is used); predictions are thresholded at 0.5 (post-processed masks pass unchanged). A
    non-decollated dict of batched ``[B, C, *S]`` tensors works too. The case id is, in order of preference:
    ``case_id_key`` of the item's batch data or output, the file name (without extension) of
    ``pred.meta["filename_or_obj"]`` or of the label's, else ``case_<n>``. With ``use_spacing``, the spacing comes
    from the label's affine (:py:func:`spacing_from_affine`). A case id already in the report (e.g. padding of a
    ``DistributedSampler``) is skipped.

    At ``STARTED`` the report is reset, so a validator run at every epoch reports its last run. At ``COMPLETED``
    the rows of all ranks are gathered (under ``torch.distributed``), and rank 0 writes ``<prefix>.csv`` /
    ``<prefix>.json`` to ``output_dir`` (when given) and logs the summary.

    Args:
        output_dir: folder of the report files; ``None``: nothing is written (see :py:attr:`report`).
        prefix: file name prefix.
        pred_key: key of the prediction in the output items.
        label_key: key of the label in the output items.
        case_id_key: key of the case id in the batch data (or output) items.
        use_spacing: add millimetre distances from the label affine.
        name: logger name (default: this module's).

    Example::

        evaluator = SupervisedEvaluator(
            device, val_loader, net, postprocessing=Compose([Activationsd("pred", sigmoid=True),
                                                             AsDiscreted("pred", threshold=0.5)]),
            val_handlers=[SegmentationReportHandler(output_dir="runs/eval")],
        )
        evaluator.run()
    """

    def __init__(
        self,
        output_dir: str | os.PathLike | None = None,
        prefix: str = "metrics",
        pred_key: str = "pred",
        label_key: str = "label",
        case_id_key: str = _CASE_ID,
        use_spacing: bool = True,
        name: str | None = None,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.prefix = prefix
        self.pred_key = pred_key
        self.label_key = label_key
        self.case_id_key = case_id_key
        self.use_spacing = use_spacing
        self.logger = logging.getLogger(name or __name__)
        self.report = SegmentationReport()
        #: files written at the last completion (``{"csv": ..., "json": ...}``), if any.
        self.written: dict[str, Path] = {}
        self._seen = 0

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine``."""
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def __call__(self, engine: Engine) -> None:
        """Same as :py:meth:`iteration_completed`, for use as a plain event handler."""
        self.iteration_completed(engine)

    def reset(self, engine: Engine | None = None) -> None:
        """Start a new report."""
        self.report = SegmentationReport()
        self.written = {}
        self._seen = 0

    @staticmethod
    def _items(data: Any) -> list[Mapping[str, Any]]:
        if data is None:
            return []
        if isinstance(data, Mapping):  # not decollated: split the batch along its first dimension

            def batched(v: Any) -> bool:
                return isinstance(v, (list, tuple)) or (isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim > 0)

            sizes = [len(v) for v in data.values() if batched(v)]
            n = sizes[0] if sizes else 1
            return [{k: (v[i] if batched(v) else v) for k, v in data.items()} for i in range(n)]
        if isinstance(data, (list, tuple)):
            return [d if isinstance(d, Mapping) else {} for d in data]
        return []

    def _case_id(self, out: Mapping[str, Any], batch: Mapping[str, Any] | None, pred: Any, label: Any) -> str:
        for source in (batch, out):
            if source is not None and self.case_id_key in source:
                value = source[self.case_id_key]
                if isinstance(value, (torch.Tensor, np.ndarray)):
                    value = value.tolist()
                return str(value)
        for x in (pred, label):
            if isinstance(x, MetaTensor):
                fname = x.meta.get("filename_or_obj")
                if isinstance(fname, (list, tuple)):
                    fname = fname[0] if fname else None
                if fname:
                    return _strip_ext(str(fname))
        return f"case_{self._seen}"

    def iteration_completed(self, engine: Engine) -> None:
        """Add the cases of the current iteration to the report."""
        outputs = self._items(engine.state.output)
        batches = self._items(engine.state.batch)
        for i, out in enumerate(outputs):
            if self.pred_key not in out or self.label_key not in out:
                raise KeyError(
                    f"{type(self).__name__}: output items need {self.pred_key!r} and {self.label_key!r}, "
                    f"got keys {sorted(out)}."
                )
            pred, label = out[self.pred_key], out[self.label_key]
            batch = batches[i] if i < len(batches) else None
            case_id = self._case_id(out, batch, pred, label)
            self._seen += 1
            if case_id in self.report:
                self.logger.debug(f"case {case_id!r} already evaluated, skipped")
                continue
            p = _foreground(convert_to_tensor(pred, track_meta=False).detach().float().cpu(), self.pred_key)
            g = _foreground(convert_to_tensor(label, track_meta=False).detach().float().cpu(), self.label_key)
            spacing = None
            if self.use_spacing:
                affine = label.affine if isinstance(label, MetaTensor) else None
                if affine is None and isinstance(pred, MetaTensor):
                    affine = pred.affine
                if affine is not None:
                    spacing = spacing_from_affine(affine, g.ndim)
            try:
                self.report.add(case_id, p, g, spacing=spacing)
            except ValueError as e:
                raise ValueError(f"case {case_id!r}: {e}") from e

    def _gather_rows(self) -> list[dict[str, Any]]:
        rows = self.report.rows
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return rows
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rows)
        return [r for rank_rows in gathered for r in (rank_rows or [])]

    def completed(self, engine: Engine) -> None:
        """Gather all ranks' cases; on rank 0 write the report and log its summary."""
        rows = self._gather_rows()
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        merged = SegmentationReport(ddof=self.report.ddof)
        for row in rows:
            if row[_CASE_ID] not in merged:
                merged.add_row(row)
        self.report = merged
        if self.output_dir is not None:
            self.written = merged.write(self.output_dir, self.prefix)
        summary = merged.summary()
        parts = [f"{k} {_pm(s['mean'], s['std'], 4)}" for k, s in summary.items()]
        where = f"; written to {self.written['csv']}" if self.written else ""
        self.logger.info(f"segmentation report ({len(merged)} cases): {', '.join(parts)}{where}")


def evaluate_files(
    pred_files: Sequence[str | os.PathLike],
    label_files: Sequence[str | os.PathLike],
    case_ids: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    prefix: str = "metrics",
    reader: str | Any | None = None,
    use_spacing: bool = True,
    check_affine: bool = True,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> SegmentationReport:
    """
    Evaluate saved masks (NIfTI, NRRD, MHA, ...; anything MONAI's :py:class:`~monai.transforms.LoadImage` reads)
    against label files, e.g. for an ``evaluate`` command.

    Args:
        pred_files: prediction files (masks or probabilities, ``>= 0.5`` is foreground).
        label_files: label files, in the same order.
        case_ids: one id per case (default: the label file name without extension).
        out_dir: when given, the report is written there (:py:meth:`SegmentationReport.write`).
        prefix: file name prefix of the written report.
        reader: the ``reader`` of ``LoadImage`` (default: chosen by extension).
        use_spacing: add millimetre distances, with the spacing of the label file's affine.
        check_affine: require the prediction and label affines to agree (within 1e-3), so that a prediction
            saved in another space is not silently compared voxel-by-voxel.
        transform: applied to every loaded image (prediction and label, ``[*S]`` MetaTensors) before evaluation,
            e.g. a squeeze of a trailing singleton axis.

    Returns:
        the filled report.

    Raises:
        ValueError: when the lists differ in length, the case ids are not unique, or a pair does not match (shape
            or affine; both files are named).
        FileNotFoundError: naming the first missing file (checked before anything is loaded).
    """
    from monai.transforms import LoadImage

    pred_files, label_files = [Path(p) for p in pred_files], [Path(p) for p in label_files]
    if len(pred_files) != len(label_files):
        raise ValueError(f"{len(pred_files)} prediction files but {len(label_files)} label files.")
    if not pred_files:
        raise ValueError("no files to evaluate.")
    ids = [_strip_ext(f.name) for f in label_files] if case_ids is None else [str(c) for c in case_ids]
    if len(ids) != len(label_files):
        raise ValueError(f"{len(ids)} case ids for {len(label_files)} cases.")
    dupes = sorted({c for c in ids if ids.count(c) > 1})
    if dupes:
        raise ValueError(f"case ids must be unique, repeated: {dupes} (pass case_ids explicitly).")
    for f in (*pred_files, *label_files):
        if not f.is_file():
            raise FileNotFoundError(f"file not found: {f}")

    load = LoadImage(image_only=True, reader=reader)
    report = SegmentationReport()
    for case_id, pf, lf in zip(ids, pred_files, label_files):
        pred, label = load(pf), load(lf)
        if transform is not None:
            pred, label = transform(pred), transform(label)
        p_t = convert_to_tensor(pred, track_meta=False)
        l_t = convert_to_tensor(label, track_meta=False)
        if p_t.shape != l_t.shape:
            raise ValueError(f"case {case_id!r}: {pf} has shape {tuple(p_t.shape)} but {lf} has {tuple(l_t.shape)}.")
        spatial = l_t.ndim - 1 if l_t.ndim in (3, 4) and l_t.shape[0] == 1 else l_t.ndim
        if check_affine and isinstance(pred, MetaTensor) and isinstance(label, MetaTensor):
            if not np.allclose(np.asarray(pred.affine), np.asarray(label.affine), atol=1e-3):
                raise ValueError(
                    f"case {case_id!r}: {pf} and {lf} have different affines (different voxel grids); "
                    "resample the prediction to the label's grid or pass check_affine=False."
                )
        spacing = None
        if use_spacing and isinstance(label, MetaTensor) and spatial in (2, 3):
            spacing = spacing_from_affine(label.affine, spatial)
        try:
            report.add(case_id, p_t, l_t, spacing=spacing)
        except ValueError as e:
            raise ValueError(f"case {case_id!r} ({pf}, {lf}): {e}") from e
    if out_dir is not None:
        report.write(out_dir, prefix)
    return report
