"""The README's main command, ``python -m monai_mlbseg demo``, in its reduced (quick) mode."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from monai_mlbseg.demo import run_demo
from monai_mlbseg.engines import STAGE2_METHODS
from monai_mlbseg.evaluation import SegmentationReport, compare_in_words, most_different_slices
from monai_mlbseg.transforms import StrongIntensityAugment
from tests.bundle_utils import BUNDLES


def demo(out, *args):
    return subprocess.run(
        [sys.executable, "-m", "monai_mlbseg", "demo", "--quick", "--progress", "False", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_lists_the_commands():
    proc = subprocess.run([sys.executable, "-m", "monai_mlbseg", "--help"], capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    for command in ("demo", "prepare", "synth", "evaluate", "bundles"):
        assert re.search(rf"\b{command}\b", text), f"{command} missing from --help"


@pytest.mark.parametrize("command", ["demo", "prepare", "check", "synth", "evaluate", "bundles"])
def test_cli_help_keeps_every_option_description_whole(command):
    """fire drops docstring lines it mistakes for new arguments (a colon in a continuation line): none may be lost."""
    import inspect

    from fire import docstrings

    from monai_mlbseg.__main__ import COMMANDS

    doc = inspect.getdoc(inspect.unwrap(COMMANDS[command]))
    args = doc.split("Args:")[1].split("\n\n")[0]
    described = dict(re.findall(r"^    (\w+): (.+?)(?=^    \w+: |\Z)", args, flags=re.M | re.S))
    assert described, f"{command}: no Args section"
    shown = {a.name: a.description for a in docstrings.parse(doc).args}
    assert set(shown) == set(described), f"{command}: fire sees the arguments {sorted(shown)}"
    for name, text in described.items():
        assert " ".join(shown[name].split()) == " ".join(text.split()), f"{command} --{name}: description cut"


def test_demo_writes_the_report_and_a_rerun_resumes_without_retraining(tmp_path):
    out = tmp_path / "demo"
    proc = demo(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| labeled only (stage 1) |" in report and "| weak-to-strong mean teacher (stage 2) |" in report
    rows = re.findall(r"^\| (labeled only[^|]*|[^|]*\(stage 2\)) \|", report, flags=re.M)
    assert rows == [
        "labeled only (stage 1)",
        "labeled only, same perturbation (control)",
        "weak-to-strong mean teacher (stage 2)",
    ], "the bundle's default stage 2"
    added = re.search(
        r"against the control \(labeled only, same perturbation\), what the unlabeled volumes added:\*\* "
        r"(Dice [^\n]*)",
        report,
    )
    assert added, "the report says what the unlabeled volumes added"
    for metric in ("Dice", "95HD", "ASD"):  # in words, not only Dice
        assert re.search(rf"\b{metric} (rose|fell|improved|got worse|did not change|cannot be compared)", added[1])
    assert "same strong perturbation of the labeled views" in report and "only the unlabeled volumes differ" in report
    assert "differ most" in report, "the overlay caption says how its slices were chosen"
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", report):
        assert (out / figure).stat().st_size > 1000, f"{figure} is linked but empty"
    linked = set(re.findall(r"\]\((figures/[^)]+\.png)\)", report))
    assert {"figures/test_overlays.png", "figures/training_curves.png", "figures/weight_maps.png"} <= linked
    assert "label source (`teacher`)" in report, "the default's trust maps: its teacher labels and their weights"
    for stage in ("stage1", "stage2", "control"):
        metrics = json.loads((out / f"metrics_{stage}.json").read_text())
        assert len(metrics["cases"]) == 2 and 0.0 <= metrics["summary"]["dice"]["mean"] <= 1.0
        assert (out / f"metrics_{stage}.csv").read_text().count("\n") == 2 + 2 + 1  # header, 2 cases, mean and std rows
        assert len(list((out / f"eval_{stage}").rglob("*_seg.nii.gz"))) == 2, "the bundle's evaluation wrote the masks"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["stage-2 mode"] == "no meta step"
    assert summary["settings"]["stage-2 method"] == "weak_to_strong", "the left-atrium bundle's default"
    for name in ("train.json", "inference.json", "evaluate.json"):  # the demo ran the left-atrium bundle itself
        assert (out / "bundle" / "configs" / name).read_text() == (BUNDLES["mlbseg_la"] / "configs" / name).read_text()
    assert set(summary["wall_time_s"]) >= {"stage 1", "stage 2", "total"}
    assert len(list((out / "initial_labels").glob("*.nii.gz"))) == 3, "one initial label per unlabeled volume"
    stage1 = (out / "stage1.pt").stat().st_mtime_ns
    control = {p: p.stat().st_mtime_ns for p in (out / "models" / "control" / "stage2").iterdir()}
    steps = summary["settings"]["control (labeled only, same perturbation): optimizer steps"]
    assert steps == "6", "one optimizer step per joint iteration"
    assert summary["settings"]["control: perturbation of the labeled views"].startswith("StrongIntensityAugment(")
    labels = {p: p.stat().st_mtime_ns for p in (out / "initial_labels").iterdir()}

    again = demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "stage1.pt").stat().st_mtime_ns == stage1, "stage 1 is not retrained"
    assert {p: p.stat().st_mtime_ns for p in labels} == labels, "initial labels are not rewritten"
    assert {p: p.stat().st_mtime_ns for p in (out / "models" / "control" / "stage2").iterdir()} == control, "kept"
    assert not list(out.rglob("*.partial-*")), "no temporary files left"

    recorded = out / "models" / "control" / "run_settings.json"  # a finished control of other settings (an older
    settings = json.loads(recorded.read_text())  # demo's reference-settings control) is not passed off as this one's
    recorded.write_text(json.dumps({**settings, "clean_augment": None}))
    refused = demo(out)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert str(out / "models" / "control") in refused.stderr and "other (or unrecorded) settings" in refused.stderr


@pytest.mark.parametrize(
    "kwargs, mode",
    [
        ({"reuse_meta_grad": True}, "reuse_meta_grad"),
        ({"meta_params": ["nodes.conv0_1", "final"]}, "meta_params=nodes.conv0_1+final"),
    ],
)
def test_demo_fast_modes_reach_the_trainer(tmp_path, kwargs, mode):
    overrides = json.dumps({"stage2_method": "mlbseg", "stage2_options": kwargs})
    run_demo(out=str(tmp_path), quick=True, progress=False, overrides=overrides)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["stage-2 mode"] == mode
    assert (tmp_path / "models" / "model.pt").is_file()


def test_demo_overrides_reach_the_training_workflow_last(tmp_path, monkeypatch):
    import monai_mlbseg.recipe as recipe

    trainers = {}
    parsed = recipe.parsed

    def keep(workflow, id):
        value = parsed(workflow, id)
        trainers[id] = value
        return value

    monkeypatch.setattr(recipe, "parsed", keep)
    overrides = '{"stage2_options": {"grad_clip": 0.5}, "stage1#batch_size": 3}'  # JSON, as typed on the command line
    run_demo(out=str(tmp_path), quick=True, progress=False, overrides=overrides)
    assert trainers["train#trainer"].schedule.grad_clip == 0.5
    assert trainers["stage1#trainer"].data_loader.batch_size == 3, "merged after the demo's own stage1_batch"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert json.loads(summary["settings"]["extra overrides (training)"]) == json.loads(overrides)
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.parametrize("overrides", ['{"train#trainer#joint_step": tru', "[1, 2]", {1: 2}])
def test_demo_rejects_overrides_that_are_not_an_object(tmp_path, overrides):
    from monai_mlbseg.utils import InputError

    with pytest.raises(InputError, match="overrides"):
        run_demo(out=str(tmp_path), quick=True, progress=False, overrides=overrides)
    assert not (tmp_path / "models").exists()


def test_cli_passes_overrides_as_json():
    import fire

    from monai_mlbseg.__main__ import _verbatim

    def command(overrides=None, seed=0):
        return overrides, seed

    typed = '{"train#trainer#joint_step": true, "x": null}'
    for argv in (["--overrides", typed, "--seed", "2"], [f"--overrides={typed}", "--seed", "2"]):
        assert fire.Fire(command, command=_verbatim(argv)) == (typed, 2)  # Fire alone would read true as "true"
    assert fire.Fire(command, command=_verbatim(["--seed", "1"])) == (None, 1)


def test_cli_reports_bad_overrides_without_a_traceback(tmp_path):
    proc = demo(tmp_path / "out", "--overrides", "{not json")
    assert proc.returncode == 2 and "overrides" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_a_rerun_with_another_stage2_method_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "demo"
    assert demo(out, "--control", "False").returncode == 0
    model = (out / "models" / "model.pt").read_bytes()
    proc = demo(out, "--control", "False", "--overrides", '{"stage2_method": "mlbseg"}')
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert str(out / "stage2") in proc.stderr and "weighting: {" in proc.stderr
    weightings = (
        "ConfidenceWeighting', 'threshold': 0.95} there, {'_target_': 'monai_mlbseg.engines.stage2.weightings.Meta"
    )
    assert weightings in proc.stderr
    assert (out / "models" / "model.pt").read_bytes() == model, "the trained model is kept"


def test_demo_rejects_meta_params_that_select_nothing(tmp_path):
    with pytest.raises(ValueError, match="select none"):
        overrides = {"stage2_method": "mlbseg", "stage2_options": {"meta_params": ["decoder_that_does_not_exist"]}}
        run_demo(out=str(tmp_path), quick=True, progress=False, overrides=overrides)


def _tree(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


# a folder with case lists, and one split by the folder's layout; every format's reading is tested through the
# bundles (tests/bundles/test_bundles.py::test_train_then_infer_on_every_format)
@pytest.mark.parametrize("fmt", ["uamt_h5", "msd_prostate"])
def test_demo_runs_on_a_users_folder_without_writing_into_it(tmp_path, fmt):
    from monai_mlbseg.data import get_format, make_synthetic_dataset

    data = tmp_path / "scans"
    ids = make_synthetic_dataset(data, fmt, num_cases=8, shape=(40, 36, 8), seed=3)
    before = _tree(data)
    proc = demo(tmp_path / "out", "--data_dir", str(data), "--format", fmt)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _tree(data) == before, "the user's folder was modified"
    datalist = json.loads((tmp_path / "out" / "datalist.json").read_text())
    if get_format(fmt).case_lists:  # UA-MT lists: labeled = first of train.list, report on test.list
        train, test = (data / "train.list").read_text().split(), (data / "test.list").read_text().split()
        assert [i["case_id"] for i in datalist["labeled"]] == train[:2]
        assert [i["case_id"] for i in datalist["test"]] == test[:2]
    else:
        assert [i["case_id"] for i in datalist["test"]] == ids[-2:]
        assert [i["case_id"] for i in datalist["labeled"]] == ids[:2]
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{fmt} scans in {data}" in report and "| weak-to-strong mean teacher (stage 2) |" in report
    rows = json.loads((tmp_path / "out" / "metrics_stage2.json").read_text())["cases"]
    assert [r["case_id"] for r in rows] == [i["case_id"] for i in datalist["test"]]


def test_demo_on_a_folder_with_too_few_cases_is_refused(tmp_path):
    from monai_mlbseg.data import make_synthetic_dataset

    data = tmp_path / "scans"
    make_synthetic_dataset(data, "promise12", num_cases=3, shape=(40, 36, 8), seed=3)
    proc = demo(tmp_path / "out", "--data_dir", str(data), "--format", "promise12")
    assert proc.returncode != 0
    assert str(data) in proc.stderr and "too few" in proc.stderr
    assert not (tmp_path / "out" / "models").exists()


def test_demo_names_the_stage2_method_and_shows_the_weight_maps_of_mlbseg(tmp_path):
    out = tmp_path / "mlbseg"
    proc = demo(out, "--overrides", '{"stage2_method": "mlbseg"}')
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "| MLB-Seg (stage 2) |" in report and "weak-to-strong mean teacher (stage 2)" not in report
    assert "**MLB-Seg against stage 1 (labeled only):** Dice" in report
    assert "label source (`initial`, `pseudo`)" in report and "`MetaWeighting`" in report
    assert "figures/weight_maps.png" in report and (out / "figures" / "weight_maps.png").stat().st_size > 1000
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["stage-2 method"] == "mlbseg" and settings["stage-2 mode"] == "faithful (reference)"
    assert settings["control (labeled only, same perturbation): optimizer steps"] == "6", (
        "the budget in optimizer steps"
    )
    assert settings["control: gradient clip"] == "0.2", "MLB-Seg's clip"
    assert settings["control: perturbation of the labeled views"] == "none", "MLB-Seg perturbs no view"
    assert STAGE2_METHODS["mlbseg"].description in report, "the report describes the method from the registry"


def test_demo_control_is_matched_to_the_method_starts_from_stage_1_and_sees_no_unlabeled_volume(tmp_path, monkeypatch):
    import torch

    import monai_mlbseg.recipe as recipe

    seen = []
    parsed = recipe.parsed

    def keep(workflow, id):
        value = parsed(workflow, id)
        if id == "train#trainer" and all(value is not trainer for trainer, _ in seen):  # each workflow's, once
            state = {k: v.detach().clone() for k, v in value.network.state_dict().items()}
            seen.append((value, state))
        return value

    monkeypatch.setattr(recipe, "parsed", keep)
    run_demo(out=str(tmp_path), quick=True, progress=False)
    (stage2, _), (control, at_start) = seen
    assert not stage2.supervised_only and control.supervised_only, "the control sees no unlabeled volume"
    assert control.run_settings["supervised_only"] and not stage2.run_settings["supervised_only"], "and records it"
    assert control.state.iteration == 6 and stage2.state.iteration == 6, "equal optimizer steps (one per joint step)"
    # matched to the method (weak_to_strong): its strong perturbation on the labeled views, its clip, its optimizer
    assert isinstance(stage2.student_augment, StrongIntensityAugment) and stage2.clean_augment is None
    assert isinstance(control.clean_augment, StrongIntensityAugment)
    assert control.run_settings["clean_augment"] == stage2.run_settings["student_augment"], "the same strengths"
    assert control.schedule.grad_clip == stage2.schedule.grad_clip, "the method's clip (none for weak_to_strong)"
    assert control.run_settings["schedule"]["grad_clip"] == stage2.run_settings["schedule"]["grad_clip"]
    assert control.run_settings["sources"] == [] and [t.name for t in control.terms] == [t.name for t in stage2.terms]
    assert control.optimizer.defaults == stage2.optimizer.defaults and type(control.optimizer) is type(stage2.optimizer)
    assert control.run_settings["student_augment"] is None, "no unlabeled views to perturb"
    stage1 = torch.load(tmp_path / "stage1.pt", weights_only=True)
    assert all(torch.equal(at_start[k], stage1[k]) for k in stage1), "the control starts from the stage-1 weights"
    final = torch.load(tmp_path / "models" / "control" / "model.pt", weights_only=True)
    assert any(not torch.equal(final[k], stage1[k]) for k in stage1), "and trains"
    run_demo(out=str(tmp_path / "no_control"), quick=True, progress=False, control=False)
    assert not (tmp_path / "no_control" / "metrics_control.json").exists()
    assert "(control)" not in (tmp_path / "no_control" / "report.md").read_text()


def test_a_reused_stage_1_gives_the_same_stage_2_as_an_uninterrupted_run(tmp_path):
    """Stage 2 is reseeded after the bootstrap, the slice augmentation it shares with stage 1 included."""
    import shutil

    import torch

    first, second = tmp_path / "first", tmp_path / "second"
    run_demo(out=str(first), quick=True, progress=False, control=False)
    second.mkdir()
    for name in ("data", "datalist.json", "initial_labels", "stage1.pt", "stage1"):
        (second / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (first / name).is_dir() else shutil.copy
        copy(first / name, second / name)
    run_demo(out=str(second), quick=True, progress=False, control=False)
    a, b = (torch.load(d / "models" / "model.pt", weights_only=True) for d in (first, second))
    stage1 = torch.load(first / "stage1.pt", weights_only=True)
    assert any(not torch.equal(a[k], stage1[k]) for k in a), "stage 2 trained"
    assert all(torch.equal(a[k], b[k]) for k in a), "stage 1 in this process or reused: the same stage 2"


def test_quick_is_a_preset_that_explicit_sizes_override(tmp_path):
    run_demo(out=str(tmp_path), quick=True, progress=False, control=False, stage2_steps=4)
    settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert settings["stage-1 iterations / stage-2 optimizer steps"] == "6 / 4", "the preset's stage 1, the given steps"
    assert settings["slice size"] == "32x32"


def _masks(shape, boxes):
    """A mask of ``shape`` [H, W, D] with the ``(z, rows, cols)`` boxes set."""
    mask = np.zeros(shape, dtype=np.uint8)
    for z, rows, cols in boxes:
        mask[rows, cols, z] = 1
    return mask


def test_demo_slice_selection_picks_the_largest_disagreement():
    shape = (8, 8, 5)
    control = {"a": _masks(shape, [(0, slice(0, 4), slice(0, 4)), (3, slice(0, 2), slice(0, 2))])}
    control["b"] = _masks(shape, [(2, slice(0, 8), slice(0, 8))])
    method = {"a": _masks(shape, [(0, slice(0, 4), slice(0, 4)), (3, slice(0, 5), slice(0, 5))])}  # z=3: 21 differ
    method["b"] = _masks(shape, [(2, slice(0, 8), slice(0, 3)), (4, slice(0, 1), slice(0, 2))])  # z=2: 40, z=4: 2
    # z=0 of "a" has the most foreground but both agree on it: never chosen over a disagreement
    assert most_different_slices(control, method, count=3, per_case=2) == [("b", 2, 40), ("a", 3, 21), ("b", 4, 2)]
    assert most_different_slices(control, method, count=2) == [("b", 2, 40), ("a", 3, 21)], "one per volume"
    assert most_different_slices(control, method, count=3, per_case=1) == [("b", 2, 40), ("a", 3, 21)]
    assert most_different_slices(control, method, count=1) == [("b", 2, 40)]
    probabilities = {case: mask * 0.9 for case, mask in method.items()}  # >= 0.5 is foreground
    assert most_different_slices(control, probabilities, count=1) == [("b", 2, 40)]
    # no disagreement: the slices with the most foreground (then the most ground truth)
    same = {"a": control["a"]}
    truth = {"a": _masks(shape, [(4, slice(0, 8), slice(0, 8))])}
    assert most_different_slices(same, same, count=2, per_case=2) == [("a", 0, 0), ("a", 3, 0)]
    empty = {"a": np.zeros(shape)}
    assert most_different_slices(empty, empty, count=1, labels=truth) == [("a", 4, 0)]
    with pytest.raises(ValueError, match="different cases"):
        most_different_slices(control, {"a": method["a"]})
    with pytest.raises(ValueError, match="shapes"):
        most_different_slices({"a": control["a"]}, {"a": method["a"][:4]})


def _report(dice, hd95, asd):
    report = SegmentationReport()
    for i, (d, h, a) in enumerate(zip(dice, hd95, asd)):
        report.add_row({"case_id": f"c{i}", "dice": d, "jaccard": d / (2 - d), "hd95_voxel": h, "asd_voxel": a})
    return report


def test_demo_report_words_the_distances_with_their_sign():
    control = _report([0.70, 0.80], [4.0, 6.0], [1.0, 1.4])
    method = _report([0.72, 0.82], [6.0, 7.0], [0.9, 1.1])  # Dice up, 95HD worse, ASD better
    text = compare_in_words(control, method)
    assert text.startswith("Dice rose by 2.0 points (75.0% -> 77.0%), but 95HD got worse, from 5.00 to 6.50 voxels")
    assert text.endswith("and ASD improved, from 1.20 to 1.00 voxels")
    text = compare_in_words(method, control)
    assert text.startswith("Dice fell by 2.0 points (77.0% -> 75.0%), but 95HD improved, from 6.50 to 5.00 voxels")
    both = compare_in_words(control, _report([0.75, 0.85], [3.0, 5.0], [0.8, 1.0]))
    assert "but" not in both and "95HD improved, from 5.00 to 4.00 voxels" in both
    undefined = _report([0.0, 0.0], [float("nan")] * 2, [float("nan")] * 2)
    assert "95HD cannot be compared" in compare_in_words(control, undefined)


def test_demo_draws_the_trust_maps_of_a_method_whose_only_source_is_the_teacher(tmp_path):
    from types import SimpleNamespace

    import torch

    from monai_mlbseg.demo.report import weight_map_figure
    from monai_mlbseg.engines import WeightMapKeeper
    from monai_mlbseg.engines.stage2 import ConfidenceWeighting

    g = torch.Generator().manual_seed(0)
    views = torch.rand(10, 1, 16, 16, generator=g)
    teacher = (views > 0.5).float()
    weights = (torch.rand(10, 1, 16, 16, generator=g) > 0.3).float()
    maps = {"views": views, "sources": {"teacher": teacher}, "weights": weights, "num_views": 5}
    engine = SimpleNamespace(state=SimpleNamespace(weight_maps=maps), weighting=ConfidenceWeighting(0.95))
    keeper = WeightMapKeeper()
    keeper(engine)
    assert list(keeper.maps["sources"]) == ["teacher"] and keeper.maps["weights"].shape == (5, 1, 16, 16)
    caption = weight_map_figure(tmp_path / "weight_maps.png", keeper, "weak_to_strong")
    assert "(`teacher`)" in caption and "ConfidenceWeighting" in caption
    assert (tmp_path / "weight_maps.png").stat().st_size > 1000
    none = WeightMapKeeper()
    none(SimpleNamespace(state=SimpleNamespace(weight_maps={**maps, "sources": {}, "weights": weights[:, :0]})))
    assert weight_map_figure(tmp_path / "none.png", none, "mean_teacher") is None, "no label source: no figure"
    assert not (tmp_path / "none.png").exists()
