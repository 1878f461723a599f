"""
A report of per-case metrics: accumulation, summary, CSV/JSON files and markdown tables.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import NdarrayOrTensor

from monai_mlbseg.utils import atomic_write_json, atomic_write_text

from .metrics import METRIC_KEYS, case_metrics

__all__ = ["CASE_ID", "FAILED", "SegmentationReport", "case_id_from_path", "compare_markdown", "plus_minus"]

#: the key of the case id in a report row.
CASE_ID = "case_id"
#: the column of the CSV (and the key of a JSON entry) that says why a case failed.
FAILED = "failed"
_SUMMARY_ROWS = ("mean", "std")


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


def plus_minus(mean: float, std: float, digits: int, scale: float = 1.0) -> str:
    """``"mean ± std"`` with ``digits`` decimals (``"n/a"`` for a NaN mean, no ``± std`` for a NaN std)."""
    if math.isnan(mean):
        return "n/a"
    s = f"{mean * scale:.{digits}f}"
    return s if math.isnan(std) else f"{s} ± {std * scale:.{digits}f}"


class SegmentationReport:
    """
    Per-case metrics of a test set, with a summary, CSV/JSON output and markdown tables. Cases that could not be
    evaluated (:py:meth:`add_failure`) are listed with their reason, apart from the metrics and their summary.

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
        self._failed: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, case_id: object) -> bool:
        return str(case_id) in self._ids or str(case_id) in self._failed

    @property
    def failed(self) -> dict[str, str]:
        """The cases that could not be evaluated: case id -> reason (a copy), in the order they were added."""
        return dict(self._failed)

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
            extra.update((k, None) for k in r if k != CASE_ID and k not in METRIC_KEYS)
        return [CASE_ID, *self.metric_keys, *extra]

    def add_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """
        Add a precomputed row (e.g. from another process or a JSON report).

        Raises:
            ValueError: when ``case_id`` is missing or already in the report.
        """
        if CASE_ID not in row:
            raise ValueError(f"a report row needs a {CASE_ID!r}, got keys {sorted(row)}.")
        case_id = str(row[CASE_ID])
        if case_id in _SUMMARY_ROWS:
            raise ValueError(f"case id {case_id!r} is reserved for the summary rows of the CSV.")
        if case_id in self:
            raise ValueError(f"case {case_id!r} is already in the report.")
        new = {CASE_ID: case_id, **{k: v for k, v in row.items() if k != CASE_ID}}
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
        clash = sorted(set(extra_columns) & {*METRIC_KEYS, CASE_ID})
        if clash:
            raise ValueError(f"extra columns {clash} clash with the report's own columns.")
        if case_id in self:
            raise ValueError(f"case {case_id!r} is already in the report.")
        return self.add_row({CASE_ID: case_id, **case_metrics(pred, label, spacing), **extra_columns})

    def add_failure(self, case_id: str, reason: str) -> None:
        """
        Add a case that could not be evaluated (e.g. its image could not be read mid-run): it has no metrics, is
        left out of the summary, and is listed with ``reason`` in the files and the markdown table.

        Raises:
            ValueError: when the case is already in the report, or its id is reserved.
        """
        case_id = str(case_id)
        if case_id in _SUMMARY_ROWS:
            raise ValueError(f"case id {case_id!r} is reserved for the summary rows of the CSV.")
        if case_id in self:
            raise ValueError(f"case {case_id!r} is already in the report.")
        self._failed[case_id] = str(reason)

    def summary(self) -> dict[str, dict[str, float | int]]:
        """
        Per metric: ``mean`` and ``std`` of the finite values, ``count`` (number of finite values) and
        ``nan_count`` (cases where the metric is NaN, e.g. distances with exactly one empty mask; cases without
        the metric at all, e.g. ``*_mm`` without spacing, are in neither count).
        """
        return {k: _finite_stats((r[k] for r in self._rows if k in r), self.ddof) for k in self.metric_keys}

    def _csv_text(self) -> str:
        columns = self.columns + ([FAILED] if self._failed else [])
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for r in self._rows:
            writer.writerow([_fmt(r.get(c)) for c in columns])
        for case_id, reason in self._failed.items():
            writer.writerow([case_id] + [""] * (len(columns) - 2) + [reason])
        summary = self.summary()
        for stat in _SUMMARY_ROWS:
            writer.writerow([stat] + [_fmt(summary[c][stat]) if c in summary else "" for c in columns[1:]])
        return buf.getvalue()

    def to_dict(self) -> dict[str, Any]:
        """
        ``{"cases": rows, "summary": summary()}`` with NaN as ``None`` (strict JSON), and ``"failed": [{"case_id":
        ..., "failed": reason}]`` when some cases could not be evaluated.
        """
        failed = [{CASE_ID: c, FAILED: r} for c, r in self._failed.items()]
        return _json_safe({"cases": self.rows, **({"failed": failed} if failed else {}), "summary": self.summary()})

    def write(self, out_dir: str | os.PathLike, prefix: str = "metrics") -> dict[str, Path]:
        """
        Write ``<prefix>.csv`` (one row per case, then one per failed case with empty metrics and the reason in a
        last ``failed`` column, then ``mean`` and ``std`` rows of the evaluated cases; NaN as ``nan``) and
        ``<prefix>.json`` (:py:meth:`to_dict`, NaN as ``null``), each atomically.

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
        for entry in data.get("failed", []):
            report.add_failure(entry[CASE_ID], entry[FAILED])
        return report

    def to_markdown(self, columns: Sequence[str] | None = None, digits: int = 4) -> str:
        """
        A markdown table of the summary: one line per metric with ``mean ± std`` and the number of cases it is
        computed from; under it, the cases that failed, if any.

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
            lines.append(f"| {k} | {plus_minus(s['mean'], s['std'], digits)} | {n} |")
        text = "\n".join(lines) + "\n"
        if self._failed:
            text += f"\n{len(self._failed)} case(s) failed and are not in the table: {', '.join(self._failed)}.\n"
        return text


def compare_markdown(reports: Mapping[str, SegmentationReport], digits: int = 2, unit: str = "voxel") -> str:
    """
    A markdown table comparing methods: one row per report with Dice (%), Jaccard (%), 95HD and ASD as
    ``mean ± std``. Cases with NaN distances (exactly one empty mask) are excluded from the distance columns; a
    note under the table says how many. Failed cases (:py:meth:`SegmentationReport.add_failure`) are in no column; a
    note names them.

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
    notes, failed = [], []
    for name, report in reports.items():
        summary = report.summary()
        missing = [k for k, _, _ in cols if k not in summary]
        if missing:
            raise ValueError(f"report {name!r} has no {missing} (no cases, or no spacing for 'mm').")
        cells = [plus_minus(summary[k]["mean"], summary[k]["std"], digits, scale) for k, _, scale in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        n_nan = max(summary[k]["nan_count"] for k, _, _ in cols)
        if n_nan:
            notes.append(f"{name}: {n_nan} of {len(report)} case(s) with an empty prediction or label")
        if report.failed:
            failed.append(f"{name}: {', '.join(report.failed)}")
    text = "\n".join(lines) + "\n"
    if notes:
        text += "\nDistances exclude cases where they are undefined (" + "; ".join(notes) + ").\n"
    if failed:
        text += "\nFailed cases, in no column (" + "; ".join(failed) + ").\n"
    return text


def case_id_from_path(name: str) -> str:
    """The file name of ``name`` without its image extension (``/d/la_003.nii.gz`` -> ``la_003``)."""
    base = os.path.basename(str(name))
    for ext in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".npy", ".npz", ".png", ".h5", ".gz"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
