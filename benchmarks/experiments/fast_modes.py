#!/usr/bin/env python
"""
Test Dice of MLB-Seg's fast modes against the faithful stage 2, on the demo's synthetic benchmark.

For every seed, the demo (``monai_mlbseg.demo.run_demo``) runs once in the faithful mode; each fast mode then starts
from a copy of that run's data, stage-1 weights and initial labels, so the modes differ only in stage 2 (which is
reseeded, so its data order, augmentations and views are the same in every mode). Printed per seed and mode: the
mean test Dice (per 3D test volume, in %), its difference from the faithful mode, the paired per-case differences,
and the stage-2 wall time; then the means over seeds.

Usage::

    python -m benchmarks.experiments.fast_modes                          # seeds 0,1 with the demo's default sizes
    python -m benchmarks.experiments.fast_modes --seeds 0,1,2 --json fast_modes.json
    python -m benchmarks.experiments.fast_modes --quick                  # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

#: what a fast-mode run reuses from the faithful run of the same seed (everything before stage 2)
STAGE1_ARTEFACTS = (
    "data",
    "datalist.json",
    "datalist_stage2.json",
    "initial_labels",
    "models/stage1.pt",
    "checkpoints/stage1",
)


def copy_stage1(src: Path, dst: Path) -> None:
    """Copy the data, stage-1 weights and initial labels of a finished run ``src`` into a new run folder ``dst``."""
    for name in STAGE1_ARTEFACTS:
        source, target = src / name, dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, target)


def dice_per_case(run_dir: Path, prefix: str) -> dict[str, float]:
    """Per-case Dice (%) from ``<run_dir>/<prefix>.json`` written by the demo."""
    data = json.loads((run_dir / f"{prefix}.json").read_text(encoding="utf-8"))
    return {row["case_id"]: 100.0 * row["dice"] for row in data["cases"]}


MLBSEG = {"stage2_method": "mlbseg"}


def run_mode(out: Path, seed: int, mode: dict, demo_kwargs: dict) -> dict:
    """Run the demo for one mode and return its Dice and stage-2 wall time."""
    from monai_mlbseg.demo import run_demo

    start = time.perf_counter()
    # the fast modes approximate MLB-Seg's meta step, so every mode runs MLB-Seg, whatever the bundle's default
    run_demo(out=str(out), seed=seed, progress=False, overrides={**MLBSEG, "stage2_options": mode}, **demo_kwargs)
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    stage1, stage2 = dice_per_case(out, "metrics_stage1"), dice_per_case(out, "metrics_stage2")
    return {
        "dice_stage1": stage1,
        "dice": stage2,
        "mean_dice": statistics.fmean(stage2.values()),
        "mean_dice_stage1": statistics.fmean(stage1.values()),
        "stage2_s": summary["wall_time_s"]["stage 2"],
        "run_s": time.perf_counter() - start,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="fast_modes_runs", help="folder of the demo runs (one sub-folder per seed/mode)")
    p.add_argument("--seeds", default="0,1", help="comma-separated demo seeds")
    p.add_argument("--meta-params", default=None, help="meta_params of the subset mode (default: last decoder node)")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (the demo's quick mode)")
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    from monai_mlbseg.demo import QUICK, SIZES

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    features = (QUICK if args.quick else SIZES)["features"]  # the demo's sizes (its arguments default to None)
    meta_params = args.meta_params or f"nodes.conv0_{len(features) - 1},final"
    modes = {
        "faithful": {},
        "reuse_meta_grad": {"reuse_meta_grad": True},
        f"meta_params={meta_params.replace(',', '+')}": {"meta_params": meta_params.split(",")},
    }
    demo_kwargs = {"quick": args.quick}
    out_root = Path(args.out).resolve()
    results: dict = {"seeds": {}, "modes": list(modes), "meta_params": meta_params, "quick": args.quick}
    t0 = time.perf_counter()
    for seed in args.seeds:
        per_mode: dict = {}
        base = out_root / f"seed{seed}" / "faithful"
        for name, mode in modes.items():
            out = out_root / f"seed{seed}" / name
            if name != "faithful":
                copy_stage1(base, out)
            print(f"seed {seed}, {name}: running the demo in {out}", flush=True)
            per_mode[name] = run_mode(out, seed, mode, demo_kwargs)
            ref = per_mode["faithful"]
            diffs = [per_mode[name]["dice"][c] - ref["dice"][c] for c in ref["dice"]]
            per_mode[name]["delta_vs_faithful"] = statistics.fmean(diffs)
            per_mode[name]["case_deltas"] = diffs
            print(
                f"  stage 1 {per_mode[name]['mean_dice_stage1']:.2f} % -> stage 2 {per_mode[name]['mean_dice']:.2f} %"
                f" (vs faithful {per_mode[name]['delta_vs_faithful']:+.2f} points; per case "
                f"{', '.join(f'{d:+.1f}' for d in diffs)}); stage 2 {per_mode[name]['stage2_s']:.0f} s",
                flush=True,
            )
        results["seeds"][seed] = per_mode
    print("\nmean over seeds " + ",".join(map(str, args.seeds)) + " (test Dice per 3D volume, %)")
    print(f"  {'mode':<36} {'stage 1':>8} {'stage 2':>8} {'vs faithful':>12} {'stage-2 time':>13}")
    summary = {}
    for name in modes:
        runs = [results["seeds"][s][name] for s in args.seeds]
        summary[name] = {
            "mean_dice_stage1": statistics.fmean(r["mean_dice_stage1"] for r in runs),
            "mean_dice": statistics.fmean(r["mean_dice"] for r in runs),
            "delta_vs_faithful": statistics.fmean(r["delta_vs_faithful"] for r in runs),
            "stage2_s": statistics.fmean(r["stage2_s"] for r in runs),
        }
        s = summary[name]
        print(
            f"  {name:<36} {s['mean_dice_stage1']:>8.2f} {s['mean_dice']:>8.2f} {s['delta_vs_faithful']:>+12.2f} "
            f"{s['stage2_s']:>11.0f} s"
        )
    results["summary"] = summary
    results["elapsed_s"] = time.perf_counter() - t0
    print(f"elapsed: {results['elapsed_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2), encoding="utf-8")
        print(f"figures written to {args.json}")
    return results


if __name__ == "__main__":
    main()
