"""
Evaluation of saved prediction files against label files, for a command line.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_tensor

from .metrics import spacing_from_affine
from .report import SegmentationReport, case_id_from_path

__all__ = ["evaluate_files"]


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
    ids = [case_id_from_path(f.name) for f in label_files] if case_ids is None else [str(c) for c in case_ids]
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
