#!/usr/bin/env python
"""
How much MLB-Seg's meta-gradient tells about which initial-label pixels are right, on real left-atrium MRI.

MLB-Seg trusts a pixel's label when its loss gradient agrees with the clean data's (``x = -dL_meta/d eps > 0``).
This script measures that signal directly, without training: from the stage-1 weights of a
``benchmarks/experiments/real_la.py`` folder, it runs the look-ahead on ``--slices`` unlabeled slices (their five
PLE views, student in train mode as in stage 2, the reference's SGD settings) against clean batches of several sizes,
and compares ``x`` with the ground truth of the unlabeled slices (never used for training; ``train.list`` cases only):

- ``auc``: the probability that a right initial-label pixel has a larger ``x`` than a wrong one (0.5: no signal);
- ``p_pos_right`` / ``p_pos_wrong``: the share of right / wrong pixels with ``x > 0`` (the pixels MLB-Seg trusts);
- ``weight_ratio``: mean reference weight ``relu(x)`` on a wrong pixel over that on a right one (> 1: the wrong
  labels get more weight);
- ``p_pos_fg`` / ``p_pos_bg``: the share of pixels labelled foreground / background with ``x > 0``.

Each is given over all pixels and over the band within 3 pixels of the initial label's boundary, where the wrong
labels are. Usage (after ``real_la.py`` has trained stage 1 of the seed)::

    python -m benchmarks.experiments.meta_signal --data_dir /data/LA --out runs/la64s4k --seed 0 --image_size 64 \\
        --features 8,16,32,64,128 --clean_batches 2,8,32
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.metrics import compute_roc_auc

from monai_mlbseg.data import SliceDataset
from monai_mlbseg.engines import load_weights
from monai_mlbseg.meta import MetaLookAhead
from monai_mlbseg.recipe import parsed, training_workflow
from monai_mlbseg.transforms import PLEViews, warp_to_views
from monai_mlbseg.utils import atomic_write_json

from .real_la import VARIANTS, Benchmark


def auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counted half (MONAI's ``compute_roc_auc``); NaN: one class."""
    if positive.all() or not positive.any():
        return float("nan")
    return float(compute_roc_auc(scores.flatten().double(), positive.flatten().long()))


def boundary_band(label: torch.Tensor, width: int = 3) -> torch.Tensor:
    """Pixels within ``width`` of the boundary of the binary ``label`` ``[N, 1, H, W]``."""
    k = 2 * width + 1
    near_fg = F.max_pool2d(label, k, stride=1, padding=width) > 0
    near_bg = F.max_pool2d(1 - label, k, stride=1, padding=width) > 0
    return near_fg & near_bg


def signal_stats(x: torch.Tensor, label: torch.Tensor, gt: torch.Tensor) -> dict[str, float]:
    """The figures of the module docstring for the raw meta-gradient ``x`` of one label source."""
    right = label == gt
    positive = x > 0
    weight = torch.relu(x)
    fg = label > 0.5

    def share(mask: torch.Tensor) -> float:
        return float(positive[mask].float().mean()) if mask.any() else float("nan")

    mean_right = float(weight[right].mean()) if right.any() else float("nan")
    mean_wrong = float(weight[~right].mean()) if (~right).any() else float("nan")
    return {
        "pixels": int(x.numel()),
        "wrong_fraction": float((~right).float().mean()),
        "auc": auc(x, right),
        "p_pos_right": share(right),
        "p_pos_wrong": share(~right),
        "weight_ratio": mean_wrong / mean_right if mean_right > 0 else float("nan"),
        "p_pos_fg": share(fg),
        "p_pos_bg": share(~fg),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", required=True, help="UA-MT layout folder with train.list")
    p.add_argument(
        "--out", required=True, help="a benchmarks/experiments/real_la.py folder whose stage 1 of --seed is done"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_labeled", type=int, default=4)
    p.add_argument("--num_validation", type=int, default=16)
    p.add_argument("--image_size", type=int, default=96)
    p.add_argument("--features", default="16,32,64,128,256")
    p.add_argument("--slices", type=int, default=24, help="unlabeled slices (with ground-truth foreground)")
    p.add_argument("--clean_batches", default="2,8,32", help="clean-batch sizes of the meta loss (reference: 2)")
    p.add_argument("--lr", type=float, default=0.005, help="the look-ahead's SGD learning rate (reference 0.005)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    args.features = tuple(int(f) for f in args.features.split(",") if f.strip())
    args.clean_batches = [int(b) for b in args.clean_batches.split(",") if b.strip()]
    # the settings of real_la.py's folder that the bundle workflow reads (stage 1 itself is done and not rerun)
    args.lr1, args.lr2, args.stage1_batch, args.stage1_iterations, args.epoch_length = 0.01, args.lr, 4, 1, 50
    args.stage2_iterations = 1
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir, out = Path(args.data_dir), Path(args.out)
    if not (out / f"seed{args.seed}" / "stage1" / "result.json").is_file():
        raise SystemExit(
            f"{out}: stage 1 of seed {args.seed} is not done; run python -m benchmarks.experiments.real_la first"
        )
    bench = Benchmark(args, data_dir, data_dir / "train.list")
    weights, _ = bench.stage1(args.seed)
    # the bundle's stage-2 data (the folder's initial labels, the labeled slices with the bundle's augmentation)
    workflow = training_workflow(bench.bundle, bench.stage2_overrides(args.seed, "d_mlbseg", VARIANTS["d_mlbseg"]))
    network = parsed(workflow, "network")
    load_weights(network, weights)
    network.train()  # stage 2's mode: BatchNorm normalises with the batch of views
    optimizer = torch.optim.SGD(network.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    lookahead = MetaLookAhead(network, optimizer)
    load, prep, clean = (parsed(workflow, k) for k in ("load_volume", "slice_preprocessing", "train#dataset"))
    unlabeled_ds = SliceDataset(parsed(workflow, "bootstrap#items"), load, prep, None, progress=False)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(unlabeled_ds), generator=generator).tolist()
    picked = [s for s in (unlabeled_ds[i] for i in order[: 20 * args.slices]) if s["gt"].sum() >= 20][: args.slices]
    views = PLEViews(2).set_random_state(args.seed)
    collected: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {b: [] for b in args.clean_batches}
    for n, sample in enumerate(picked):
        image = sample["image"][None].float().to(bench.device)
        v = views(image)
        label = warp_to_views(sample["label"][None].float().to(bench.device), views.params, threshold=0.5)
        gt = warp_to_views(sample["gt"][None].float().to(bench.device), views.params, threshold=0.5)
        for size in args.clean_batches:
            idx = torch.randint(len(clean), (size,), generator=generator).tolist()
            clean = [clean[i] for i in idx]
            cv = views(torch.stack([c["image"] for c in clean]).float().to(bench.device))
            cl = warp_to_views(
                torch.stack([c["label"] for c in clean]).float().to(bench.device), views.params, threshold=0.5
            )
            x = lookahead(v, [label], cv, cl).neg_meta_grad
            collected[size].append((x.cpu(), label.cpu(), gt.cpu()))
        print(f"slice {n + 1}/{len(picked)}", flush=True)
    results = {}
    for size, parts in collected.items():
        x, label, gt = (torch.cat(t) for t in zip(*parts))
        band = boundary_band(label)
        results[str(size)] = {
            "all": signal_stats(x.flatten(), label.flatten(), gt.flatten()),
            "band": signal_stats(x[band], label[band], gt[band]),
        }
    figures = {"settings": {k: v for k, v in vars(args).items()}, "slices": len(picked), "clean_batches": results}
    atomic_write_json(out / f"seed{args.seed}" / "meta_signal.json", figures)
    head = (
        "| clean batch | pixels | wrong | AUC right>wrong | P(x>0) right | P(x>0) wrong | weight wrong/right "
        "| P(x>0) fg | P(x>0) bg |"
    )
    print(head + "\n|" + "---|" * 9)
    for size, parts in results.items():
        for where, s in parts.items():
            print(
                f"| {size} ({where}) | {s['pixels']} | {s['wrong_fraction']:.3f} | {s['auc']:.3f} | "
                f"{s['p_pos_right']:.3f} | {s['p_pos_wrong']:.3f} | {s['weight_ratio']:.2f} | {s['p_pos_fg']:.3f} | "
                f"{s['p_pos_bg']:.3f} |"
            )
    return figures


if __name__ == "__main__":
    main()
