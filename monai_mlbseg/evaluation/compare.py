"""Comparisons of two segmentation results: in words (the mean metrics' changes) and by slice (where masks differ)."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from .report import SegmentationReport

__all__ = ["PROSE_METRICS", "compare_in_words", "most_different_slices"]


def most_different_slices(
    first: Mapping[str, Any],
    second: Mapping[str, Any],
    count: int = 4,
    per_case: int | None = None,
    labels: Mapping[str, Any] | None = None,
) -> list[tuple[str, int, int]]:
    """
    The slices (along the last axis) where two methods' predicted masks of the same volumes disagree most: the
    largest numbers of pixels that one predicts as foreground and the other not. For figures that show where the
    methods differ rather than slices that every method gets right.

    Args:
        first: case id -> predicted mask ``[..., D]`` (or probabilities: ``>= 0.5`` is foreground), e.g. the
            control's.
        second: the same cases' masks of the other method, each of the same shape.
        count: the number of slices to pick (fewer when the volumes have fewer slices).
        per_case: at most this many slices of one volume (default ``ceil(count / number of volumes)``: from distinct
            volumes when there are enough).
        labels: optional ground-truth masks of the same cases, only to break ties.

    Returns:
        ``[(case_id, z, differing_pixels)]``, most differing first; ties go to the slice with more foreground in
        either mask, then more ground-truth foreground (with ``labels``), then to the earlier case of ``first`` and
        the lower ``z``.

    Raises:
        ValueError: for no cases, other cases in ``second`` (or ``labels``), masks of different shapes, or ``count``
            / ``per_case`` below 1.

    Example::

        most_different_slices({"a": control_mask}, {"a": method_mask}, count=2)  # [("a", 12, 310), ("a", 13, 275)]
    """
    if not first:
        raise ValueError("most_different_slices needs at least one case.")
    for other in (second, labels if labels is not None else second):
        if set(first) != set(other):
            raise ValueError(f"the sets of masks have different cases: {sorted(set(first) ^ set(other))}.")
    if count < 1 or (per_case is not None and per_case < 1):
        raise ValueError(f"count and per_case must be >= 1, got {count} and {per_case}.")
    cap = per_case if per_case is not None else math.ceil(count / len(first))
    candidates = []
    for order, case in enumerate(first):
        a, b = (np.asarray(masks[case]) >= 0.5 for masks in (first, second))
        g = np.asarray(labels[case]) >= 0.5 if labels is not None else np.zeros_like(a)
        if a.shape != b.shape or a.shape != g.shape or a.ndim < 1:
            raise ValueError(f"case {case!r}: masks of shapes {a.shape}, {b.shape} and {g.shape}.")
        axes = tuple(range(a.ndim - 1))
        differ, union, truth = (a != b).sum(axis=axes), (a | b).sum(axis=axes), g.sum(axis=axes)
        candidates += [(-int(differ[z]), -int(union[z]), -int(truth[z]), order, z, case) for z in range(a.shape[-1])]
    chosen: list[tuple[str, int, int]] = []
    taken: Counter = Counter()
    for differ, *_, z, case in sorted(candidates, key=lambda c: c[:5]):
        if taken[case] < cap:
            chosen.append((str(case), z, -differ))
            taken[case] += 1
            if len(chosen) == count:
                break
    return chosen


#: the metrics the report's prose compares: key, name, unit, scale, whether higher is better
PROSE_METRICS = (
    ("dice", "Dice", "%", 100.0, True),
    ("hd95_voxel", "95HD", "voxels", 1.0, False),
    ("asd_voxel", "ASD", "voxels", 1.0, False),
)


def _metric_change(key: str, before: SegmentationReport, after: SegmentationReport) -> tuple[str, int]:
    """
    One clause saying how the mean test ``key`` (of :py:data:`PROSE_METRICS`) changed from ``before`` to ``after``,
    and its direction: 1 better, -1 worse, 0 unchanged at the shown precision or undefined.
    """
    _, name, unit, scale, higher_is_better = next(m for m in PROSE_METRICS if m[0] == key)
    a, b = (report.summary()[key]["mean"] * scale for report in (before, after))
    if not (math.isfinite(a) and math.isfinite(b)):
        return f"{name} cannot be compared (every test case of one of the two has an empty prediction or label)", 0
    digits = 1 if unit == "%" else 2
    shown = (lambda v: f"{v:.1f}%") if unit == "%" else (lambda v: f"{v:.{digits}f} {unit}")
    if round(a, digits) == round(b, digits):
        return f"{name} did not change ({shown(b)})", 0
    better = (b > a) == higher_is_better
    if unit == "%":
        return f"{name} {'rose' if b > a else 'fell'} by {abs(b - a):.1f} points ({shown(a)} -> {shown(b)})", (
            1 if better else -1
        )
    return f"{name} {'improved' if better else 'got worse'}, from {a:.2f} to {b:.2f} {unit}", 1 if better else -1


def compare_in_words(before: SegmentationReport, after: SegmentationReport) -> str:
    """
    How the mean test Dice, 95HD and ASD (voxels) changed from ``before`` to ``after``, in one clause each, with
    their signs honestly worded: a distance that grew "got worse", and one that disagrees with Dice is introduced by
    "but".

    Args:
        before: the report compared against (e.g. the control's).
        after: the report of the method.

    Returns:
        e.g. ``"Dice rose by 1.0 points (77.1% -> 78.1%), but 95HD got worse, from 4.10 to 5.20 voxels, and ASD
        improved, from 1.30 to 1.20 voxels"``.
    """
    clauses = [_metric_change(key, before, after) for key, *_ in PROSE_METRICS]
    compared = any("cannot be compared" not in text for text, _ in clauses[1:])
    lead, texts, contrasted = clauses[0][1], [clauses[0][0]], False
    for text, sign in clauses[1:]:
        if lead and sign and sign != lead and not contrasted:
            text, contrasted = f"but {text}", True
        texts.append(text)
    text = ", ".join(texts[:-1]) + f", and {texts[-1]}"
    if compared and any(report.summary()[k]["nan_count"] for report in (before, after) for k, *_ in PROSE_METRICS[1:]):
        text += " (the distances leave out the cases where one mask is empty: see the note under the table)"
    return text
