"""
An Ignite handler that fills a :py:class:`~monai_mlbseg.evaluation.SegmentationReport` from a MONAI evaluator.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.utils import convert_to_tensor

from .failures import FAILED_CASES, FailedCase
from .metrics import spacing_from_affine
from .report import CASE_ID, SegmentationReport, case_id_from_path, plus_minus

__all__ = ["SegmentationReportHandler"]


def _foreground(x: torch.Tensor, name: str) -> torch.Tensor:
    """Channel-first ``[C, *S]`` -> ``[*S]`` foreground probability / mask (C == 1, or C == 2: channel 1)."""
    if x.ndim < 3:
        raise ValueError(f"{name} must be channel-first [C, *S], got shape {tuple(x.shape)}.")
    if x.shape[0] == 1:
        return x[0]
    if x.shape[0] == 2:
        return x[1]
    raise ValueError(f"{name} must have 1 channel (or 2, background/foreground), got shape {tuple(x.shape)}.")


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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

    At ``STARTED`` the report is reset, so a validator run at every epoch reports its last run, and rank 0 removes
    the report files of an earlier run from ``output_dir``, so that a run that stops part-way leaves no report that
    looks like its own. At ``COMPLETED`` the rows of all ranks are gathered (under ``torch.distributed``), with the
    cases that failed mid-run (``engine.state.failed_cases``, kept by
    :py:class:`~monai_mlbseg.evaluation.FailedCasesHandler`), which the report lists with their reason
    (:py:meth:`SegmentationReport.add_failure`), and rank 0 writes ``<prefix>.csv`` / ``<prefix>.json`` to
    ``output_dir`` (when given, each atomically) and logs the summary.

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
        case_id_key: str = CASE_ID,
        use_spacing: bool = True,
        name: str | None = None,
    ) -> None:
        self.output_dir = None if output_dir is None else Path(output_dir)
        self.prefix = prefix
        self.pred_key = pred_key
        self.label_key = label_key
        self.case_id_key = case_id_key
        self.use_spacing = use_spacing
        self.logger = logging.getLogger(name or "monai_mlbseg.evaluation")
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
        """Start a new report; at the start of a run (``engine`` given), remove the report files of an earlier one."""
        self.report = SegmentationReport()
        self.written = {}
        self._seen = 0
        if engine is not None and self.output_dir is not None and _rank() == 0:
            for ext in ("csv", "json"):
                (self.output_dir / f"{self.prefix}.{ext}").unlink(missing_ok=True)

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
                    return case_id_from_path(str(fname))
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

    def _gather(self, engine: Engine) -> tuple[list[dict[str, Any]], list[FailedCase]]:
        rows = self.report.rows
        failed: list[FailedCase] = list(getattr(engine.state, FAILED_CASES, None) or [])
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return rows, failed
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows, failed))
        return [r for g in gathered for r in g[0]], [c for g in gathered for c in g[1]]

    def completed(self, engine: Engine) -> None:
        """Gather all ranks' cases and failed cases; on rank 0 write the report and log its summary."""
        rows, failed = self._gather(engine)
        if _rank() != 0:
            return
        merged = SegmentationReport(ddof=self.report.ddof)
        for row in rows:
            if row[CASE_ID] not in merged:
                merged.add_row(row)
        for case in failed:
            if case.case_id not in merged:
                merged.add_failure(case.case_id, str(case))
        self.report = merged
        if self.output_dir is not None:
            self.written = merged.write(self.output_dir, self.prefix)
        summary = merged.summary()
        parts = [f"{k} {plus_minus(s['mean'], s['std'], 4)}" for k, s in summary.items()]
        missing = f"; {len(merged.failed)} failed, not in the means: {', '.join(merged.failed)}" if failed else ""
        where = f"; written to {self.written['csv']}" if self.written else ""
        self.logger.info(
            f"segmentation report ({len(merged)} cases): {', '.join(parts) or 'no metric'}{missing}{where}"
        )
