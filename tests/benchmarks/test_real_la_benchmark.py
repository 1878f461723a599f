import json
import math
from pathlib import Path

import pytest

from benchmarks.experiments import real_la

ROOT = Path(__file__).resolve().parents[2]


def test_split_uses_train_list_only(tmp_path):
    ids = [f"case{i:02d}" for i in range(30)]
    (tmp_path / "train.list").write_text("\n".join(ids) + "\n")
    split = real_la.split_ids(tmp_path / "train.list", num_labeled=4, num_validation=16)
    assert split["labeled"] == ids[:4]
    assert split["validation"] == ids[-16:]
    assert split["unlabeled"] == ids[4:14]
    ceiling = real_la.split_ids(tmp_path / "train.list", num_labeled=14, num_validation=16)
    assert ceiling["labeled"] == ids[:14] and ceiling["unlabeled"] == [], "every case of the split labeled"
    with pytest.raises(SystemExit, match="too few"):
        real_la.split_ids(tmp_path / "train.list", num_labeled=15, num_validation=16)


def test_parse_variant_inherits_and_overrides():
    name, spec = real_la.parse_variant('f_clip=f_weak_to_strong:{"grad_clip": 0.2, "lr": 0.002, "unlabeled_batch": 2}')
    assert name == "f_clip" and spec["method"] == "weak_to_strong"
    assert spec["trainer"] == {"grad_clip": 0.2}
    assert spec["lr"] == 0.002 and spec["unlabeled_batch"] == 2
    name, spec = real_la.parse_variant('a2=a_labeled_only:{"clean_augment": {"contrast": 0.25}}')
    assert spec["method"] == "labeled_only" and spec["trainer"] == {"clean_augment": {"contrast": 0.25}}
    with pytest.raises(ValueError, match="unknown base"):
        real_la.parse_variant("x=nope:{}")
    with pytest.raises(ValueError, match="unknown options \\['batch_norm'\\]"):
        real_la.parse_variant('x=d_mlbseg:{"batch_norm": "frozen"}')


def _quick_benchmark(tmp_path, num_labeled=None):
    from monai_mlbseg.data import make_synthetic_dataset

    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "uamt_h5", num_cases=10, shape=(40, 36, 8))
    (data / "train.list").write_text("\n".join(ids) + "\n")
    args = real_la.parse_args(["--quick", "--out", str(tmp_path / "bench")])
    args.num_labeled = num_labeled or args.num_labeled
    return real_la.Benchmark(args, data, data / "train.list")


def _settings(workflow, stage):
    """What a stage trains with: optimizer, length, schedule, batch sizes, loss and (stage 2) the method's parts."""
    from monai_mlbseg.recipe import parsed

    trainer = parsed(workflow, f"{stage}#trainer")
    group = trainer.optimizer.param_groups[0]
    settings = {
        "optimizer": (type(trainer.optimizer).__name__, group["lr"], group["momentum"], group["weight_decay"]),
        "length": (trainer.state.max_epochs, trainer.state.epoch_length),
        "batch": trainer.data_loader.batch_size,
        "loss": type(trainer.loss_function).__name__,
        "image_size": parsed(workflow, "image_size"),
        "features": parsed(workflow, "features"),
    }
    if stage == "train":
        decay = parsed(workflow, "train#lr_scheduler").lr_lambdas[0]
        clean = trainer.clean_data_loader
        settings.update(run=trainer.run_settings, decay=[decay(e) for e in range(3)], clean_batch=clean.batch_size)
    return settings


def test_the_benchmark_trains_with_the_bundles_settings_for_the_same_overrides(tmp_path):
    """One recipe: the benchmark's stage-1 and stage-2 trainers are the committed bundle's, given its overrides."""
    from monai_mlbseg.recipe import training_workflow

    bench = _quick_benchmark(tmp_path)
    committed = ROOT / "bundles" / "mlbseg_la"
    spec = real_la.parse_variant('f_clip=f_weak_to_strong:{"grad_clip": 0.5, "lr": 0.002}')[1]
    for stage, overrides in (("stage1", bench.stage1_overrides(0)), ("train", bench.stage2_overrides(0, "f", spec))):
        ours = _settings(training_workflow(bench.bundle, overrides), stage)
        shipped = _settings(training_workflow(committed, {**overrides, "bundle_root": str(committed)}), stage)
        assert ours == shipped, stage
    stage1 = _settings(training_workflow(bench.bundle, bench.stage1_overrides(0)), "stage1")
    assert stage1["optimizer"] == ("SGD", bench.args.lr1, 0.9, 5e-4) and stage1["batch"] == bench.args.stage1_batch
    assert stage1["length"][0] * stage1["length"][1] == bench.args.stage1_iterations
    stage2 = _settings(training_workflow(bench.bundle, bench.stage2_overrides(0, "f", spec)), "train")
    assert stage2["optimizer"][1] == 0.002 and stage2["run"]["schedule"]["grad_clip"] == 0.5
    assert stage2["length"][0] * stage2["length"][1] == 2 * bench.args.stage2_iterations, "one step per iteration"
    assert stage2["run"]["schedule"]["_target_"].endswith("JointStep")


def test_variant_options_become_the_methods_parts(tmp_path):
    from monai_mlbseg.recipe import parsed, training_workflow

    bench = _quick_benchmark(tmp_path)
    trainer = parsed(
        training_workflow(bench.bundle, bench.stage2_overrides(0, "e", real_la.VARIANTS["e_reuse_meta_grad"])),
        "train#trainer",
    )
    assert trainer.schedule.reuse_meta_grad and trainer.weighting.meta_params is None
    spec = real_la.parse_variant('e2=e_reuse_meta_grad:{"reuse_meta_grad": false, "meta_params": ["nodes.conv0_1"]}')[1]
    trainer = parsed(training_workflow(bench.bundle, bench.stage2_overrides(0, "e2", spec)), "train#trainer")
    assert not trainer.schedule.reuse_meta_grad and trainer.weighting.meta_params == ["nodes.conv0_1"]
    spec = real_la.parse_variant('a2=a_labeled_only:{"clean_augment": {"contrast": 0.3}}')[1]
    trainer = parsed(training_workflow(bench.bundle, bench.stage2_overrides(0, "a2", spec)), "train#trainer")
    assert trainer.supervised_only and trainer.clean_augment.contrast == 0.3 and trainer.schedule.grad_clip == 0.2


def test_quick_run_writes_every_row_and_resumes(tmp_path):
    out = tmp_path / "bench"
    variants = "a_matched,a_labeled_only,b_self_training,c_mean_teacher"
    argv = ["--quick", "--out", str(out), "--seeds", "0", "--variants", variants]
    argv += ["--variant", 'f_clip=d_mlbseg:{"grad_clip": 0.5}']
    real_la.main(argv)
    figures = json.loads((out / "table.json").read_text())["figures"]
    assert list(figures) == ["stage1", "a_matched", "a_labeled_only", "b_self_training", "c_mean_teacher", "f_clip"]
    for name, fig in figures.items():
        assert 0.0 <= fig["dice"][0] <= 1.0 and fig["cases"] == 3, name
        assert math.isfinite(fig["train_s"])
    # the control is labeled-only training with the default method's perturbation; every weighted row reports how
    # its weights select right pixels at the start and the end of stage 2
    control = json.loads((out / "seed0" / "a_matched" / "result.json").read_text())["run_settings"]
    assert control["supervised_only"] and control["clean_augment"]["contrast"] == 0.25
    assert control["schedule"]["_target_"].endswith("LabeledOnly") and control["schedule"]["grad_clip"] is None
    assert set(figures["f_clip"]["selection"]) == {"initial", "pseudo"}
    assert all(0 <= auc <= 1 for s in figures["f_clip"]["selection"].values() for auc in s.values())
    results = {n: json.loads((out / "seed0" / n / "result.json").read_text()) for n in figures if n != "stage1"}
    assert results["a_labeled_only"]["optimizer_steps"] == results["f_clip"]["optimizer_steps"] == 6
    assert results["a_labeled_only"]["iterations"] == 2 * results["f_clip"]["iterations"]
    assert "| f_clip | 0 |" in (out / "table.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("result.json")}
    real_la.main(argv)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("result.json")} == stamps, "a rerun retrains nothing"


def test_report_mode_tables_every_row_of_every_seed_without_training(tmp_path):
    out = tmp_path / "bench"
    real_la.main(["--quick", "--out", str(out), "--seeds", "0", "--variants", "a_matched"])
    real_la.main(["--quick", "--out", str(out), "--seeds", "1", "--variants", "b_self_training"])
    assert "a_matched" not in json.loads((out / "table.json").read_text())["figures"]
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")}
    results = real_la.main(["--out", str(out), "--report"])
    assert {s: list(rows) for s, rows in results.items()} == {
        0: ["stage1", "a_matched"],
        1: ["stage1", "b_self_training"],
    }
    figures = json.loads((out / "table.json").read_text())["figures"]
    assert figures["stage1"]["seeds"] == [0, 1] and figures["stage1"]["cases"] == 3, "seed 0 has the control"
    assert figures["b_self_training"]["seeds"] == [1] and figures["b_self_training"]["cases"] == 0
    assert "| a_matched | 0 |" in (out / "table.md").read_text()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pt")} == stamps, "the report trains nothing"
    real_la.main(["--out", str(out), "--report", "--control", "stage1"])
    against_stage1 = json.loads((out / "table_vs_stage1.json").read_text())
    assert against_stage1["control"] == "stage1" and against_stage1["figures"]["b_self_training"]["cases"] == 3
    assert "Dice vs stage1" in (out / "table_vs_stage1.md").read_text()
    assert json.loads((out / "table.json").read_text())["figures"] == figures, "the main table is kept"
    with pytest.raises(SystemExit, match="no seed"):
        real_la.main(["--out", str(tmp_path / "empty"), "--report"])


def test_the_all_labeled_ceiling_trains_stage_1_and_the_control_like_every_row(tmp_path):
    """Every case of the split labeled (nothing to bootstrap): stage 1 still trains, and the control starts from it."""
    bench = _quick_benchmark(tmp_path, num_labeled=7)
    assert bench.datalist["unlabeled"] == [] and len(bench.datalist["labeled"]) == 7
    weights, stage1 = bench.stage1(0)
    assert stage1["iterations"] == real_la.QUICK["stage1_iterations"] and weights.is_file()
    control = bench.stage2(0, "a_matched", real_la.VARIANTS["a_matched"], weights)
    assert control["optimizer_steps"] == 2 * real_la.QUICK["stage2_iterations"] and len(control["cases"]) == 3
