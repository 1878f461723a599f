"""The README's main command, ``python -m monai_mlbseg demo``, in its reduced (quick) mode."""

import json
import re
import subprocess
import sys

import pytest

from monai_mlbseg.demo import run_demo
from monai_mlbseg.engines import STAGE2_METHODS

from .bundle_utils import BUNDLES


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
        "labeled only, continued (control)",
        "weak-to-strong mean teacher (stage 2)",
    ], "the bundle's default stage 2"
    assert "so the unlabeled volumes added" in report
    for figure in re.findall(r"\]\((figures/[^)]+\.png)\)", report):
        assert (out / figure).stat().st_size > 1000, f"{figure} is linked but empty"
    linked = set(re.findall(r"\]\((figures/[^)]+\.png)\)", report))
    assert {"figures/test_overlays.png", "figures/training_curves.png"} <= linked
    assert "figures/weight_maps.png" not in linked, "a method without a weighted term has no weight maps"
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
    stage1 = (out / "models" / "stage1.pt").stat().st_mtime_ns
    control = {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "control").iterdir()}
    assert summary["settings"]["labeled-only control (iterations)"] == "6", "one optimizer step per joint iteration"
    labels = {p: p.stat().st_mtime_ns for p in (out / "initial_labels").iterdir()}

    again = demo(out)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "models" / "stage1.pt").stat().st_mtime_ns == stage1, "stage 1 is not retrained"
    assert {p: p.stat().st_mtime_ns for p in labels} == labels, "initial labels are not rewritten"
    assert {p: p.stat().st_mtime_ns for p in (out / "checkpoints" / "control").iterdir()} == control, "not retrained"
    assert not list(out.rglob("*.partial-*")), "no temporary files left"


@pytest.mark.parametrize(
    "kwargs, mode",
    [
        ({"reuse_meta_grad": True}, "reuse_meta_grad"),
        ({"meta_params": "nodes.conv0_1, final"}, "meta_params=nodes.conv0_1+final"),
    ],
)
def test_demo_fast_modes_reach_the_trainer(tmp_path, kwargs, mode):
    run_demo(out=str(tmp_path), quick=True, progress=False, overrides='{"stage2_method": "mlbseg"}', **kwargs)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["settings"]["stage-2 mode"] == mode
    assert (tmp_path / "models" / "model.pt").is_file()


def test_demo_overrides_reach_the_training_workflow_last(tmp_path, monkeypatch):
    import monai_mlbseg.demo as demo_module

    trainers = {}
    parsed = demo_module.parsed

    def keep(workflow, id):
        value = parsed(workflow, id)
        trainers[id] = value
        return value

    monkeypatch.setattr(demo_module, "parsed", keep)
    overrides = '{"train#trainer#grad_clip": 0.5, "stage1#batch_size": 3}'  # JSON, as typed on the command line
    run_demo(out=str(tmp_path), quick=True, progress=False, overrides=overrides)
    assert trainers["train#trainer"].grad_clip == 0.5
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
    assert str(out / "checkpoints" / "stage2") in proc.stderr and "weighting: {" in proc.stderr
    assert "UniformWeighting'} there, {'_target_': 'monai_mlbseg.engines.parts.MetaWeighting'" in proc.stderr
    assert (out / "models" / "model.pt").read_bytes() == model, "the trained model is kept"


def test_demo_rejects_meta_params_that_select_nothing(tmp_path):
    with pytest.raises(ValueError, match="select none"):
        run_demo(
            out=str(tmp_path),
            quick=True,
            progress=False,
            meta_params="decoder_that_does_not_exist",
            overrides='{"stage2_method": "mlbseg"}',
        )


def _tree(folder):
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.mark.parametrize("fmt", ["uamt_h5", "la_raw", "msd_heart", "promise12", "msd_prostate"])
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
    assert "MLB-Seg changed the mean test Dice by" in report
    assert "figures/weight_maps.png" in report and (out / "figures" / "weight_maps.png").stat().st_size > 1000
    settings = json.loads((out / "summary.json").read_text())["settings"]
    assert settings["stage-2 method"] == "mlbseg" and settings["stage-2 mode"] == "faithful (reference)"
    assert settings["labeled-only control (iterations)"] == "12", "twice the 6 two-step iterations"
    assert STAGE2_METHODS["mlbseg"].description in report, "the report describes the method from the registry"


def test_demo_control_starts_from_stage_1_and_trains_on_labeled_volumes_only(tmp_path, monkeypatch):
    import torch

    import monai_mlbseg.demo as demo_module

    seen = []
    parsed = demo_module.parsed

    def keep(workflow, id):
        value = parsed(workflow, id)
        if id == "train#trainer" and all(value is not trainer for trainer, _ in seen):  # each workflow's, once
            state = {k: v.detach().clone() for k, v in value.network.state_dict().items()}
            seen.append((value, state))
        return value

    monkeypatch.setattr(demo_module, "parsed", keep)
    run_demo(out=str(tmp_path), quick=True, progress=False)
    (stage2, _), (control, at_start) = seen
    assert not stage2.supervised_only and control.supervised_only, "the control sees no unlabeled volume"
    assert control.run_settings["supervised_only"] and not stage2.run_settings["supervised_only"], "and records it"
    assert control.state.iteration == 6 and stage2.state.iteration == 6, "equal optimizer steps (one per joint step)"
    assert (control.grad_clip, stage2.grad_clip) == (0.2, None), "the reference's settings"
    assert [(t.name, t.weight) for t in control.terms] == [("loss_pc", 1.0), ("loss_mt", 1.0)]
    stage1 = torch.load(tmp_path / "models" / "stage1.pt", weights_only=True)
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
    for name in ("data", "datalist.json", "initial_labels", "models/stage1.pt", "checkpoints/stage1"):
        (second / name).parent.mkdir(parents=True, exist_ok=True)
        copy = shutil.copytree if (first / name).is_dir() else shutil.copy
        copy(first / name, second / name)
    run_demo(out=str(second), quick=True, progress=False, control=False)
    a, b = (torch.load(d / "models" / "model.pt", weights_only=True) for d in (first, second))
    stage1 = torch.load(first / "models" / "stage1.pt", weights_only=True)
    assert any(not torch.equal(a[k], stage1[k]) for k in a), "stage 2 trained"
    assert all(torch.equal(a[k], b[k]) for k in a), "stage 1 in this process or reused: the same stage 2"


def test_quick_is_a_preset_that_explicit_sizes_override(tmp_path):
    run_demo(out=str(tmp_path), quick=True, progress=False, control=False, stage2_iterations=4)
    settings = json.loads((tmp_path / "summary.json").read_text())["settings"]
    assert settings["iterations (stage 1 / stage 2)"] == "6 / 4", "the preset's stage 1, the explicit stage 2"
    assert settings["slice size"] == "32x32"
