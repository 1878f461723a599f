"""
Evaluation of binary segmentations: per-case Dice, Jaccard, 95% Hausdorff distance and average symmetric surface
distance (in voxels and, given the voxel spacing, in millimetres; :py:mod:`.metrics`), a report that accumulates,
summarises and writes them (:py:mod:`.report`), an Ignite handler that fills a report from a MONAI evaluator
(:py:mod:`.handler`), the parts that make an inference or evaluation go on past a volume that fails mid-run
(:py:mod:`.failures`), the evaluation of saved files for a command line (:py:mod:`.files`), and comparisons of two
results in words and by slice (:py:mod:`.compare`).

The metric values come from MONAI (:py:class:`~monai.metrics.DiceMetric`, :py:class:`~monai.metrics.MeanIoU`,
:py:class:`~monai.metrics.HausdorffDistanceMetric` with ``percentile=95`` and
:py:class:`~monai.metrics.SurfaceDistanceMetric` with ``symmetric=True``); this module fixes the conventions MONAI
leaves open:

- **masks**: inputs are ``[*S]`` or ``[1, *S]`` (2D or 3D); anything ``>= 0.5`` is foreground, so binary masks,
  probabilities and label maps with foreground values ``>= 1`` (e.g. 255, or several structures to be merged) all
  work.
- **both masks empty**: Dice 1, Jaccard 1, distances 0 (a correct "nothing here"; MONAI's ``ignore_empty=False``
  convention). :py:func:`dice_score`, the Dice used for monitoring and figures, follows the same convention.
- **exactly one mask empty**: Dice 0, Jaccard 0, distances NaN (undefined; MONAI would give NaN or inf depending on
  the metric). NaNs are excluded from means and standard deviations and counted separately.
- **95HD** is MONAI's: the 95th percentile (linear interpolation) of the distances from the prediction's surface
  voxels to the label's surface, the same from the label to the prediction, and the larger of the two.
- **ASD** is MONAI's symmetric variant: the mean of *all* surface distances of both directions pooled (not the mean
  of the two directed means, which differs when the surfaces have different sizes).
- surface voxels are the foreground voxels with a background face neighbour (the image border counts as
  background).
"""

from .compare import PROSE_METRICS, compare_in_words, most_different_slices
from .failures import FAILED_CASES, FAILED_KEY, FailedCase, FailedCasesHandler, KeepGoingDataset, failure_reason
from .files import evaluate_files
from .handler import SegmentationReportHandler
from .metrics import METRIC_KEYS, case_metrics, dice_score, selection_auc, spacing_from_affine
from .report import SegmentationReport, compare_markdown

__all__ = [
    "FAILED_CASES",
    "FAILED_KEY",
    "FailedCase",
    "FailedCasesHandler",
    "KeepGoingDataset",
    "failure_reason",
    "METRIC_KEYS",
    "PROSE_METRICS",
    "compare_in_words",
    "most_different_slices",
    "SegmentationReport",
    "SegmentationReportHandler",
    "case_metrics",
    "compare_markdown",
    "dice_score",
    "selection_auc",
    "evaluate_files",
    "spacing_from_affine",
]
