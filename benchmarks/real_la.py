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

    python benchmarks/real_la.py --data_dir /data/LA --out runs/real_la                # the default table
    python benchmarks/real_la.py --data_dir /data/LA --out runs/la64 --image_size 64 \\
        --variants a,d,f --variant 'f_lr=d_mlbseg:{"lr": 0.002}'                       # exploration
    python benchmarks/real_la.py --quick --out /tmp/smoke                              # synthetic smoke run
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
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.handlers import LrScheduleHandler
from monai.transforms import KeepLargestConnectedComponent
from monai.utils import set_determinism

from monai_mlbseg.data import (
    SliceDataset,
    build_datalist,
    load_volume_transforms,
    make_synthetic_dataset,
    read_case_list,
    resolve_datalist,
)
from monai_mlbseg.engines import (
    STAGE2_METHODS,
    AtomicCheckpointSaver,
    GroundTruthMonitor,
    MetaTrainer,
    MetaWeighting,
    NonFiniteLossGuard,
    ResumeFromCheckpoint,
    TwoSteps,
    bootstrap_labels,
    initial_label_items,
    run_stage,
    stage2_method,
)
from monai_mlbseg.evaluation import SegmentationReport
from monai_mlbseg.inferers import SliceResizeInferer
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.pipeline import slice_augmentation, slice_preprocessing
from monai_mlbseg.transforms import StrongIntensityAugment
from monai_mlbseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger("real_la")

#: the rows of the table: a named method of :py:data:`~monai_mlbseg.engines.STAGE2_METHODS` (``method``), trainer
#: options on top of it (``trainer``, the JSON form of :py:data:`TRAINER_OPTIONS`) and benchmark options.
VARIANTS: dict[str, dict[str, Any]] = {
    "a_labeled_only": {"method": "labeled_only", "trainer": {}},
    "b_self_training": {"method": "self_training", "trainer": {}},
    "c_mean_teacher": {"method": "mean_teacher", "trainer": {}},
    "d_mlbseg": {"method": "mlbseg", "trainer": {}},
    "e_reuse_meta_grad": {"method": "mlbseg", "trainer": {"reuse_meta_grad": True}},
    "e_meta_params_last": {"method": "mlbseg", "trainer": {"meta_params": "LAST"}},
    "f_weak_to_strong": {"method": "weak_to_strong", "trainer": {}},
}

#: the trainer options a variant may set, in JSON form: the method's ``grad_clip``; ``student_augment`` /
#: ``clean_augment`` as the arguments of :py:class:`~monai_mlbseg.transforms.StrongIntensityAugment` (or ``null``);
#: MLB-Seg's fast modes ``reuse_meta_grad`` (bool) and ``meta_params`` (names, or ``"LAST"``: the last decoder block)
TRAINER_OPTIONS = ("grad_clip", "student_augment", "clean_augment", "reuse_meta_grad", "meta_params")

#: benchmark-level options a variant may set (the rest go to :py:class:`MetaTrainer`)
RUN_OPTIONS = ("lr", "unlabeled_batch", "clean_batch", "supervised", "iterations_factor", "initial_labels")

#: ``initial_labels`` of a variant: how the stage-1 predictions become the initial labels of the unlabeled volumes
INITIAL_LABELS = ("raw", "largest_component")

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
    unknown = sorted(set(trainer) - set(TRAINER_OPTIONS))
    if unknown:
        raise ValueError(
            f"variant {text!r}: unknown options {unknown}; known: {', '.join(TRAINER_OPTIONS + RUN_OPTIONS)}"
        )
    run = {k: v for k, v in base_spec.items() if k != "trainer"}
    run.update({k: v for k, v in extra.items() if k in RUN_OPTIONS})
    if run.get("initial_labels", "raw") not in INITIAL_LABELS:
        raise ValueError(f"variant {text!r}: initial_labels must be one of {INITIAL_LABELS}")
    return name.strip(), {**run, "trainer": trainer}


def split_ids(train_list: Path, num_labeled: int, num_validation: int) -> dict[str, list[str]]:
    """labeled = the first ``num_labeled`` ids, validation = the last ``num_validation``, unlabeled = the rest."""
    ids = read_case_list(train_list)
    if num_labeled + num_validation >= len(ids):
        raise SystemExit(f"{train_list}: {len(ids)} cases, too few for {num_labeled} labeled + {num_validation} val.")
    return {
        "labeled": ids[:num_labeled],
        "unlabeled": ids[num_labeled : len(ids) - num_validation],
        "validation": ids[len(ids) - num_validation :],
    }


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

    KEYS = (
        "dice_initial_gt",
        "dice_pseudo_gt",
        "dice_pred_gt",
        "weight_initial",
        "weight_pseudo",
        "weight_initial_when_wrong",
        "weight_initial_when_right",
    )

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        out = engine.state.output
        self.rows.append({k: float(out[k]) for k in self.KEYS if k in out})

    def summary(self, window: int = 100) -> dict[str, dict[str, float]]:
        """Mean of every scalar over the first and the last ``window`` iterations (NaNs skipped)."""

        def mean(rows: list[dict[str, float]], key: str) -> float:
            values = [r[key] for r in rows if key in r and math.isfinite(r[key])]
            return statistics.fmean(values) if values else math.nan

        parts = {"first": self.rows[:window], "last": self.rows[-window:]}
        return {part: {k: mean(rows, k) for k in self.KEYS} for part, rows in parts.items()}


class Benchmark:
    """One benchmark folder: data split, stage 1 per seed, and the stage-2 variants."""

    def __init__(self, args: argparse.Namespace, data_dir: Path, train_list: Path) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        ids = split_ids(train_list, args.num_labeled, args.num_validation)
        datalist = build_datalist(data_dir, "uamt_h5", **ids)
        self.datalist = resolve_datalist(datalist, data_dir)
        size = (args.image_size, args.image_size)
        self.load = load_volume_transforms("uamt_h5", keys=("image", "label", "gt"))
        self.prep = slice_preprocessing(size)
        self.augment = slice_augmentation()
        self.inferer = SliceResizeInferer(roi_size=size, sw_batch_size=64)
        self.clean = SliceDataset(self.datalist["labeled"], self.load, self.prep, self.augment, progress=False)

    def network(self) -> torch.nn.Module:
        return NestedUNet(2, 1, 1, features=self.args.features).to(self.device)

    def stage1(self, seed: int) -> tuple[Path, list[dict], dict]:
        """Stage 1 and the bootstrap of one seed; returns the weights, the unlabeled items and its result."""
        args, folder = self.args, self.out / f"seed{seed}" / "stage1"
        weights, result_file = folder / "stage1.pt", folder / "result.json"
        unlabeled = initial_label_items(self.datalist["unlabeled"], folder / "initial_labels")
        if not result_file.is_file():
            set_determinism(seed=seed)
            network = self.network()
            optimizer = torch.optim.SGD(network.parameters(), lr=args.lr1, momentum=0.9, weight_decay=5e-4)
            save = {"network": network, "optimizer": optimizer}
            epoch_length = min(200, args.stage1_iterations)
            trainer = SupervisedTrainer(
                device=self.device,
                max_epochs=math.ceil(args.stage1_iterations / epoch_length),
                epoch_length=epoch_length,
                train_data_loader=DataLoader(self.clean, batch_size=args.stage1_batch, shuffle=True, drop_last=True),
                network=network,
                optimizer=optimizer,
                loss_function=torch.nn.BCEWithLogitsLoss(),
                train_handlers=[ResumeFromCheckpoint(folder / "checkpoints", save), NonFiniteLossGuard()],
            )
            AtomicCheckpointSaver(
                str(folder / "checkpoints"), save, save_interval=100, epoch_level=False, n_saved=1, save_final=True
            ).attach(trainer)
            start = time.perf_counter()
            run_stage(trainer, weights)
            train_s = time.perf_counter() - start
            logger.info(f"seed {seed}: stage 1 done in {train_s:.0f} s")
            metrics = evaluate(network, self.inferer, self.datalist["validation"], self.load, self.device)
            start = time.perf_counter()
            bootstrap_labels(network, self.inferer, unlabeled, self.load, device=self.device, progress=False)
            atomic_write_json(
                result_file,
                {
                    **metrics,
                    "train_s": train_s,
                    "bootstrap_s": time.perf_counter() - start,
                    "iterations": trainer.state.iteration,
                },
            )
        result = json.loads(result_file.read_text(encoding="utf-8"))
        logger.info(f"seed {seed}: stage 1 validation Dice {100 * result['summary']['dice']['mean']:.2f}")
        return weights, unlabeled, result

    def largest_component_labels(self, seed: int, weights: Path) -> list[dict]:
        """The initial labels of one seed with only their largest 3D connected component kept (bootstrapped once)."""
        folder = self.out / f"seed{seed}" / "stage1" / "initial_labels_largest_component"
        items = initial_label_items(self.datalist["unlabeled"], folder)
        if not all(Path(item["label"]).is_file() for item in items):
            network = self.network()
            network.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
            postprocess = KeepLargestConnectedComponent()
            bootstrap_labels(
                network, self.inferer, items, self.load, self.device, progress=False, postprocess=postprocess
            )
        return items

    def trainer_parts(self, method: str, options: dict[str, Any], teacher: torch.nn.Module) -> dict[str, Any]:
        """The ``MetaTrainer`` parts of ``method`` with a variant's JSON ``options`` (:py:data:`TRAINER_OPTIONS`)."""
        options = dict(options)
        reuse, meta_params = options.pop("reuse_meta_grad", False), options.pop("meta_params", None)
        for key in ("student_augment", "clean_augment"):
            if isinstance(options.get(key), dict):
                options[key] = StrongIntensityAugment(**options[key])
        if reuse:
            options["schedule"] = TwoSteps(reuse_meta_grad=True)
        if meta_params is not None:
            last = [f"nodes.conv0_{len(self.args.features) - 1}", "final"]
            options["weighting"] = MetaWeighting(last if meta_params == "LAST" else meta_params)
        return stage2_method(method, teacher, **options)

    def stage2(self, seed: int, name: str, spec: dict[str, Any], weights: Path, unlabeled: list[dict]) -> dict:
        """One stage-2 variant of one seed (skipped when its ``result.json`` exists)."""
        args, folder = self.args, self.out / f"seed{seed}" / name
        result_file = folder / "result.json"
        if result_file.is_file():
            return json.loads(result_file.read_text(encoding="utf-8"))
        if spec.get("initial_labels", "raw") == "largest_component":
            unlabeled = self.largest_component_labels(seed, weights)
        set_determinism(seed=seed + 1)
        network, teacher = self.network(), self.network()
        network.load_state_dict(torch.load(weights, map_location=self.device, weights_only=True))
        lr = float(spec.get("lr", args.lr2))
        optimizer = torch.optim.SGD(network.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        method = spec.get("method", "mlbseg")
        supervised = bool(spec.get("supervised", False)) or STAGE2_METHODS[method].labeled_only
        parts = self.trainer_parts(method, spec["trainer"], teacher)
        steps_per_iteration = 1 if supervised else parts["schedule"].steps_per_iteration
        # equal budgets in optimizer steps: a one-step variant runs twice the iterations of a two-step one
        iterations = int(args.stage2_iterations * 2 / steps_per_iteration * float(spec.get("iterations_factor", 1.0)))
        epoch_length = min(args.epoch_length, iterations)
        epochs = math.ceil(iterations / epoch_length)
        # the reference's per-epoch decay lr * 20 / (e + 20), over the reference's 120 epochs spread on this budget
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 20.0 / (e * 120.0 / max(epochs, 1) + 20.0))
        save = {"network": network, "teacher": teacher, "optimizer": optimizer, "lr_scheduler": scheduler}
        unlabeled_ds = SliceDataset(unlabeled, self.load, self.prep, self.augment, progress=False)
        monitor = MonitorLog()
        trainer = MetaTrainer(
            device=self.device,
            max_epochs=epochs,
            epoch_length=epoch_length,
            train_data_loader=[]
            if supervised
            else DataLoader(unlabeled_ds, batch_size=int(spec.get("unlabeled_batch", 1)), shuffle=True, drop_last=True),
            clean_data_loader=DataLoader(
                self.clean, batch_size=int(spec.get("clean_batch", 2)), shuffle=True, drop_last=True
            ),
            network=network,
            optimizer=optimizer,
            train_handlers=[
                ResumeFromCheckpoint(folder / "checkpoints", save),
                LrScheduleHandler(scheduler, print_lr=False),
                monitor,
                GroundTruthMonitor(),
            ],
            **parts,
        )
        trainer.set_random_state(seed)
        AtomicCheckpointSaver(
            str(folder / "checkpoints"), save, save_interval=100, epoch_level=False, n_saved=1, save_final=True
        ).attach(trainer)
        start = time.perf_counter()
        run_stage(trainer, folder / "model.pt", skip_if_done=False)
        train_s = time.perf_counter() - start
        metrics = evaluate(network, self.inferer, self.datalist["validation"], self.load, self.device)
        result = {
            **metrics,
            "train_s": train_s,
            "iterations": iterations,
            "optimizer_steps": iterations * steps_per_iteration,
            "spec": spec,
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


def table(results: dict[int, dict[str, dict]], control: str = "a_labeled_only") -> tuple[str, dict]:
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
        }
        figures[name] = fig

        def pm(key: str, scale: float = 1.0, fig: dict = fig) -> str:
            return f"{scale * fig[key][0]:.2f} ± {scale * fig[key][1]:.2f}" if key in fig else "-"

        delta = "-" if name == control or not deltas else f"{fig['delta_dice']:+.2f} ({wins}/{len(deltas)} better)"
        rows.append(
            f"| {name} | {', '.join(map(str, seeds))} | {pm('dice', 100)} | {pm('jaccard', 100)} | "
            f"{pm('hd95_voxel')} | {pm('asd_voxel')} | {delta} | {fig['train_s']:.0f} |"
        )
    head = (
        "| variant | seeds | Dice (%) | Jaccard (%) | 95HD (voxel) | ASD (voxel) | Dice vs (a), per case | "
        "stage-2 wall (s) |\n|---|---|---|---|---|---|---|---|"
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
        default="a_labeled_only",
        help="with --report: the row the per-case differences are taken against (default the control (a))",
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


def write_table(out: Path, results: dict[int, dict[str, dict]], settings: dict, control: str = "a_labeled_only") -> str:
    """
    Write the table of ``results`` into ``out`` (``table.md``, ``table.json``; ``table_vs_<control>.*`` for another
    control than ``a_labeled_only``); returns the markdown.
    """
    text, figures = table(results, control)
    stem = "table" if control == "a_labeled_only" else f"table_vs_{control}"
    atomic_write_text(out / f"{stem}.md", text.replace("vs (a)", f"vs {control}") + "\n")
    payload = {"figures": figures, "control": control, "settings": settings | {"seeds": list(results)}}
    atomic_write_json(out / f"{stem}.json", payload)
    return text if control == "a_labeled_only" else text.replace("vs (a)", f"vs {control}")


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
    if args.quick:
        data_dir = out / "data"
        if not (data_dir / "train.list").is_file():
            ids = make_synthetic_dataset(data_dir, "uamt_h5", num_cases=QUICK["num_cases"], shape=QUICK["volume_shape"])
            atomic_write_text(data_dir / "train.list", "\n".join(ids) + "\n")
    elif args.data_dir is None:
        raise SystemExit("--data_dir is required (or --quick)")
    else:
        data_dir = Path(args.data_dir)
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
        weights, unlabeled, stage1 = bench.stage1(seed)
        results[seed] = {"stage1": stage1}
        for name, spec in variants.items():
            results[seed][name] = bench.stage2(seed, name, spec, weights, unlabeled)
        text = write_table(out, results, vars(args))
    print(text)
    return results


if __name__ == "__main__":
    main()
