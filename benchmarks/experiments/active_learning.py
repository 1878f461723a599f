#!/usr/bin/env python
"""
Active learning on real left-atrium MRI: does the method's own uncertainty pick better studies to label than random?

A simulated annotation loop on UA-MT's ``train.list`` only (``test.list`` is never read): validation = its last
``--num_validation`` cases, the pool = the rest; round 0 labels the first ``--start`` cases of the pool, the same for
every strategy and seed. Every round trains the left-atrium bundle's whole training (stage 1, initial labels,
stage 2 with its default method; the unlabeled pool as its unlabeled cases) with the same budget, evaluates the
model on the validation volumes, then the strategy picks ``--add`` studies of the unlabeled pool, whose ground truth
is revealed for the next round:

- ``random``: a seeded random choice (MONAI Label's ``random``);
- ``ple_disagreement``: the studies whose PLE views disagree most under the round's model
  (:py:func:`monai_mlbseg.inferers.ple_disagreement`, what the app's ``ple_disagreement`` strategy computes).

Resumable: every round writes ``<out>/<strategy>/seed<N>/round<R>/result.json`` (metrics, labeled ids; round 0,
the same for every strategy, once per seed in ``<out>/seed<N>/round0``) and, where a strategy ranks by them, the
disagreement scores of the unlabeled pool (``scores.json``); a rerun skips finished rounds and continues an
interrupted one from its checkpoints.
``table.md`` / ``table.json`` (Dice per round and strategy, paired per case against random) are rebuilt at the end
of every run.

Usage::

    python -m benchmarks.experiments.active_learning --data_dir /data/LA --out runs/al --seeds 0,1
    python -m benchmarks.experiments.active_learning --quick --out /tmp/al_smoke       # synthetic smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.experiments.real_la import data_folder, evaluate, split_ids
from monai_mlbseg.bundles import write_bundle
from monai_mlbseg.data import build_datalist, resolve_datalist
from monai_mlbseg.engines import load_weights
from monai_mlbseg.inferers import ple_disagreement
from monai_mlbseg.recipe import parsed, run_training_step, training_workflow
from monai_mlbseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger("active_learning")

STRATEGIES = ("random", "ple_disagreement")

QUICK = {"num_cases": 9, "num_validation": 2, "image_size": 32, "features": (4, 8), "volume_shape": (40, 36, 8)}


def pick(
    strategy: str, unlabeled: Sequence[str], count: int, seed: int, round_: int, scores: dict[str, float]
) -> list[str]:
    """The ``count`` ids of ``unlabeled`` that ``strategy`` labels next (``scores``: the disagreement per id)."""
    if strategy == "random":
        return sorted(random.Random(1000 * seed + round_).sample(sorted(unlabeled), min(count, len(unlabeled))))
    ranked = sorted(sorted(unlabeled), key=lambda case: scores[case], reverse=True)
    return sorted(ranked[:count])


class Loop:
    """One strategy and seed: the rounds of training, evaluation and picking, through the bundle's workflow."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, strategy: str, seed: int) -> None:
        self.args, self.data_dir, self.strategy, self.seed = args, data_dir, strategy, seed
        self.out = Path(args.out).resolve() / strategy / f"seed{seed}"
        self.bundle = write_bundle("mlbseg_la", Path(args.out).resolve() / "bundle")
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def overrides(self, folder: Path, datalist_file: Path) -> dict[str, Any]:
        return {
            "dataset_dir": str(self.data_dir),
            "data_format": "uamt_h5",
            "datalist_file": str(datalist_file),
            "image_size": [self.args.image_size, self.args.image_size],
            "features": list(self.args.features),
            "device": str(self.device),
            "num_workers": 0,
            "stage1_iterations": self.args.stage1_iterations,
            "stage2_steps": self.args.stage2_steps,
            "max_epoch_length": 200,
            "val_interval": 10**9,
            "progress": False,
            "seed": self.seed,
            "run_dir": str(folder),
            "ckpt_dir": str(folder),
        }

    def trained(self, round_: int, labeled: list[str], pool: list[str], validation: list[str]) -> dict:
        """
        One round's training, validation metrics and disagreement scores of the unlabeled pool (skipped when its
        ``result.json`` exists). Round 0 is the same for every strategy and is trained once per seed.
        """
        root = Path(self.args.out).resolve()
        folder = root / f"seed{self.seed}" / "round0" if round_ == 0 else self.out / f"round{round_}"
        result_file = folder / "result.json"
        if result_file.is_file():
            return json.loads(result_file.read_text(encoding="utf-8"))
        unlabeled = [case for case in pool if case not in labeled]
        datalist = build_datalist(self.data_dir, "uamt_h5", labeled=labeled, unlabeled=unlabeled, validation=validation)
        datalist_file = folder / "datalist.json"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(datalist_file, datalist)
        workflow = training_workflow(self.bundle, self.overrides(folder, datalist_file))
        start = time.perf_counter()
        for step in ("data check", "initial weights", "stage 1", "bootstrap", "stage 2"):
            run_training_step(workflow, step)
        train_s = time.perf_counter() - start
        network, inferer, load = (parsed(workflow, k) for k in ("network", "inferer", "load_volume"))
        items = resolve_datalist(datalist, self.data_dir)
        metrics = evaluate(network, inferer, items["validation"], load, self.device)
        result = {**metrics, "labeled": labeled, "train_s": train_s, "folder": str(folder)}
        atomic_write_json(result_file, result)
        dice = 100 * metrics["summary"]["dice"]["mean"]
        logger.info(f"seed {self.seed} round {round_} ({len(labeled)} labeled, {folder}): Dice {dice:.2f}")
        return result

    def scores(self, result: dict, pool: list[str]) -> dict[str, float]:
        """The disagreement of the round's model on every unlabeled study of the pool (kept in ``scores.json`` of
        the round's folder; only the strategies that rank by it ask)."""
        folder = Path(result["folder"])
        kept = folder / "scores.json"
        if kept.is_file():
            return json.loads(kept.read_text(encoding="utf-8"))["scores"]
        workflow = training_workflow(self.bundle, self.overrides(folder, folder / "datalist.json"))
        network, inferer, load = (parsed(workflow, k) for k in ("network", "inferer", "load_volume"))
        load_weights(network, folder / "model.pt", map_location=self.device)
        network.eval()
        start = time.perf_counter()
        unlabeled = [case for case in pool if case not in result["labeled"]]
        items = resolve_datalist(build_datalist(self.data_dir, "uamt_h5", unlabeled=unlabeled), self.data_dir)
        scores = {
            item["case_id"]: ple_disagreement(
                network, load({"image": item["image"], "case_id": item["case_id"]})["image"].to(self.device), inferer
            )
            for item in items["unlabeled"]
        }
        atomic_write_json(kept, {"scores": scores, "score_s": time.perf_counter() - start})
        return scores

    def run(self, pool: list[str], validation: list[str]) -> list[dict]:
        """Every round of the strategy: its training result and the studies it picked after it."""
        labeled, results = list(pool[: self.args.start]), []
        for round_ in range(self.args.rounds + 1):
            result = self.trained(round_, labeled, pool, validation)
            if round_ == self.args.rounds:  # the last round: evaluated, nothing more to label
                results.append({**result, "picked": [], "scores": {}})
                break
            unlabeled = [case for case in pool if case not in labeled]
            scores = self.scores(result, pool) if self.strategy == "ple_disagreement" else {}
            picked = pick(self.strategy, unlabeled, self.args.add, self.seed, round_, scores)
            results.append({**result, "picked": picked, "scores": scores})
            labeled = sorted(set(labeled) | set(picked), key=pool.index)
        atomic_write_json(self.out / "rounds.json", [{k: r[k] for k in ("labeled", "picked")} for r in results])
        return results


def table(results: dict[str, dict[int, list[dict]]]) -> tuple[str, dict]:
    """Mean validation Dice per strategy and round over cases and the seeds that every strategy has finished that
    round for (an unfinished seed never mixes into a row), and the per-case paired difference against ``random``
    (same seed, round and case)."""
    lines = [
        "| strategy | "
        + " | ".join(f"round {r}" for r in range(max(len(v) for s in results.values() for v in s.values())))
        + " |"
    ]
    lines.append("|---|" + "---|" * (len(lines[0].split("|")) - 3))
    figures: dict[str, Any] = {}
    for strategy, seeds in results.items():
        rounds = max(len(v) for v in seeds.values())
        cells, per_round = [], []
        for r in range(rounds):
            paired = [s for s in seeds if all(len(other.get(s, [])) > r for other in results.values())]
            dice = [row["dice"] for seed in paired for row in seeds[seed][r]["cases"]]
            mean = 100 * statistics.fmean(dice) if dice else float("nan")
            diffs = []
            if strategy != "random" and "random" in results:
                for seed in paired:
                    ref = {row["case_id"]: row["dice"] for row in results["random"][seed][r]["cases"]}
                    diffs += [100 * (row["dice"] - ref[row["case_id"]]) for row in seeds[seed][r]["cases"]]
            gain = f" ({statistics.fmean(diffs):+.2f})" if diffs else ""
            cells.append(f"{mean:.2f}{gain}")
            per_round.append(
                {"dice": mean, "paired_gain_vs_random": statistics.fmean(diffs) if diffs else None, "seeds": paired}
            )
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
        figures[strategy] = per_round
    return "\n".join(lines), figures


def collected(out: Path) -> dict[str, dict[int, list[dict]]]:
    """Every finished round under ``out`` by strategy and seed (round 0 from the seed's shared folder), in order."""
    results: dict[str, dict[int, list[dict]]] = {}
    for strategy in STRATEGIES:
        for folder in sorted((out / strategy).glob("seed*"), key=lambda f: int(f.name[4:])):
            seed = int(folder.name[4:])
            files = [out / f"seed{seed}" / "round0" / "result.json"]
            files += sorted(folder.glob("round*/result.json"), key=lambda f: int(f.parent.name[5:]))
            rounds = [json.loads(f.read_text(encoding="utf-8")) for f in files if f.is_file()]
            if rounds:
                results.setdefault(strategy, {})[seed] = rounds
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default=None, help="UA-MT layout folder (<case>/mri_norm2.h5) with train.list")
    p.add_argument("--out", default="active_learning_runs", help="benchmark folder (rerun to resume)")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--start", type=int, default=2, help="labeled studies of round 0 (the pool's first)")
    p.add_argument("--add", type=int, default=2, help="studies labeled per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num_validation", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--features", default="8,16,32,64,128")
    p.add_argument("--stage1_iterations", type=int, default=1000)
    p.add_argument("--stage2_steps", type=int, default=600)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny synthetic smoke run (no real data needed)")
    p.add_argument(
        "--report", action="store_true", help="train nothing: rebuild table.md / table.json from the rounds under --out"
    )
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.strategies = [s.strip() for s in str(args.strategies).split(",") if s.strip()]
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        raise SystemExit(f"unknown strategies {unknown}; known: {', '.join(STRATEGIES)}")
    args.features = tuple(int(f) for f in str(args.features).split(",") if f.strip())
    if args.quick:
        args.num_validation, args.image_size, args.features = (
            QUICK["num_validation"],
            QUICK["image_size"],
            QUICK["features"],
        )
        args.stage1_iterations, args.stage2_steps, args.rounds, args.start, args.add = 4, 4, 1, 2, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    if args.report:
        results = collected(out)
        text, figures = table(results)
        atomic_write_text(out / "table.md", text + "\n")
        seeds = sorted({seed for seeds in results.values() for seed in seeds})
        atomic_write_json(out / "table.json", {"figures": figures, "settings": {**vars(args), "seeds": seeds}})
        print(text)
        return results
    data_dir = data_folder(args, out, QUICK)
    split = split_ids(data_dir / "train.list", 0, args.num_validation)
    pool, validation = split["unlabeled"], split["validation"]
    atomic_write_json(out / "settings.json", {**vars(args), "pool": pool, "validation": validation})
    results: dict[str, dict[int, list[dict]]] = {}
    for seed in args.seeds:
        for strategy in args.strategies:
            results.setdefault(strategy, {})[seed] = Loop(args, data_dir, strategy, seed).run(pool, validation)
            text, figures = table(results)
            atomic_write_text(out / "table.md", text + "\n")
            atomic_write_json(out / "table.json", {"figures": figures, "settings": {**vars(args), "seeds": args.seeds}})
    print(text)
    return results


if __name__ == "__main__":
    main()
