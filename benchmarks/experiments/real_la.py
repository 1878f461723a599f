#!/usr/bin/env python
"""
Stage-2 variants on real left-atrium MRI (UA-MT HDF5 layout), from one stage 1 per seed, with equal budgets.

The split is UA-MT's ``train.list`` only: labeled = its first ``--num_labeled`` cases, validation = its last
``--num_validation``, unlabeled = the rest (``test.list`` is never read). For every seed the script trains stage 1
on the labeled slices, bootstraps initial labels for the unlabeled volumes, then trains every variant from those
same stage-1 weights, reseeded identically, for the same number of optimizer steps (MLB-Seg's iteration takes two
steps, a weighted and a clean one; the labeled-only control takes one, so it runs twice the iterations). Each
variant is evaluated (Dice, Jaccard, 95HD, ASD in voxels, per 3D volume) on the validation volumes; the table
gives mean +- std over the cases of all seeds and the per-case paired difference against the control (a).

Resumable: every stage writes its checkpoints, weights and ``result.json``; a rerun skips what is done and
continues an interrupted stage from its last checkpoint. The table (``table.md``, ``table.json``) is rebuilt from
the result files at the end of every run.

Usage::

    python -m benchmarks.experiments.real_la --data_dir /data/LA --out runs/real_la                # the default table
    python -m benchmarks.experiments.real_la --data_dir /data/LA --out runs/la64 --image_size 64 \\
        --variants a,d,f --variant 'f_lr=d_mlbseg:{"lr": 0.002}'                       # exploration
    python -m benchmarks.experiments.real_la --quick --out /tmp/smoke                              # synthetic smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Events

from monai_mlbseg.bundles import write_bundle
from monai_mlbseg.data import build_datalist, make_synthetic_dataset, read_case_list, resolve_datalist
from monai_mlbseg.engines import load_weights, run_stage
from monai_mlbseg.evaluation import SegmentationReport
from monai_mlbseg.recipe import (
    STAGE2_OPTIONS,
    parsed,
    reseed_stage2,
    run_training_step,
    trainer_overrides,
    training_workflow,
)
from monai_mlbseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger("real_la")

#: the rows of the table: a named method of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` (``method``), trainer
#: options on top of it (``trainer``, the JSON form of :py:data:`STAGE2_OPTIONS`) and benchmark options.
VARIANTS: dict[str, dict[str, Any]] = {
    "a_labeled_only": {"method": "labeled_only", "trainer": {}},
    "a_matched": {"method": "weak_to_strong", "trainer": {}, "control": True},
    "b_self_training": {"method": "self_training", "trainer": {}},
    "c_mean_teacher": {"method": "mean_teacher", "trainer": {}},
    "d_mlbseg": {"method": "mlbseg", "trainer": {}},
    "e_reuse_meta_grad": {"method": "mlbseg", "trainer": {"reuse_meta_grad": True}},
    "f_weak_to_strong": {"method": "weak_to_strong", "trainer": {}},
    "g_instance_meta": {"method": "instance_meta", "trainer": {}},
    "h_quality_guided": {"method": "quality_guided", "trainer": {}},
}

#: benchmark-level options a variant may set (the rest go to :py:class:`MetaTrainer`)
RUN_OPTIONS = ("lr", "unlabeled_batch", "clean_batch", "supervised", "iterations_factor", "control")

QUICK = {
    "num_cases": 10,
    "num_labeled": 2,
    "num_validation": 3,
    "volume_shape": (40, 36, 8),
    "image_size": 32,
    "features": (4, 8),
    "stage1_iterations": 4,
    "stage2_iterations": 3,
}


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name=base:{json}`` or ``name:{json}`` (options on top of ``base``, default ``d_mlbseg``)."""
    head, _, options = text.partition(":")
    name, _, base = head.partition("=")
    if not name.strip():
        raise ValueError(f"variant {text!r}: expected NAME[=BASE]:{{json options}}")
    extra = json.loads(options) if options.strip() else {}
    base_spec = VARIANTS.get((base or "d_mlbseg").strip())
    if base_spec is None:
        raise ValueError(f"variant {text!r}: unknown base {base!r}; known: {', '.join(VARIANTS)}")
    trainer = {**base_spec["trainer"], **{k: v for k, v in extra.items() if k not in RUN_OPTIONS}}
    unknown = sorted(set(trainer) - set(STAGE2_OPTIONS))
    if unknown:
        raise ValueError(
            f"variant {text!r}: unknown options {unknown}; known: {', '.join(STAGE2_OPTIONS + RUN_OPTIONS)}"
        )
    run = {k: v for k, v in base_spec.items() if k != "trainer"}
    run.update({k: v for k, v in extra.items() if k in RUN_OPTIONS})
    return name.strip(), {**run, "trainer": trainer}


def split_ids(train_list: Path, num_labeled: int, num_validation: int) -> dict[str, list[str]]:
    """labeled = the first ``num_labeled`` ids, validation = the last ``num_validation``, unlabeled = the rest (none
    for the all-labeled ceiling)."""
    ids = read_case_list(train_list)
    if num_labeled + num_validation > len(ids):
        raise SystemExit(f"{train_list}: {len(ids)} cases, too few for {num_labeled} labeled + {num_validation} val.")
    return {
        "labeled": ids[:num_labeled],
        "unlabeled": ids[num_labeled : len(ids) - num_validation],
        "validation": ids[len(ids) - num_validation :],
    }


def data_folder(args: argparse.Namespace, out: Path, quick: dict[str, Any]) -> Path:
    """``--data_dir``, or with ``--quick`` a synthetic UA-MT folder with its ``train.list`` under ``out/data``
    (``quick``: ``num_cases`` and ``volume_shape``), made once."""
    if args.quick:
        data_dir = out / "data"
        if not (data_dir / "train.list").is_file():
            ids = make_synthetic_dataset(data_dir, "uamt_h5", num_cases=quick["num_cases"], shape=quick["volume_shape"])
            atomic_write_text(data_dir / "train.list", "\n".join(ids) + "\n")
        return data_dir
    if args.data_dir is None:
        raise SystemExit("--data_dir is required (or --quick)")
    return Path(args.data_dir)


def evaluate(network: torch.nn.Module, inferer: Any, items: Sequence[dict], load: Any, device: torch.device) -> dict:
    """Per-case metrics (voxels) of ``network`` on ``items``: ``{"cases": [...], "summary": {...}}``."""
    report = SegmentationReport()
    network.eval()
    with torch.no_grad():
        for item in items:
            data = load({k: item[k] for k in ("image", "label", "case_id")})
            logits = inferer(data["image"].as_tensor()[None].to(device), network)
            report.add(item["case_id"], (torch.sigmoid(logits) > 0.5)[0, 0].cpu(), data["label"][0])
    network.train()
    return report.to_dict()


class MonitorLog:
    """Collects the trainer's monitoring scalars (agreement with the ground truth, weight mass) per iteration."""

    #: the output entries logged: Dice of the labels against the ground truth, weight mass and selection per source
    PREFIXES = ("dice_", "weight_", "auc_")

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        out = engine.state.output
        self.rows.append({k: float(v) for k, v in out.items() if k.startswith(self.PREFIXES)})

    def summary(self, window: int = 50) -> dict[str, dict[str, float]]:
        """Mean of every scalar over the first and the last ``window`` iterations (NaNs skipped)."""

        def mean(rows: list[dict[str, float]], key: str) -> float:
            values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            return statistics.fmean(values) if values else math.nan

        parts = {"first": self.rows[:window], "last": self.rows[-window:]}
        keys = sorted({k for row in self.rows for k in row})
        return {part: {k: mean(rows, k) for k in keys} for part, rows in parts.items()}


class Benchmark:
    """
    One benchmark folder: the data split, stage 1 per seed, and the stage-2 variants, every one trained by the
    left-atrium bundle's own training workflow (written to ``<out>/bundle``) through :py:mod:`monai_mlbseg.recipe`,
    with overrides for the sizes, lengths, learning rates, method and options: the table measures what the bundle
    ships.
    """

    def __init__(self, args: argparse.Namespace, data_dir: Path, train_list: Path) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ids = split_ids(train_list, args.num_labeled, args.num_validation)
        datalist_file = self.out / "datalist.json"
        datalist = build_datalist(data_dir, "uamt_h5", **ids)
        atomic_write_json(datalist_file, datalist)
        self.datalist = resolve_datalist(datalist, data_dir)
        self.bundle = write_bundle("mlbseg_la", self.out / "bundle")
        #: the overrides every workflow of the benchmark shares
        self.common = {
            "dataset_dir": str(data_dir),
            "data_format": "uamt_h5",
            "datalist_file": str(datalist_file),
            "image_size": [args.image_size, args.image_size],
            "features": list(args.features),
            "device": str(self.device),
            "num_workers": 0,
            "stage1_lr": args.lr1,
            "lr": args.lr2,
            "stage1_batch_size": args.stage1_batch,
            "val_interval": 10**9,  # the benchmark evaluates on the validation volumes itself, after training
            "progress": False,
        }

    def stage1_folder(self, seed: int) -> Path:
        return self.out / f"seed{seed}" / "stage1"

    def stage1_overrides(self, seed: int) -> dict[str, Any]:
        """The bundle overrides of one seed's stage 1 and bootstrap."""
        folder = self.stage1_folder(seed)
        return {
            **self.common,
            "stage1_iterations": self.args.stage1_iterations,
            "max_epoch_length": 200,
            "seed": seed,
            "run_dir": str(folder),
        }

    def stage2_overrides(self, seed: int, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        """The bundle overrides of one stage-2 variant of one seed (equal budgets in optimizer steps)."""
        folder, stage1 = self.out / f"seed{seed}" / name, self.stage1_folder(seed)
        method = spec.get("method", "mlbseg")
        control = bool(spec.get("control", False))
        supervised = bool(spec.get("supervised", False))
        steps = round(2 * self.args.stage2_iterations * float(spec.get("iterations_factor", 1.0)))
        options = dict(spec["trainer"])
        return {
            **self.common,
            "stage2_steps": steps,
            "max_epoch_length": self.args.epoch_length,
            **trainer_overrides(options),
            "seed": seed,
            "stage2_method": method,
            "lr": float(spec.get("lr", self.args.lr2)),
            "unlabeled_batch_size": int(spec.get("unlabeled_batch", 1)),
            "clean_batch_size": int(spec.get("clean_batch", 2)),
            "run_dir": str(folder),
            "ckpt_dir": str(folder),
            "stage1_dir": str(stage1),
            "use_unlabeled": not supervised,
            "stage2_control": control,
        }

    def stage1(self, seed: int) -> tuple[Path, dict]:
        """Stage 1 and the bootstrap of one seed through the bundle's workflow; returns the weights and the result."""
        folder = self.stage1_folder(seed)
        weights, result_file = folder / "stage1.pt", folder / "result.json"
        if not result_file.is_file():
            workflow = training_workflow(self.bundle, self.stage1_overrides(seed))
            run_training_step(workflow, "data check")
            start = time.perf_counter()
            if self.datalist["unlabeled"]:
                run_training_step(workflow, "stage 1")
            else:  # the all-labeled ceiling: the bundle skips stage 1 (nothing to bootstrap); the recipe is kept alike
                run_stage(parsed(workflow, "stage1#trainer"), parsed(workflow, "stage1#model"))
            train_s = time.perf_counter() - start
            logger.info(f"seed {seed}: stage 1 done in {train_s:.0f} s")
            network, inferer, load = (parsed(workflow, k) for k in ("network", "inferer", "load_volume"))
            metrics = evaluate(network, inferer, self.datalist["validation"], load, self.device)
            start = time.perf_counter()
            run_training_step(workflow, "bootstrap")
            atomic_write_json(
                result_file,
                {
                    **metrics,
                    "train_s": train_s,
                    "bootstrap_s": time.perf_counter() - start,
                    "iterations": parsed(workflow, "stage1#trainer").state.iteration,
                },
            )
        result = json.loads(result_file.read_text(encoding="utf-8"))
        logger.info(f"seed {seed}: stage 1 validation Dice {100 * result['summary']['dice']['mean']:.2f}")
        return weights, result

    def stage2(self, seed: int, name: str, spec: dict[str, Any], weights: Path) -> dict:
        """One stage-2 variant of one seed (skipped when its ``result.json`` exists)."""
        result_file = self.out / f"seed{seed}" / name / "result.json"
        if result_file.is_file():
            return json.loads(result_file.read_text(encoding="utf-8"))
        workflow = training_workflow(self.bundle, self.stage2_overrides(seed, name, spec))
        network = parsed(workflow, "network")
        load_weights(network, weights)
        trainer = parsed(workflow, "train#trainer")
        monitor = MonitorLog()
        monitor.attach(trainer)
        reseed_stage2(workflow, seed)
        start = time.perf_counter()
        run_training_step(workflow, "stage 2")
        train_s = time.perf_counter() - start
        inferer, load = parsed(workflow, "inferer"), parsed(workflow, "load_volume")
        metrics = evaluate(network, inferer, self.datalist["validation"], load, self.device)
        iterations = trainer.state.epoch_length * trainer.state.max_epochs
        steps_per_iteration = 1 if trainer.supervised_only else trainer.schedule.steps_per_iteration
        result = {
            **metrics,
            "train_s": train_s,
            "iterations": iterations,
            "optimizer_steps": iterations * steps_per_iteration,
            "spec": spec,
            "run_settings": trainer.run_settings,
            "monitor": monitor.summary(),
            "resumed": len(monitor.rows) < iterations,
        }
        atomic_write_json(result_file, result)
        logger.info(
            f"seed {seed} {name}: validation Dice {100 * metrics['summary']['dice']['mean']:.2f} in {train_s:.0f} s"
        )
        return result


def _case_values(result: dict, key: str) -> dict[str, float]:
    return {row["case_id"]: math.nan if row[key] is None else float(row[key]) for row in result["cases"]}


def _selection(results: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per label source, the mean over seeds of its weights' selection AUC (right vs wrong pixels, against the ground
    truth of the unlabeled scans) over the first and the last iterations of stage 2."""
    out: dict[str, dict[str, float]] = {}
    for part in ("first", "last"):
        monitors = [r.get("monitor", {}).get(part, {}) for r in results]
        keys = sorted({k for m in monitors for k in m if k.startswith("auc_")})
        for key in keys:
            values = [m[key] for m in monitors if key in m and math.isfinite(m[key])]
            if values:
                out.setdefault(key[len("auc_") :], {})[part] = statistics.fmean(values)
    return {k: v for k, v in out.items() if len(v) == 2}


def table(results: dict[int, dict[str, dict]], control: str = "a_matched") -> tuple[str, dict]:
    """Markdown table and figures: mean +- std over all (seed, case) pairs, paired difference against ``control``."""
    names: list[str] = []
    for per_seed in results.values():
        names += [n for n in per_seed if n not in names]
    rows, figures = [], {}
    for name in names:
        seeds = [s for s in results if name in results[s]]
        vals = {k: [] for k in ("dice", "jaccard", "hd95_voxel", "asd_voxel")}
        deltas, seed_means, wins = [], [], 0
        for s in seeds:
            res = results[s][name]
            for k in vals:
                vals[k] += [v for v in _case_values(res, k).values() if math.isfinite(v)]
            seed_means.append(100 * res["summary"]["dice"]["mean"])
            if control in results[s]:
                ref, own = _case_values(results[s][control], "dice"), _case_values(res, "dice")
                d = [100 * (own[c] - ref[c]) for c in own if c in ref]
                deltas += d
                wins += sum(x > 0 for x in d)
        fig = {
            "seeds": seeds,
            **{k: (statistics.fmean(v), statistics.pstdev(v)) for k, v in vals.items() if v},
            "dice_per_seed": seed_means,
            "delta_dice": statistics.fmean(deltas) if deltas else math.nan,
            "cases_better": wins,
            "cases": len(deltas),
            "train_s": statistics.fmean(results[s][name]["train_s"] for s in seeds),
            "selection": _selection([results[s][name] for s in seeds]),
        }
        figures[name] = fig

        def pm(key: str, scale: float = 1.0, fig: dict = fig) -> str:
            return f"{scale * fig[key][0]:.2f} ± {scale * fig[key][1]:.2f}" if key in fig else "-"

        delta = "-" if name == control or not deltas else f"{fig['delta_dice']:+.2f} ({wins}/{len(deltas)} better)"
        per_seed = " / ".join(f"{d:.2f}" for d in seed_means)
        selection = ", ".join(
            f"{source} {auc['first']:.2f} → {auc['last']:.2f}" for source, auc in fig["selection"].items()
        )
        rows.append(
            f"| {name} | {', '.join(map(str, seeds))} | {pm('dice', 100)} | {per_seed} | {pm('jaccard', 100)} | "
            f"{pm('hd95_voxel')} | {pm('asd_voxel')} | {delta} | {selection or '-'} | {fig['train_s']:.0f} |"
        )
    head = (
        f"| variant | seeds | Dice (%) | Dice per seed | Jaccard (%) | 95HD (voxel) | ASD (voxel) | Dice vs {control}, "
        "per case | selection AUC, first → last 50 iterations | stage-2 wall (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows), figures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default=None, help="UA-MT layout folder (<case>/mri_norm2.h5) with train.list")
    p.add_argument("--train_list", default=None, help="default: <data_dir>/train.list")
    p.add_argument("--out", default="real_la_runs", help="benchmark folder (rerun to resume)")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--num_labeled", type=int, default=4)
    p.add_argument("--num_validation", type=int, default=16)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--features", default="16,32,64,128,256")
    p.add_argument("--stage1_iterations", type=int, default=3000)
    p.add_argument("--stage1_batch", type=int, default=4)
    p.add_argument("--stage2_iterations", type=int, default=1000, help="iterations of a two-step variant")
    p.add_argument("--epoch_length", type=int, default=100, help="iterations per stage-2 epoch (lr schedule)")
    p.add_argument("--lr1", type=float, default=0.01, help="stage-1 learning rate")
    p.add_argument("--lr2", type=float, default=0.005, help="stage-2 learning rate (the reference's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS to run")
    p.add_argument("--variant", action="append", default=[], help="extra variant NAME[=BASE]:{json options}")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="tiny synthetic smoke run (no real data needed)")
    p.add_argument(
        "--report",
        action="store_true",
        help="train nothing: rebuild table.md / table.json from every result.json under --out (all seeds, all rows)",
    )
    p.add_argument(
        "--control",
        default="a_matched",
        help="with --report: the row the per-case differences are taken against (default a_matched: labeled-only "
        "training with the default method's perturbation and optimizer settings)",
    )
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.features = tuple(int(f) for f in str(args.features).split(",") if f.strip())
    if args.quick:
        for key in ("num_labeled", "num_validation", "image_size", "features", "stage1_iterations"):
            setattr(args, key, QUICK[key])
        args.stage2_iterations = QUICK["stage2_iterations"]
    return args


def collect_results(out: Path) -> dict[int, dict[str, dict]]:
    """Every ``seed<N>/<row>/result.json`` under ``out``, stage 1 first, the rows in the order they were finished."""
    results: dict[int, dict[str, dict]] = {}
    for seed_dir in sorted(out.glob("seed*"), key=lambda d: d.name):
        if not seed_dir.name[4:].isdigit() or not (seed_dir / "stage1" / "result.json").is_file():
            continue
        rows = sorted(seed_dir.glob("*/result.json"), key=lambda f: (f.parent.name != "stage1", f.stat().st_mtime))
        results[int(seed_dir.name[4:])] = {f.parent.name: json.loads(f.read_text(encoding="utf-8")) for f in rows}
    return results


def write_table(out: Path, results: dict[int, dict[str, dict]], settings: dict, control: str = "a_matched") -> str:
    """
    Write the table of ``results`` into ``out`` (``table.md``, ``table.json``; ``table_vs_<control>.*`` for another
    control than the default ``a_matched``, labeled-only training with the default method's perturbation and
    optimizer settings); returns the markdown.
    """
    text, figures = table(results, control)
    stem = "table" if control == "a_matched" else f"table_vs_{control}"
    atomic_write_text(out / f"{stem}.md", text + "\n")
    payload = {"figures": figures, "control": control, "settings": settings | {"seeds": list(results)}}
    atomic_write_json(out / f"{stem}.json", payload)
    return text


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.report:
        out = Path(args.out).resolve()
        results = collect_results(out)
        if not results:
            raise SystemExit(f"{out}: no seed<N>/stage1/result.json to report")
        print(write_table(out, results, {"report": True}, args.control))
        return results
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    data_dir = data_folder(args, out, QUICK)
    train_list = Path(args.train_list) if args.train_list else data_dir / "train.list"
    variants = {}
    for name in [v.strip() for v in args.variants.split(",") if v.strip()]:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        variants[name] = VARIANTS[name]
    for text in args.variant:
        name, spec = parse_variant(text)
        variants[name] = spec
    bench = Benchmark(args, data_dir, train_list)
    atomic_write_json(
        out / "settings.json",
        {k: v for k, v in vars(args).items()} | {"split": split_ids(train_list, args.num_labeled, args.num_validation)},
    )
    results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        weights, stage1 = bench.stage1(seed)
        results[seed] = {"stage1": stage1}
        for name, spec in variants.items():
            results[seed][name] = bench.stage2(seed, name, spec, weights)
        text = write_table(out, results, vars(args), args.control)
    print(text)
    return results


if __name__ == "__main__":
    main()
