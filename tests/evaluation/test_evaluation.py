"""Evaluation: metric values against independent numpy computations, edge cases, the report, the evaluator
handler and file-based evaluation."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.transforms import AsDiscreted

from monai_mlbseg.evaluation import (
    SegmentationReport,
    SegmentationReportHandler,
    case_metrics,
    compare_markdown,
    dice_score,
    evaluate_files,
    spacing_from_affine,
)
from monai_mlbseg.utils.io import TEMP_MARKER

# ----------------------------------------------------------------------------------------------------------------
# independent reference implementation (numpy only)


def np_surface(mask: np.ndarray) -> np.ndarray:
    """Coordinates of the foreground voxels with a background face neighbour (outside the image is background)."""
    m = np.pad(mask.astype(bool), 1)
    inner = m.copy()
    for axis in range(m.ndim):
        inner &= np.roll(m, 1, axis) & np.roll(m, -1, axis)
    edge = (m & ~inner)[tuple(slice(1, -1) for _ in range(m.ndim))]
    return np.argwhere(edge).astype(float)


def np_distances(pred: np.ndarray, label: np.ndarray, spacing=None) -> tuple[float, float]:
    """(95HD as the max of the two directed 95th percentiles, ASD as the mean of all pooled distances)."""
    sp = np.ones(pred.ndim) if spacing is None else np.asarray(spacing, dtype=float)
    a, b = np_surface(pred) * sp, np_surface(label) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    d_ab, d_ba = d.min(1), d.min(0)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)), float(np.concatenate([d_ab, d_ba]).mean())


def np_overlap(pred: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    inter, p, g = np.logical_and(pred, label).sum(), pred.sum(), label.sum()
    return 2 * inter / (p + g), inter / (p + g - inter)


def blob(shape, seed: int, n: int = 3) -> np.ndarray:
    """Union of a few random boxes: a non-trivial but small mask."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=bool)
    for _ in range(n):
        lo = [rng.integers(0, s // 2) for s in shape]
        hi = [lo_ + rng.integers(2, s // 2) for lo_, s in zip(lo, shape)]
        mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ----------------------------------------------------------------------------------------------------------------
# case_metrics


@pytest.mark.parametrize("shape", [(24, 20), (12, 14, 10)])
def test_overlap_matches_counting(shape):
    rng = np.random.default_rng(1)
    for seed in range(3):
        prob = rng.random(shape)  # probabilities: thresholded at 0.5
        label = blob(shape, seed)
        m = case_metrics(torch.as_tensor(prob), label.astype(np.uint8))
        dice, jac = np_overlap(prob >= 0.5, label)
        assert m["dice"] == pytest.approx(dice, rel=1e-6)
        assert m["jaccard"] == pytest.approx(jac, rel=1e-6)
        assert set(m) == {"dice", "jaccard", "hd95_voxel", "asd_voxel"}


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_parallel_plates_known_distance(axis, k):
    # two one-voxel-thick plates k voxels apart: every voxel is a surface voxel, every distance is exactly k
    shape = (14, 14, 14)
    sl = [slice(3, 11)] * 3
    label, pred = np.zeros(shape, bool), np.zeros(shape, bool)
    sl[axis] = slice(4, 5)
    label[tuple(sl)] = True
    sl[axis] = slice(4 + k, 5 + k)
    pred[tuple(sl)] = True
    spacing = (2.0, 0.5, 0.7)
    m = case_metrics(pred, label, spacing=spacing)
    assert m["hd95_voxel"] == pytest.approx(k, rel=1e-5)
    assert m["asd_voxel"] == pytest.approx(k, rel=1e-5)
    assert m["hd95_mm"] == pytest.approx(k * spacing[axis], rel=1e-5)
    assert m["asd_mm"] == pytest.approx(k * spacing[axis], rel=1e-5)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0


@pytest.mark.parametrize("k", [1, 2, 4])
def test_concentric_squares_analytic(k):
    # label: square of half-width a; prediction: half-width a + k (same centre). Every label surface pixel is
    # exactly k from the prediction's surface; a prediction surface pixel (x, y) is
    # sqrt(max(|x|-a, 0)^2 + max(|y|-a, 0)^2) from the label square.
    a, c, size = 5, 16, 33
    yy, xx = np.mgrid[:size, :size] - c
    label = (np.abs(yy) <= a) & (np.abs(xx) <= a)
    pred = (np.abs(yy) <= a + k) & (np.abs(xx) <= a + k)
    ring = np.maximum(np.abs(yy), np.abs(xx)) == a + k
    d_pred = np.hypot(np.maximum(np.abs(yy[ring]) - a, 0), np.maximum(np.abs(xx[ring]) - a, 0))
    d_label = np.full(8 * a, float(k))
    hd95 = max(np.percentile(d_pred, 95), np.percentile(d_label, 95))
    asd = np.concatenate([d_pred, d_label]).mean()
    m = case_metrics(pred, label)
    assert m["hd95_voxel"] == pytest.approx(hd95, rel=1e-5)
    assert m["asd_voxel"] == pytest.approx(asd, rel=1e-5)
    assert m["dice"] == pytest.approx(2 * (2 * a + 1) ** 2 / ((2 * a + 1) ** 2 + (2 * a + 2 * k + 1) ** 2), rel=1e-6)


@pytest.mark.parametrize(
    "shape,spacing", [((20, 24), None), ((20, 24), (0.3, 1.7)), ((10, 12, 9), (1.0, 1.0, 2.5)), ((10, 12, 9), 0.8)]
)
def test_distances_match_bruteforce(shape, spacing):
    for seed in range(3):
        pred, label = blob(shape, seed), blob(shape, seed + 10)
        m = case_metrics(torch.as_tensor(pred)[None], torch.as_tensor(label)[None], spacing=spacing)
        hd, asd = np_distances(pred, label)
        assert m["hd95_voxel"] == pytest.approx(hd, rel=1e-5)
        assert m["asd_voxel"] == pytest.approx(asd, rel=1e-5)
        if spacing is not None:
            sp = np.broadcast_to(np.asarray(spacing, float), (len(shape),))
            hd_mm, asd_mm = np_distances(pred, label, sp)
            assert m["hd95_mm"] == pytest.approx(hd_mm, rel=1e-5)
            assert m["asd_mm"] == pytest.approx(asd_mm, rel=1e-5)


def test_border_touching_masks_match_bruteforce():
    # masks touching the low and high image borders (the border counts as background for the surface)
    pred = blob((14, 16, 12), 6) | np.flip(blob((14, 16, 12), 7))
    label = np.flip(blob((14, 16, 12), 8)) | blob((14, 16, 12), 9)
    pred[-1, :, -1], label[0, -1, :] = True, True
    m = case_metrics(pred, label, spacing=(1.0, 0.5, 2.0))
    hd, asd = np_distances(pred, label, (1.0, 0.5, 2.0))
    assert m["hd95_mm"] == pytest.approx(hd, rel=1e-5) and m["asd_mm"] == pytest.approx(asd, rel=1e-5)
    # the same masks inside a larger empty volume: identical values
    big_p, big_l = np.zeros((30, 30, 30), bool), np.zeros((30, 30, 30), bool)
    big_p[5:19, 7:23, 9:21], big_l[5:19, 7:23, 9:21] = pred, label
    big = case_metrics(big_p, big_l, spacing=(1.0, 0.5, 2.0))
    assert {k: big[k] for k in m} == pytest.approx(m, rel=1e-6)


def test_anisotropic_spacing_scales_only_its_axis():
    label = np.zeros((16, 16), bool)
    label[4:10, 4:12] = True
    pred = np.roll(label, 2, axis=0)  # shifted along axis 0 only
    iso = case_metrics(pred, label, spacing=(1.0, 1.0))
    stretched = case_metrics(pred, label, spacing=(3.0, 1.0))
    other = case_metrics(pred, label, spacing=(1.0, 3.0))
    assert iso["hd95_mm"] == pytest.approx(iso["hd95_voxel"])
    assert stretched["hd95_mm"] == pytest.approx(3 * iso["hd95_voxel"], rel=1e-5)
    assert stretched["hd95_voxel"] == iso["hd95_voxel"]
    assert other["hd95_mm"] == pytest.approx(iso["hd95_voxel"], rel=1e-5)  # no displacement along axis 1
    assert stretched["asd_mm"] > iso["asd_mm"]


def test_identical_masks():
    mask = blob((12, 12, 12), 3)
    m = case_metrics(mask, mask, spacing=(1, 2, 3))
    assert m == {"dice": 1.0, "jaccard": 1.0, "hd95_voxel": 0.0, "asd_voxel": 0.0, "hd95_mm": 0.0, "asd_mm": 0.0}


def test_empty_masks(recwarn):
    empty, full = np.zeros((8, 8, 8)), blob((8, 8, 8), 0).astype(float)
    both = case_metrics(empty, empty, spacing=(1, 1, 2))
    assert both == {"dice": 1.0, "jaccard": 1.0, "hd95_voxel": 0.0, "asd_voxel": 0.0, "hd95_mm": 0.0, "asd_mm": 0.0}
    for pred, label in ((empty, full), (full, empty)):
        m = case_metrics(pred, label, spacing=(1, 1, 2))
        assert m["dice"] == 0.0 and m["jaccard"] == 0.0
        for key in ("hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm"):
            assert math.isnan(m[key]), key  # NaN, never inf
    assert not [w for w in recwarn if "all 0" in str(w.message) or "always_return_as_numpy" in str(w.message)]


def test_input_layouts_agree():
    pred, label = blob((16, 18), 4), blob((16, 18), 5)
    ref = case_metrics(pred, label)
    for p, g in (
        (torch.as_tensor(pred), torch.as_tensor(label)),
        (pred[None].astype(np.float32), label[None].astype(np.int64) * 255),
        (MetaTensor(torch.as_tensor(pred)[None].float()), torch.as_tensor(label)),
    ):
        m = case_metrics(p, g)
        assert m.keys() == ref.keys()
        assert all(m[k] == pytest.approx(ref[k]) for k in ref)


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"\(8, 8\).*\(1, 8, 9\)"):
        case_metrics(np.zeros((8, 8)), np.zeros((1, 8, 9)))
    with pytest.raises(ValueError, match="2D or 3D"):
        case_metrics(np.zeros((2, 4, 4, 4)), np.zeros((2, 4, 4, 4)))
    with pytest.raises(ValueError, match="2D or 3D"):
        case_metrics(np.zeros(8), np.zeros(8))
    for bad in ((1.0, 1.0), (1.0, 0.0, 1.0), -1.0, "x"):
        with pytest.raises(ValueError, match="spacing"):
            case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), spacing=bad)


def test_spacing_from_affine():
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.6, 0.7, 2.5])
    assert spacing_from_affine(affine, 3) == pytest.approx([0.6, 0.7, 2.5])
    assert spacing_from_affine(torch.as_tensor(affine), 2) == pytest.approx([0.6, 0.7])
    with pytest.raises(ValueError):
        spacing_from_affine(np.eye(2), 3)


# ----------------------------------------------------------------------------------------------------------------
# SegmentationReport


def _filled_report() -> SegmentationReport:
    report = SegmentationReport()
    shape = (12, 12)
    report.add("a", blob(shape, 0), blob(shape, 0), spacing=(1.0, 2.0), fold=0)
    report.add("b", blob(shape, 1), blob(shape, 2), spacing=(1.0, 2.0), fold=1)
    report.add("c", np.zeros(shape), blob(shape, 3), spacing=(1.0, 2.0), fold=1)  # NaN distances
    return report


def test_report_rows_and_summary():
    report = _filled_report()
    rows = report.rows
    assert [r["case_id"] for r in rows] == ["a", "b", "c"] and len(report) == 3 and "b" in report
    assert report.columns == ["case_id", "dice", "jaccard", "hd95_voxel", "asd_voxel", "hd95_mm", "asd_mm", "fold"]
    rows[0]["dice"] = -1.0  # rows are copies
    assert report.rows[0]["dice"] == 1.0
    s = report.summary()
    dice = [r["dice"] for r in report.rows]
    assert s["dice"]["mean"] == pytest.approx(np.mean(dice)) and s["dice"]["std"] == pytest.approx(np.std(dice))
    assert s["dice"]["count"] == 3 and s["dice"]["nan_count"] == 0
    hd = [r["hd95_voxel"] for r in report.rows[:2]]
    assert s["hd95_voxel"]["mean"] == pytest.approx(np.mean(hd)) and s["hd95_voxel"]["std"] == pytest.approx(np.std(hd))
    assert s["hd95_voxel"]["count"] == 2 and s["hd95_voxel"]["nan_count"] == 1
    assert SegmentationReport(ddof=1).summary() == {}


def test_report_rejects_bad_rows():
    report = _filled_report()
    with pytest.raises(ValueError, match="already"):
        report.add("a", np.zeros((4, 4)), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="clash"):
        report.add("d", np.zeros((4, 4)), np.zeros((4, 4)), dice=3)
    with pytest.raises(ValueError, match="reserved"):
        report.add("mean", np.zeros((4, 4)), np.zeros((4, 4)))
    assert len(report) == 3


def test_report_write_and_reload(tmp_path):
    report = _filled_report()
    paths = report.write(tmp_path / "out", prefix="test")
    assert paths == {"csv": tmp_path / "out" / "test.csv", "json": tmp_path / "out" / "test.json"}
    assert not [p for p in (tmp_path / "out").iterdir() if TEMP_MARKER in p.name]

    with open(paths["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["a", "b", "c", "mean", "std"]
    assert float(table[1]["dice"]) == pytest.approx(report.rows[1]["dice"])
    assert table[2]["hd95_voxel"] == "nan" and table[2]["fold"] == "1"
    assert float(table[3]["hd95_voxel"]) == pytest.approx(report.summary()["hd95_voxel"]["mean"])
    assert table[4]["fold"] == ""

    def no_nan(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    data = json.loads(paths["json"].read_text(), parse_constant=no_nan)
    assert set(data) == {"cases", "summary"} and len(data["cases"]) == 3
    assert data["cases"][2]["hd95_voxel"] is None
    assert data["summary"]["hd95_voxel"]["count"] == 2

    again = SegmentationReport.from_json(paths["json"])
    assert again.columns == report.columns
    assert math.isnan(again.rows[2]["hd95_voxel"])
    assert json.dumps(again.to_dict()) == json.dumps(report.to_dict())
    with pytest.raises(FileNotFoundError):
        SegmentationReport.from_json(tmp_path / "missing.json")


def test_markdown_tables():
    report = _filled_report()
    md = report.to_markdown(digits=3)
    s = report.summary()
    assert md.splitlines()[0].startswith("| metric |")
    assert f"| dice | {s['dice']['mean']:.3f} ± {s['dice']['std']:.3f} | 3 |" in md
    assert "| hd95_voxel |" in md and "(+1 NaN)" in md
    assert "dice" not in report.to_markdown(columns=["hd95_mm"])
    with pytest.raises(ValueError, match="unknown"):
        report.to_markdown(columns=["hd99"])

    other = SegmentationReport()
    other.add("a", blob((12, 12), 0), blob((12, 12), 0))
    table = compare_markdown({"labeled only (stage 1)": report, "MLB-Seg (stage 2)": other})
    lines = table.splitlines()
    assert lines[0] == "| Method | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) |"
    assert lines[2].startswith(f"| labeled only (stage 1) | {100 * s['dice']['mean']:.2f} ± ")
    assert lines[3] == "| MLB-Seg (stage 2) | 100.00 ± 0.00 | 100.00 ± 0.00 | 0.00 ± 0.00 | 0.00 ± 0.00 |"
    assert "1 of 3 case(s)" in table
    assert "95HD (mm)" in compare_markdown({"x": report}, unit="mm")
    with pytest.raises(ValueError, match="hd95_mm"):
        compare_markdown({"x": other}, unit="mm")
    with pytest.raises(ValueError):
        compare_markdown({})


# ----------------------------------------------------------------------------------------------------------------
# SegmentationReportHandler with a real SupervisedEvaluator


def _items(n: int, spacing=(1.5, 1.0, 2.0), with_id: bool = True) -> list[dict]:
    items = []
    affine = torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64))
    for i in range(n):
        label = torch.as_tensor(blob((10, 12, 8), i)).float()[None]
        prob = 0.8 * torch.as_tensor(blob((10, 12, 8), i + 20)).float()[None] + 0.1  # "probabilities"
        meta = {"filename_or_obj": f"/data/case{i:02d}.nii.gz"}
        item = {"image": MetaTensor(prob, affine=affine, meta=meta), "label": MetaTensor(label, affine=affine)}
        if with_id:
            item["case_id"] = f"id{i}"
        items.append(item)
    return items


def _evaluator(items, handler, postprocessing=True) -> SupervisedEvaluator:
    loader = DataLoader(Dataset(items), batch_size=2, num_workers=0)
    post = AsDiscreted(keys="pred", threshold=0.5) if postprocessing else None
    return SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=loader,
        network=torch.nn.Identity(),
        postprocessing=post,
        val_handlers=[handler],
    )


@pytest.mark.parametrize("postprocessing", [True, False])
def test_handler_with_supervised_evaluator(tmp_path, postprocessing):
    items = _items(5)
    handler = SegmentationReportHandler(output_dir=tmp_path, prefix="val")
    evaluator = _evaluator(items, handler, postprocessing)
    evaluator.run()
    evaluator.run()  # a second run starts a new report
    rows = handler.report.rows
    assert [r["case_id"] for r in rows] == [f"id{i}" for i in range(5)]
    for item, row in zip(items, rows):
        ref = case_metrics(item["image"][0] >= 0.5, item["label"][0], spacing=(1.5, 1.0, 2.0))
        assert {k: row[k] for k in ref} == pytest.approx(ref, nan_ok=True)
    assert handler.written == {"csv": tmp_path / "val.csv", "json": tmp_path / "val.json"}
    data = json.loads((tmp_path / "val.json").read_text())
    assert len(data["cases"]) == 5 and "hd95_mm" in data["summary"]
    assert not [p for p in tmp_path.iterdir() if TEMP_MARKER in p.name]


def test_handler_case_id_fallback_and_options(tmp_path):
    items = _items(3, with_id=False)
    handler = SegmentationReportHandler(output_dir=None, use_spacing=False)
    _evaluator(items, handler).run()
    rows = handler.report.rows
    assert [r["case_id"] for r in rows] == ["case00", "case01", "case02"]  # from pred.meta["filename_or_obj"]
    assert "hd95_mm" not in rows[0] and handler.written == {}
    assert list(tmp_path.iterdir()) == []


def test_handler_reads_non_decollated_and_two_channel_output():
    label = torch.as_tensor(np.stack([blob((12, 12), i) for i in range(2)])).float()[:, None]
    fg = torch.as_tensor(np.stack([blob((12, 12), i + 5) for i in range(2)])).float()[:, None]
    two_channel = torch.cat([1 - fg, fg], dim=1)

    class State:
        output = {"pred": two_channel, "label": label}
        batch = {"case_id": ["x", "y"]}

    class FakeEngine:
        state = State()

    handler = SegmentationReportHandler(use_spacing=False)
    handler.iteration_completed(FakeEngine())
    rows = handler.report.rows
    assert [r["case_id"] for r in rows] == ["x", "y"]
    assert rows[1]["dice"] == pytest.approx(case_metrics(fg[1], label[1])["dice"])
    State.output, State.batch = [{"pred": torch.zeros(3, 4, 4), "label": torch.zeros(1, 4, 4)}], None
    with pytest.raises(ValueError, match="channel"):
        handler.iteration_completed(FakeEngine())


# ----------------------------------------------------------------------------------------------------------------
# evaluate_files


def _save_nifti(path: Path, array: np.ndarray, spacing) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([*spacing, 1.0])), str(path))
    return path


def test_evaluate_files(tmp_path):
    spacing = (0.8, 1.2, 2.0)
    preds, labels = [], []
    for i in range(3):
        preds.append(_save_nifti(tmp_path / f"pred_{i}.nii.gz", blob((10, 11, 9), i), spacing))
        labels.append(_save_nifti(tmp_path / f"case_{i}.nii.gz", blob((10, 11, 9), i + 7), spacing))
    report = evaluate_files(preds, labels, out_dir=tmp_path / "eval")
    assert [r["case_id"] for r in report.rows] == ["case_0", "case_1", "case_2"]
    ref = case_metrics(blob((10, 11, 9), 1), blob((10, 11, 9), 8), spacing=spacing)
    assert {k: report.rows[1][k] for k in ref} == pytest.approx(ref, rel=1e-5)
    assert (tmp_path / "eval" / "metrics.csv").is_file() and (tmp_path / "eval" / "metrics.json").is_file()

    ids = evaluate_files(preds[:1], labels[:1], case_ids=["p1"], use_spacing=False)
    assert ids.rows[0]["case_id"] == "p1" and "hd95_mm" not in ids.rows[0]

    with pytest.raises(ValueError, match="2 prediction files but 3 label files"):
        evaluate_files(preds[:2], labels)
    with pytest.raises(FileNotFoundError, match="nope.nii.gz"):
        evaluate_files([tmp_path / "nope.nii.gz"], labels[:1])
    with pytest.raises(ValueError, match="unique"):
        evaluate_files(preds[:2], labels[:2], case_ids=["a", "a"])
    other = _save_nifti(tmp_path / "other.nii.gz", blob((10, 11, 9), 0), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="other.nii.gz"):
        evaluate_files([other], labels[:1])
    small = _save_nifti(tmp_path / "small.nii.gz", blob((10, 11, 8), 0), spacing)
    with pytest.raises(ValueError, match="small.nii.gz"):
        evaluate_files([small], labels[:1])


def test_dice_score_conventions_agree_with_case_metrics():
    empty = torch.zeros(6, 6)
    disc = torch.zeros(6, 6)
    disc[1:4, 1:4] = 1
    shifted = torch.roll(disc, 1, dims=0)
    assert dice_score(empty, empty) == 1.0 == case_metrics(empty, empty)["dice"]  # MONAI's ignore_empty=False
    assert dice_score(disc, empty) == 0.0 == case_metrics(disc, empty)["dice"]
    assert dice_score(disc, shifted) == pytest.approx(2 * 6 / 18) == pytest.approx(case_metrics(disc, shifted)["dice"])
    # any shape (a batch of views is pooled), bool or numpy input, >= 0.5 is foreground
    batch = torch.stack([disc, empty])[:, None]
    assert dice_score(batch, batch) == 1.0
    assert dice_score(disc.numpy() > 0, 0.6 * disc.numpy()) == 1.0
    assert dice_score(0.4 * disc, empty) == 1.0
    with pytest.raises(ValueError, match="shapes differ"):
        dice_score(disc, batch)


def test_evaluate_command_takes_comma_separated_file_lists(tmp_path):
    """``python -m monai_mlbseg evaluate --predictions a,b --labels c,d``: fire passes the lists as one string."""
    import subprocess
    import sys

    spacing = (1.0, 1.0, 1.0)
    preds = [_save_nifti(tmp_path / f"pred_{i}.nii.gz", blob((10, 11, 9), i), spacing) for i in range(2)]
    labels = [_save_nifti(tmp_path / f"case_{i}.nii.gz", blob((10, 11, 9), i + 7), spacing) for i in range(2)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai_mlbseg",
            "evaluate",
            "--predictions",
            ",".join(map(str, preds)),
            "--labels",
            ",".join(map(str, labels)),
            "--out",
            str(tmp_path / "eval"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    rows = rows["cases"] if isinstance(rows, dict) else rows
    assert [r["case_id"] for r in rows] == ["case_0", "case_1"]
    assert rows[1]["dice"] == pytest.approx(case_metrics(blob((10, 11, 9), 1), blob((10, 11, 9), 8))["dice"])
