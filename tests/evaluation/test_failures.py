"""Inference and evaluation that keep going: a case that fails to load, predict or write is skipped and named, its
stale output removed, the report lists it, the metrics cover the others, and the command line exits with status 3."""

from __future__ import annotations

import csv
import errno
import json
import logging
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, LoadImaged, SaveImaged

from monai_mlbseg.data import AtomicNibabelWriter
from monai_mlbseg.evaluation import (
    FailedCasesHandler,
    KeepGoingDataset,
    SegmentationReport,
    SegmentationReportHandler,
    compare_markdown,
    failure_reason,
)
from monai_mlbseg.utils.errors import CASES_FAILED_STATUS, CasesFailed, Problem

SHAPE = (8, 8, 4)


class Net(torch.nn.Module):
    """Passes the image on as the prediction; fails on a huge intensity (a volume too large to predict) or a
    negative one (a full disk)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.max() > 100:
            raise RuntimeError("out of memory: tried to allocate 80 GiB")
        if x.min() < 0:
            raise OSError(errno.ENOSPC, "No space left on device", "/scratch/buffer")
        return x


def mask(i: int) -> np.ndarray:
    m = np.zeros(SHAPE, np.float32)
    m[1 + i % 3 : 6, 2:7, 1:3] = 1
    return m


def make_cases(tmp_path, scales: dict[str, float]) -> list[dict]:
    """One image (``scale`` x its label) and label per case; a case with scale 0 has no image file (it was deleted
    after the check)."""
    data = tmp_path / "data"
    data.mkdir()
    items = []
    for i, (case_id, scale) in enumerate(scales.items()):
        image, label = data / f"{case_id}.nii.gz", data / f"{case_id}_label.nii.gz"
        nib.save(nib.Nifti1Image(mask(i), np.eye(4)), label)
        if scale:
            nib.save(nib.Nifti1Image(scale * mask(i), np.eye(4)), image)
        items.append({"case_id": case_id, "image": str(image), "label": str(label)})
    return items


def evaluate(tmp_path, items):
    """A MONAI evaluator with the two keep-going parts, a mask writer, MONAI's mean Dice and the report handler."""
    load = Compose([LoadImaged(["image", "label"]), EnsureChannelFirstd(["image", "label"])])
    saver = SaveImaged("pred", output_dir=tmp_path / "eval", output_postfix="seg", separate_folder=False,
                       data_root_dir=tmp_path / "data", writer=AtomicNibabelWriter)  # fmt: skip
    failures = FailedCasesHandler(saver=saver)
    report = SegmentationReportHandler(output_dir=tmp_path / "eval", use_spacing=False)
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(KeepGoingDataset(items, load), batch_size=1),
        network=Net(),
        postprocessing=Compose([AsDiscreted("pred", threshold=0.5), saver]),
        key_val_metric={"dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
        iteration_update=failures,
        val_handlers=[failures, report],
    )
    return evaluator, failures


def stale_mask(tmp_path, case_id: str):
    path = tmp_path / "eval" / f"{case_id}_seg.nii.gz"
    path.parent.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), path)
    return path


@pytest.mark.parametrize("debug", [False, True])
def test_cases_that_fail_to_load_or_predict_are_skipped_named_and_their_stale_masks_removed(
    debug, tmp_path, caplog, monkeypatch
):
    monkeypatch.setenv("MLBSEG_DEBUG", "1" if debug else "0")
    items = make_cases(tmp_path, {"a": 1.0, "gone": 0, "huge": 1000.0, "d": 1.0})
    stale = {c: stale_mask(tmp_path, c) for c in ("a", "gone", "huge")}
    evaluator, failures = evaluate(tmp_path, items)
    with caplog.at_level(logging.INFO):
        evaluator.run()

    assert [(c.case_id, c.file) for c in failures.failed] == [("gone", items[1]["image"]), ("huge", items[2]["image"])]
    assert "No such file" in failures.failed[0].reason and "out of memory" in failures.failed[1].reason
    assert not stale["gone"].exists() and not stale["huge"].exists(), "no earlier mask looks like this run's"
    for i, case_id in ((0, "a"), (3, "d")):
        written = np.asarray(nib.load(tmp_path / "eval" / f"{case_id}_seg.nii.gz").dataobj)
        assert np.array_equal(written, mask(i)), "the other cases are written (the stale mask of a is replaced)"
    assert evaluator.state.metrics["dice"] == pytest.approx(1.0)

    errors = [r for r in caplog.records if r.levelno == logging.ERROR and r.name == "monai_mlbseg.evaluation"]
    said = [r.getMessage() for r in errors if "skipped, the run goes on" in r.getMessage()]
    assert len(said) == 2 and said[0].startswith(f"{items[1]['image']}: ") and "out of memory" in said[1]
    assert f"its earlier output {stale['huge']} removed" in said[1]
    assert (errors[-1].exc_info is not None) == debug, "the traceback only with MLBSEG_DEBUG=1"

    with open(tmp_path / "eval" / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["a", "d", "gone", "huge", "mean", "std"]
    assert table[0]["failed"] == "" and float(table[0]["dice"]) == 1.0
    assert table[2]["dice"] == "" and table[2]["failed"].startswith(items[1]["image"])
    failed = json.loads((tmp_path / "eval" / "metrics.json").read_text())["failed"]
    assert [f["case_id"] for f in failed] == ["gone", "huge"] and "out of memory" in failed[1]["failed"]

    with pytest.raises(CasesFailed) as raised:
        failures.raise_failures()
    message = str(raised.value)
    assert message.startswith("2 of 4 cases failed (the other 2 are done):\n")
    assert message.splitlines()[1:] == [f"  - {failures.failed[0]}", f"  - {failures.failed[1]}"]

    evaluator.run()  # a second run starts a new list
    assert len(failures.failed) == 2 and failures.total == 4


def test_a_run_in_which_every_case_fails_ends_with_its_report(tmp_path):
    items = make_cases(tmp_path, {"gone": 0, "huge": 1000.0})
    evaluator, failures = evaluate(tmp_path, items)
    evaluator.run()  # MONAI's mean Dice has no case to compute: it is not asked to
    assert "dice" not in evaluator.state.metrics
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["cases"] == [] and [f["case_id"] for f in report["failed"]] == ["gone", "huge"]
    with pytest.raises(CasesFailed, match=r"^2 of 2 cases failed:\n"):
        failures.raise_failures()


def test_a_full_disk_still_stops_the_run(tmp_path):
    items = make_cases(tmp_path, {"a": 1.0, "full": -1.0, "c": 1.0})
    evaluator, failures = evaluate(tmp_path, items)
    with pytest.raises(OSError) as raised:
        evaluator.run()
    assert raised.value.errno == errno.ENOSPC and failures.failed == []
    assert not (tmp_path / "eval" / "c_seg.nii.gz").exists(), "every later case would fail the same way"


def test_a_run_that_stops_part_way_leaves_no_earlier_report(tmp_path):
    items = make_cases(tmp_path, {"a": 1.0, "full": -1.0})
    (tmp_path / "eval").mkdir()
    for name in ("metrics.csv", "metrics.json"):
        (tmp_path / "eval" / name).write_text("case_id,dice\nold_case,0.99\n")
    evaluator, _ = evaluate(tmp_path, items)
    with pytest.raises(OSError):
        evaluator.run()
    assert not (tmp_path / "eval" / "metrics.csv").exists() and not (tmp_path / "eval" / "metrics.json").exists()


def test_the_report_lists_failed_cases_apart_from_the_metrics(tmp_path):
    report = SegmentationReport()
    report.add("a", np.ones((4, 4)), np.ones((4, 4)))
    report.add_failure("b", "/d/b.nii.gz: truncated")
    assert len(report) == 1 and "b" in report and report.failed == {"b": "/d/b.nii.gz: truncated"}
    assert report.summary()["dice"]["count"] == 1
    with pytest.raises(ValueError, match="already"):
        report.add("b", np.ones((4, 4)), np.ones((4, 4)))
    with pytest.raises(ValueError, match="already"):
        report.add_failure("a", "x")
    with pytest.raises(ValueError, match="reserved"):
        report.add_failure("mean", "x")

    paths = report.write(tmp_path)
    lines = paths["csv"].read_text().splitlines()
    assert lines[0].endswith(",failed") and lines[2] == "b,,,,,/d/b.nii.gz: truncated" and lines[3].startswith("mean,")
    again = SegmentationReport.from_json(paths["json"])
    assert again.failed == report.failed and json.dumps(again.to_dict()) == json.dumps(report.to_dict())
    assert "1 case(s) failed and are not in the table: b." in report.to_markdown()
    table = compare_markdown({"m": report}, unit="voxel")
    assert "Failed cases, in no column (m: b)" in table


@pytest.mark.parametrize(
    "error,reason",
    [
        (RuntimeError("applying transform LoadImaged"), "applying transform LoadImaged"),
        (ValueError("/d/x.h5: cannot read dataset 'image'."), "cannot read dataset 'image'."),
        (RuntimeError("cannot find a suitable reader for /d/x.h5.\n  tried: A\n\n  OSError: truncated\n"),
         "cannot find a suitable reader for /d/x.h5. ... OSError: truncated"),
    ],
)  # fmt: skip
def test_failure_reason_is_the_innermost_error_in_one_line(error, reason):
    try:
        try:
            raise error
        except Exception as e:
            raise RuntimeError("applying transform <Compose>") from e
    except RuntimeError as wrapped:
        assert failure_reason(wrapped, "/d/x.h5") == reason


def test_the_command_line_ends_with_the_failed_cases_and_status_3():
    problems = [Problem("/data/b.h5", "truncated file"), Problem("/data/d.h5", "no such file")]
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from monai_mlbseg.utils import exit_on_input_error, Problem\n"
        "from monai_mlbseg.utils.errors import CasesFailed\n"
        "exit_on_input_error()\n"
        "try:\n"
        f"    raise CasesFailed({problems!r}, total=5)\n"
        "except CasesFailed as e:\n"
        "    raise RuntimeError('Failed to evaluate') from e\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == CASES_FAILED_STATUS == 3
    assert result.stderr.rstrip().endswith(
        "ERROR:monai_mlbseg:2 of 5 cases failed (the other 3 are done):\n"
        "  - /data/b.h5: truncated file\n  - /data/d.h5: no such file"
    )
    assert "Traceback" not in result.stderr
