"""
Inference and evaluation that keep going past a volume that fails mid-run.

A volume that passed the up-front check (:py:func:`monai_mlbseg.data.validate_inputs`) can still fail when the run
reaches it: deleted or damaged in between, or too large to predict, or its mask cannot be written. Two parts make a
MONAI evaluator go on with the other volumes and say at the end which ones failed:

- :py:class:`KeepGoingDataset`, a MONAI :py:class:`~monai.data.Dataset` whose item that fails to load comes back as
  a marker (``{FAILED_KEY: FailedCase}``) instead of raising in the data loader, which would end the run;
- :py:class:`FailedCasesHandler`, the evaluator's ``iteration_update`` and one of its handlers: it skips a marked
  batch, catches an error while a batch is predicted or its outputs written, logs each failed case at ERROR (file and
  reason, no traceback unless ``MLBSEG_DEBUG=1``), removes the output an earlier run wrote for it, keeps the list in
  ``engine.state`` (:py:data:`FAILED_CASES`, which :py:class:`~monai_mlbseg.evaluation.SegmentationReportHandler`
  writes into its report), and raises :py:class:`~monai_mlbseg.utils.errors.CasesFailed` when asked at the end.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from ignite.engine import Engine, Events
from monai.data import Dataset, MetaTensor
from monai.transforms import SaveImage, SaveImaged
from monai.utils import CommonKeys, ImageMetaKey, ensure_tuple

from monai_mlbseg.utils.errors import CasesFailed, Problem, debugging, environment_problem

from .report import CASE_ID, case_id_from_path

__all__ = ["FAILED_CASES", "FAILED_KEY", "FailedCase", "FailedCasesHandler", "KeepGoingDataset", "failure_reason"]

#: the key of the marker that :py:class:`KeepGoingDataset` returns for an item that failed to load.
FAILED_KEY = "mlbseg_failed"
#: the ``engine.state`` attribute holding the run's failed cases (a list of :py:class:`FailedCase`).
FAILED_CASES = "failed_cases"

_LOGGER = "monai_mlbseg.evaluation"


def _empty_output() -> dict[str, list]:
    """The output of a failed iteration: MONAI's evaluator output keys, each with no item."""
    return {CommonKeys.IMAGE: [], CommonKeys.LABEL: [], CommonKeys.PRED: []}


class FailedCase(NamedTuple):
    """
    A case that failed mid-run.

    Attributes:
        case_id: the case id (the item's ``case_id``, else the file name without extension).
        file: the case's image file.
        reason: what went wrong, in the words of the error.
    """

    case_id: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


def failure_reason(error: BaseException, file: str | os.PathLike | None = None) -> str:
    """
    What went wrong, in one line: the message of the innermost error along the chain of causes (MONAI wraps an error
    of a transform in ``RuntimeError("applying transform ...")``), without a leading ``"<file>: "``; for a message of
    several lines (a reader's or writer's list of attempts), its first and last lines.

    Args:
        error: the error.
        file: the file the error is about, left out of the reason.

    Example::

        try:
            LoadImaged("image")({"image": "gone.nii.gz"})
        except RuntimeError as e:  # "applying transform <LoadImaged ...>", caused by a FileNotFoundError
            failure_reason(e, "gone.nii.gz")  # "[Errno 2] No such file or directory: 'gone.nii.gz'"
    """
    chain: list[BaseException] = []
    link: BaseException | None = error
    while link is not None and all(link is not e for e in chain):
        chain.append(link)
        link = link.__cause__ or link.__context__
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()] or [type(chain[-1]).__name__]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    prefix = f"{file}: "
    return text[len(prefix) :] if file is not None and text.startswith(prefix) else text


class KeepGoingDataset(Dataset):
    """
    MONAI's :py:class:`~monai.data.Dataset` that does not end the run when an item fails to load: the item comes back
    as ``{FAILED_KEY: FailedCase(case_id, file, reason)}`` (the file being the item's ``image_key`` entry), which the
    data loader's default collation turns into a batch that :py:class:`FailedCasesHandler` skips and reports. The
    error is caught in the data loader's worker; with ``MLBSEG_DEBUG=1`` its traceback is logged there.

    A batch cannot mix a failed item and loaded ones (their keys differ): use ``batch_size=1``, as whole volumes of
    different shapes need anyway.

    Args:
        data: the items, e.g. ``[{"image": path, "label": path}]``.
        transform: the loading transforms.
        image_key: the key of the image file in the items.
        case_id_key: the key of the case id in the items (else the image file's name without extension is used).

    Example::

        dataset = KeepGoingDataset([{"image": p} for p in files], load_volume_transforms("msd_heart", keys=["image"]))
        loader = DataLoader(dataset, batch_size=1)
    """

    def __init__(
        self,
        data: Sequence,
        transform: Callable | None = None,
        image_key: str = "image",
        case_id_key: str = CASE_ID,
    ) -> None:
        super().__init__(data, transform)
        self.image_key = image_key
        self.case_id_key = case_id_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as error:
            item = self.data[index]
            fields = item if isinstance(item, Mapping) else {self.image_key: item}
            file = str(fields.get(self.image_key, f"item {index}"))
            case_id = str(fields.get(self.case_id_key, case_id_from_path(file)))
            if debugging():
                logging.getLogger(_LOGGER).exception(f"{file}: loading failed")
            return {FAILED_KEY: FailedCase(case_id, file, failure_reason(error, file))}


class FailedCasesHandler:
    """
    The ``iteration_update`` and a handler of a MONAI evaluator (:py:class:`~monai.engines.SupervisedEvaluator`)
    that goes on past failed cases. Give it as both, and call :py:meth:`raise_failures` after the run:

    - a batch that :py:class:`KeepGoingDataset` marked as failed to load is not processed;
    - an error while a batch is predicted or post-processed (its masks written) is caught; an error of the run's
      environment (:py:func:`~monai_mlbseg.utils.errors.environment_problem`: a full disk, an unwritable folder)
      is not, since every later case would fail the same way;
    - each failed case is logged at ERROR (its file and the reason; the traceback too with ``MLBSEG_DEBUG=1``), its
      output from an earlier run (the file ``saver`` would have written) is removed, so that the output folder holds
      no mask that looks like this run's, and it is added to :py:attr:`failed`, which is also
      ``engine.state.failed_cases`` (:py:data:`FAILED_CASES`) for other handlers, e.g.
      :py:class:`~monai_mlbseg.evaluation.SegmentationReportHandler`;
    - the output of a failed iteration is an empty batch (``{"image": [], "label": [], "pred": []}``), which MONAI's
      metric handlers (``from_engine`` output transforms) and the report handler skip; when every case of the epoch
      failed, the engine is terminated after its last iteration, which skips ``EPOCH_COMPLETED`` (whose metric
      handlers have nothing to compute) but not ``COMPLETED``.

    The list and the count of cases start anew at every run (``STARTED``).

    Args:
        saver: the evaluator's ``SaveImage`` / ``SaveImaged`` post-processing transform, whose earlier output for a
            failed case is removed; ``None``: nothing is removed.
        image_key: the key of the image in the batches (its metadata name the files).
        case_id_key: the key of the case ids in the batches (else the file names without extension are used).
        name: logger name (default: ``monai_mlbseg.evaluation``).

    Example::

        failures = FailedCasesHandler(saver=save)
        evaluator = SupervisedEvaluator(device, DataLoader(KeepGoingDataset(items, load), batch_size=1), net,
                                        postprocessing=Compose([..., save]), iteration_update=failures,
                                        val_handlers=[failures])
        evaluator.run()
        failures.raise_failures()  # CasesFailed: "1 of 3 cases failed (the other 2 are done): ..."
    """

    def __init__(
        self,
        saver: SaveImage | SaveImaged | None = None,
        image_key: str = "image",
        case_id_key: str = CASE_ID,
        name: str | None = None,
    ) -> None:
        self.saver = saver
        self.image_key = image_key
        self.case_id_key = case_id_key
        self.logger = logging.getLogger(name or _LOGGER)
        #: the failed cases of the last run.
        self.failed: list[FailedCase] = []
        #: the number of cases of the last run, failed ones included.
        self.total = 0

    def attach(self, engine: Engine) -> None:
        """Register the handler's events on ``engine``."""
        engine.add_event_handler(Events.STARTED, self.reset)

    def reset(self, engine: Engine) -> None:
        """Start a new list of failed cases, shared with ``engine.state``."""
        self.failed = []
        self.total = 0
        setattr(engine.state, FAILED_CASES, self.failed)

    def __call__(self, engine: Engine, batch: Any) -> Any:
        """
        Process ``batch`` with the evaluator's own iteration, unless it failed to load or fails now.

        Returns:
            the iteration's output; an empty batch for a failed batch.
        """
        if isinstance(batch, Mapping) and FAILED_KEY in batch:
            failed = [FailedCase(*(str(v) for v in values)) for values in zip(*batch[FAILED_KEY])]
            return self._skip(engine, failed)
        files = self._files(batch)
        try:  # MONAI's own iteration, the one the evaluator runs without an ``iteration_update``
            output = engine._iteration(engine, batch)  # type: ignore[attr-defined]
        except Exception as error:
            if environment_problem(error) is not None:
                raise
            ids = batch.get(self.case_id_key) if isinstance(batch, Mapping) else None
            ids = [str(i) for i in ensure_tuple(ids)] if ids is not None else [case_id_from_path(f) for f in files]
            return self._skip(engine, [FailedCase(c, f, failure_reason(error, f)) for c, f in zip(ids, files)], error)
        self.total += len(files)
        return output

    def _skip(self, engine: Engine, cases: list[FailedCase], error: BaseException | None = None) -> dict[str, list]:
        """Record ``cases`` as failed; end the epoch's data early when all its cases failed. Returns the output."""
        self.total += len(cases)
        for case in cases:
            self._fail(case, error)
        state = engine.state
        if len(self.failed) == self.total and state.epoch_length and state.iteration % state.epoch_length == 0:
            # every case failed: no metric handler has a value to compute at EPOCH_COMPLETED; terminating skips it,
            # and COMPLETED still comes (the report lists the failed cases)
            engine.terminate()
        return _empty_output()

    def _files(self, batch: Any) -> list[str]:
        """The image files of ``batch`` (from the image's metadata), else one made-up name."""
        image = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        names = image.meta.get(ImageMetaKey.FILENAME_OR_OBJ) if isinstance(image, MetaTensor) else None
        return [str(n) for n in ensure_tuple(names)] if names is not None else [f"case_{self.total}"]

    def _fail(self, case: FailedCase, error: BaseException | None = None) -> None:
        self.failed.append(case)
        stale = self._output_of(case.file)
        removed = ""
        if stale is not None and stale.is_file():
            stale.unlink()
            removed = f"; its earlier output {stale} removed"
        self.logger.error(
            f"{case} (skipped, the run goes on{removed})", exc_info=error if error is not None and debugging() else None
        )

    def _output_of(self, file: str) -> Path | None:
        if self.saver is None:
            return None
        saver = self.saver.saver if isinstance(self.saver, SaveImaged) else self.saver
        layout = copy.copy(saver.folder_layout)
        if hasattr(layout, "makedirs"):
            layout.makedirs = False  # only where the file would be: no folder is created for it
        return Path(layout.filename(subject=file))

    def raise_failures(self) -> None:
        """
        Raise :py:class:`~monai_mlbseg.utils.errors.CasesFailed` listing the failed cases of the last run, if any.

        Raises:
            CasesFailed: when some cases failed; the bundles' command line then exits with status 3.
        """
        if self.failed:
            raise CasesFailed([Problem(c.file, c.reason) for c in self.failed], self.total)
