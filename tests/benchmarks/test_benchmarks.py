"""The benchmark scripts still run and report every figure (smoke configurations; no timing is asserted)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.performance.common import IterationClock, Workload
from monai_mlbseg.engines import pixel_weighting, stage2_method

REPO = Path(__file__).resolve().parents[2]


def run(module, *args):
    """Run ``python -m benchmarks.<module> --quick *args`` from the repository root; returns its stdout."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", "--quick", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_iteration_cost_pairs_every_mode_with_a_supervised_step(tmp_path):
    out = tmp_path / "a.json"
    stdout = run("performance.iteration_cost", "--figures", "a", "--json", str(out), "--channels-last", "--amp")
    figures = json.loads(out.read_text())
    modes = figures["a_time_ratio"]["modes"]
    assert set(modes) == {"faithful", "reuse_meta_grad", "meta_params=nodes.conv0_2+final"}
    assert "reuse_meta_grad+meta_params" in figures["a_time_ratio"]["unsupported"]
    for mode in modes.values():
        assert len(mode["stage2_s"]["samples"]) == len(mode["paired_supervised_s"]) == 2
        assert mode["ratio_median_of_pairs"] > 0 and math.isfinite(mode["ratio_median_of_pairs"])
    assert "(a) stage-2 iteration / supervised step" in stdout
    assert "b_scopes" not in figures and "g_methods" not in figures, "--figures a measures (a) alone"


def test_iteration_cost_breaks_the_iteration_down_by_profiler_scope(tmp_path):
    out = tmp_path / "b.json"
    run("performance.iteration_cost", "--figures", "b", "--json", str(out))
    b = json.loads(out.read_text())["b_scopes"]
    assert b["iterations"] == 2 and b["iteration_s_median"] > 0
    scopes = b["scopes"]
    assert {"mlbseg.warp_to_views", "mlbseg.ple_pseudo_labels", "mlbseg.clean_step"} <= set(scopes)
    for scope in scopes.values():
        assert 0 < scope["share_median"] <= 1 and scope["calls_per_iteration"] >= 1


def test_iteration_cost_measures_each_method_and_trust_per_optimizer_step(tmp_path):
    out = tmp_path / "g.json"
    requested = ["weak_to_strong", "trust:meta_instance", "mlbseg", "labeled_only", "trust:quality", "trust:fixed"]
    stdout = run("performance.iteration_cost", "--figures", "g", "--methods", ",".join(requested), "--json", str(out))
    g = json.loads(out.read_text())["g_methods"]
    assert list(g["rows"]) == requested and not g["unsupported"]
    table = [line for line in stdout.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0][2:].split(" (= ")[0] for line in table[1:]] == requested, "a table row per method"
    for name, row in g["rows"].items():
        method, trust = ("weak_to_strong", name.split(":")[1]) if ":" in name else (name, None)
        parts = stage2_method(method, **({"weighting": pixel_weighting(trust)} if trust else {}))
        schedule_steps = parts["schedule"].steps_per_iteration
        labeled_only = not parts["schedule"].uses_unlabeled
        assert (row["method"], row["trust"]) == (method, trust)
        # a labeled-only schedule never reads the unlabeled batch: one clean step per iteration
        assert row["steps_per_iteration"] == (1 if labeled_only else schedule_steps), name
        assert row["schedule_steps_per_iteration"] == schedule_steps and row["supervised_only"] == labeled_only
        assert row["optimizer_steps_counted"] == [row["steps_per_iteration"]] * 2, "counted by the optimizer"
        assert row["student_views"] == (10 if labeled_only else 15)
        assert len(row["iteration_s"]["samples"]) == len(row["paired_supervised_s"]) == 2
        assert row["step_s"]["median"] == pytest.approx(row["iteration_s"]["median"] / row["steps_per_iteration"])
        for ratio in (row["ratio_step_to_supervised"], row["ratio_iteration_to_supervised"]):
            assert ratio > 0 and math.isfinite(ratio), name
        assert row["setup_s"] > 0
    assert g["rows"]["mlbseg"]["steps_per_iteration"] == 2, "MLB-Seg's weighted step and clean step"
    assert g["rows"]["trust:fixed"]["same_as"] == "weak_to_strong", "the same trainer arguments are measured once"
    quality = g["rows"]["trust:quality"]
    assert (quality["fit_steps"], quality["fit_steps_configured"]) == (3, 300), "--quick fits the predictor in 3 steps"
    assert quality["fit_estimate_s"] == pytest.approx(quality["setup_s"] * 100)
    assert g["rows"]["weak_to_strong"]["fit_estimate_s"] is None
    assert set(g["supervised_s"]) == {"15 views", "10 views"}


def test_iteration_cost_rejects_an_unknown_method():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.performance.iteration_cost", "--quick", "--methods", "weak_to_strong,ssl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert proc.returncode == 2 and "unknown method 'ssl'" in proc.stderr and "trust:adaptive" in proc.stderr


def test_memory_benchmark_measures_each_step_in_a_fresh_process(tmp_path):
    out = tmp_path / "c.json"
    run("performance.memory", "--json", str(out))
    c = json.loads(out.read_text())["c_memory"]
    assert c["faithful"]["peak_bytes"] > 0 and c["supervised"]["peak_bytes"] > 0
    assert c["ratio_peak"] == pytest.approx(c["faithful"]["peak_bytes"] / c["supervised"]["peak_bytes"])


def test_inference_and_data_benchmarks_report_their_figures(tmp_path):
    run("performance.inference", "--json", str(tmp_path / "d.json"))
    d = json.loads((tmp_path / "d.json").read_text())["d_inference"]
    assert d["slices_per_s"] == pytest.approx(8 / d["latency_s"]["median"])
    run("performance.data_loading", "--json", str(tmp_path / "e.json"))
    e = json.loads((tmp_path / "e.json").read_text())["e_data"]
    assert {"num_workers=0", "num_workers=2"} == set(e["configs"])
    for config in e["configs"].values():
        assert config["iterations"] == 2 and 0 < config["share_of_run"] < 1


def test_fast_mode_benchmark_compares_each_mode_with_the_faithful_one(tmp_path):
    out = tmp_path / "fast.json"
    run("experiments.fast_modes", "--seeds", "0", "--out", str(tmp_path / "runs"), "--json", str(out))
    results = json.loads(out.read_text())
    assert results["modes"] == ["faithful", "reuse_meta_grad", "meta_params=nodes.conv0_1+final"]
    runs = results["seeds"]["0"]
    stage1 = {name: run["dice_stage1"] for name, run in runs.items()}
    assert stage1["reuse_meta_grad"] == stage1["faithful"] == stage1["meta_params=nodes.conv0_1+final"], (
        "the fast modes start from the faithful run's stage 1"
    )
    for run_ in runs.values():
        assert 0.0 <= run_["mean_dice"] <= 100.0
    assert runs["faithful"]["delta_vs_faithful"] == 0.0


def test_gpu_check_runs_on_cpu_in_quick_mode(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "performance" / "gpu_check.sh"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    results = report["results"]
    assert set(results["2d_options"]) == {"fp32", "bf16", "channels_last", "bf16+channels_last"}
    for entry in [*results["2d_options"].values(), results["3d"]]:
        assert entry["stage2"]["ms_median"] > 0 and entry["supervised"]["ms_median"] > 0
        assert entry["ratio"] == pytest.approx(entry["stage2"]["ms_median"] / entry["supervised"]["ms_median"], 1e-2)
    batches = results["2d_unlabeled_batch"]
    assert set(batches) == {"1", "2", "4"}
    assert batches["4"]["ms_per_image"] == pytest.approx(batches["4"]["ms_median"] / 4, abs=0.01)
    assert all(entry["volumes_per_s"] > 0 for entry in results["inference"].values())
    assert set(results["inference"]) == {"2d_slices", "3d_sliding_window"}
    projection = report["projection_h"]
    slices = 120 * 76 * 88  # 120 epochs over the 88 slices of 76 unlabeled volumes
    assert projection["2d_fp32_batch4_h"] == pytest.approx(batches["4"]["ms_median"] * slices / 4 / 3.6e6, abs=0.01)
    assert projection["3d_fp32_h"] == pytest.approx(results["3d"]["stage2"]["ms_median"] * 15000 / 3.6e6, abs=0.01)
    table = (out / "gpu_check.md").read_text()
    assert "| options | stage-2 ms | supervised ms | ratio |" in table and "3d_fp32_h" in table
    assert (out / "gpu_check.log").is_file()


def test_iteration_clock_steps_one_iteration_at_a_time():
    engine = Workload(2, (4, 8), (16, 16), torch.device("cpu")).supervised()
    clock = IterationClock(engine, torch.device("cpu"))
    for done in (1, 2, 3):
        assert clock.step() > 0
        assert len(clock.times) == engine.state.iteration == done


def test_active_learning_loop_trains_round_0_once_and_each_strategy_picks_by_its_rule(tmp_path):
    from benchmarks.experiments.active_learning import main, pick

    results = main(["--quick", "--out", str(tmp_path), "--seeds", "0", "--threads", "1"])
    disagreement, chance = results["ple_disagreement"][0], results["random"][0]
    assert disagreement[0]["cases"] == chance[0]["cases"], "round 0 is shared by the strategies"
    assert list((tmp_path / "seed0").iterdir()) == [tmp_path / "seed0" / "round0"]
    scores = disagreement[0]["scores"]
    assert sorted(scores) == sorted(set(scores)) and len(scores) == 5, "every unlabeled study of the pool is scored"
    assert disagreement[0]["picked"] == [max(scores, key=scores.get)], "the most disagreeing study"
    assert disagreement[1]["labeled"] == sorted(disagreement[0]["labeled"] + disagreement[0]["picked"])
    assert pick("random", ["a", "b", "c"], 2, 0, 1, {}) == pick("random", ["c", "b", "a"], 2, 0, 1, {}), "seeded"
    table = (tmp_path / "table.md").read_text()
    assert "| random |" in table and "| ple_disagreement |" in table and "round 1" in table
    (tmp_path / "table.md").unlink()
    reported = main(["--out", str(tmp_path), "--report"])  # from the result files alone: no data, no training
    assert (tmp_path / "table.md").read_text() == table
    assert [r["cases"] for r in reported["ple_disagreement"][0]] == [r["cases"] for r in disagreement]


def test_monailabel_benchmark_trains_both_arms_through_the_server_at_equal_steps(tmp_path):
    pytest.importorskip("monailabel.interfaces.app", reason="MONAI Label's server is not installed")
    import nibabel as nib

    from benchmarks.experiments.monailabel_la import LA_SPACING, main

    results = main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    semi, supervised = results["semi_supervised"][0], results["supervised"][0]
    assert semi["trained_on"] == {"labeled": 2, "unlabeled": 4} and supervised["trained_on"]["unlabeled"] == 0
    steps = semi["request"]["stage1_iterations"] + semi["request"]["stage2_steps"]
    assert supervised["request"]["stage2_steps"] == steps, "the same number of optimizer steps"
    assert [row["case_id"] for row in semi["cases"]] == ["case006", "case007"], "the last cases of train.list"
    studies = tmp_path / "studies"
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == ["case000.nii.gz", "case001.nii.gz"]
    image = nib.load(studies / "case003.nii.gz")
    assert image.shape == (40, 36, 8) and image.header.get_zooms() == LA_SPACING
    assert not (studies / "case006.nii.gz").exists(), "validation cases are never served"
    assert (tmp_path / "seed0" / "supervised" / "model.pt").is_file()
    assert 0 < semi["cpu_s"] and 0 < supervised["cpu_s"], "the CPU time of the server's train process"
    again = main(["--quick", "--out", str(tmp_path), "--threads", "1"])
    assert again["supervised"][0]["wall_s"] == supervised["wall_s"], "a rerun reads the finished arms"
    table = (tmp_path / "table.md").read_text()
    assert "| semi_supervised |" in table
    (tmp_path / "table.md").unlink()
    main(["--out", str(tmp_path), "--report"])  # from the result files alone: no data, no server
    assert (tmp_path / "table.md").read_text() == table


def test_active_learning_table_averages_only_the_seeds_every_strategy_finished():
    from benchmarks.experiments.active_learning import table

    def run(*dice):
        return {"cases": [{"case_id": f"c{i}", "dice": d} for i, d in enumerate(dice)]}

    results = {
        "random": {0: [run(0.5, 0.7), run(0.6, 0.8)], 1: [run(0.9, 0.9), run(0.1, 0.1)]},
        "ple_disagreement": {0: [run(0.5, 0.7), run(0.7, 0.9)], 1: [run(0.9, 0.9)]},
    }
    text, figures = table(results)
    assert figures["random"][0] == {"dice": 75.0, "paired_gain_vs_random": None, "seeds": [0, 1]}
    assert figures["random"][1]["dice"] == pytest.approx(70.0), "seed 1's round 1 waits for the other strategy"
    assert figures["ple_disagreement"][1]["paired_gain_vs_random"] == pytest.approx(10.0)
    assert "| ple_disagreement | 75.00 (+0.00) | 80.00 (+10.00) |" in text
