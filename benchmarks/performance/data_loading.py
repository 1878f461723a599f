#!/usr/bin/env python
"""
Share of a real :py:class:`monai_mlbseg.engines.MetaTrainer` run spent waiting on ``DataLoader`` s of cached
:py:class:`monai_mlbseg.data.SliceDataset` s (figure (e) of ``docs/benchmarks.md``).

The unlabeled fetch is timed by the trainer's own ``GET_BATCH_STARTED``/``GET_BATCH_COMPLETED`` events; the clean
loader, which the trainer cycles inside the iteration, is passed wrapped in :py:class:`TimedLoader`.

Usage::

    python -m benchmarks.performance.data_loading                 # NestedUNet 16..256, 144 px, volumes 200x140x88
    python -m benchmarks.performance.data_loading --workers 0,2,4
    python -m benchmarks.performance.data_loading --quick         # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.data import DataLoader

from monai_mlbseg.data import SliceDataset, synthetic_case
from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.pipeline import slice_augmentation, slice_preprocessing

from .common import (
    FULL,
    benchmark_parser,
    build_network,
    finish,
    fmt_s,
    ints,
    median,
    parse_benchmark_args,
    sgd,
    start,
    sync,
)

KEEP_ALIVE: list = []  # loaders with persistent workers, kept until exit (see measure)


class TimedLoader:
    """Wraps a loader; records the time of ``iter()`` plus each ``next()``, i.e. of every batch fetch."""

    def __init__(self, loader: Iterable) -> None:
        self.loader = loader
        self.fetches: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator:
        start = time.perf_counter()
        iterator = iter(self.loader)
        pending = time.perf_counter() - start
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self.fetches.append(pending + time.perf_counter() - start)
            pending = 0.0
            yield batch


def volume(shape: Sequence[int], seed: int, initial: bool) -> dict:
    """A synthetic left-atrium volume ``[1, X, Y, Z]``; its label shifted when ``initial`` (an imperfect label)."""
    image, mask = synthetic_case(np.random.default_rng(seed), shape, kind="la")
    label = np.roll(mask, (3, -3), axis=(0, 1)) if initial else mask
    return {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(label)[None]}


def load_item(item: dict) -> dict:
    """The ``load`` of :py:class:`SliceDataset` for in-memory items (module level: picklable for workers)."""
    return {"image": item["image"], "label": item["label"]}


def measure(args: argparse.Namespace) -> dict:
    """Figure (e): per ``num_workers``, the fetch times and the waiting share of a ``MetaTrainer.run()``."""
    device = torch.device(args.device)
    network = build_network(2, args.features, device)
    common = {
        "load": load_item,
        "slice_transform": slice_preprocessing((args.size, args.size), label_keys=("label",)),
        "transform": slice_augmentation(keys=("image", "label"), label_keys=("label",)),
        "keys": ("image", "label"),
        "progress": False,
    }
    start = time.perf_counter()
    unlabeled = SliceDataset([volume(args.volume, 100 + i, initial=True) for i in range(2)], **common)
    clean = SliceDataset([volume(args.volume, 200, initial=False)], **common)
    res: dict = {
        "dataset_build_s": time.perf_counter() - start,
        "unlabeled_slices": len(unlabeled),
        "clean_slices": len(clean),
        "cached": bool(unlabeled.cached and clean.cached),
        "configs": {},
    }
    for workers in args.workers:
        loader_kw = {"num_workers": workers, "persistent_workers": workers > 0, "shuffle": True}
        unlabeled_loader = DataLoader(unlabeled, batch_size=1, **loader_kw)
        clean_loader = TimedLoader(DataLoader(clean, batch_size=2, **loader_kw))
        trainer = MetaTrainer(
            device,
            max_epochs=1,
            train_data_loader=unlabeled_loader,
            clean_data_loader=clean_loader,
            network=network,
            optimizer=sgd(network),
            epoch_length=args.iterations,
            **stage2_method("mlbseg"),
        ).set_random_state(0)
        marks: dict[str, list[float]] = defaultdict(list)
        for event, key in (
            (Events.GET_BATCH_STARTED, "get_started"),
            (Events.GET_BATCH_COMPLETED, "get_completed"),
            (Events.ITERATION_COMPLETED, "iteration_completed"),
        ):
            trainer.add_event_handler(event, lambda _, k=key, m=marks: (sync(device), m[k].append(time.perf_counter())))
        run_start = time.perf_counter()
        trainer.run()
        total = time.perf_counter() - run_start
        n = len(marks["iteration_completed"])
        unl = [c - s for s, c in zip(marks["get_started"], marks["get_completed"])]
        span = [c - s for s, c in zip(marks["get_started"], marks["iteration_completed"])]
        cln = clean_loader.fetches[:n] + [0.0] * max(0, n - len(clean_loader.fetches))
        wait = [u + c for u, c in zip(unl, cln)]
        steady = slice(1, None) if n > 1 else slice(None)
        res["configs"][f"num_workers={workers}"] = {
            "iterations": n,
            "run_wall_s": total,
            "startup_s": marks["get_started"][0] - run_start if marks["get_started"] else float("nan"),
            "unlabeled_fetch_s": unl,
            "clean_fetch_s": cln,
            "share_of_run": sum(wait) / total,
            "share_steady": sum(wait[steady]) / sum(span[steady]),
            "mean_iteration_s": sum(span) / max(n, 1),
        }
        # deleting loaders with persistent workers joins each worker with a 5 s timeout, which measures nothing
        # useful; at interpreter exit the join is skipped
        KEEP_ALIVE.append((trainer, unlabeled_loader, clean_loader))
    return res


def print_data(e: dict) -> None:
    print(
        f"  datasets: {e['unlabeled_slices']} unlabeled + {e['clean_slices']} clean slices, cached={e['cached']}, "
        f"built in {fmt_s(e['dataset_build_s'])}"
    )
    for name, r in e["configs"].items():
        first = r["unlabeled_fetch_s"][0] + r["clean_fetch_s"][0] if r["iterations"] else float("nan")
        print(
            f"  {name}: {r['iterations']} iterations, run {fmt_s(r['run_wall_s'])}, start-up {fmt_s(r['startup_s'])}; "
            f"first fetch {fmt_s(first)}; later fetches unlabeled {fmt_s(median(r['unlabeled_fetch_s'][1:]))} + "
            f"clean {fmt_s(median(r['clean_fetch_s'][1:]))}; waiting share {100 * r['share_of_run']:.3f} % of the "
            f"run, {100 * r['share_steady']:.3f} % after the first iteration"
        )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = benchmark_parser(__doc__)
    p.add_argument("--volume", default=None, help=f"volume shape (default {FULL['volume']})")
    p.add_argument("--iterations", type=int, default=2, help="iterations per configuration (default 2)")
    p.add_argument("--workers", type=ints, default=(0, 2), help="num_workers to compare (default 0,2)")
    args = parse_benchmark_args(p, argv)
    info = start(args)
    print(f"\n(e) waiting on data: MetaTrainer.run() over DataLoaders of cached SliceDatasets ({args.iterations} it.)")
    out = {"machine": info, "e_data": measure(args)}
    print_data(out["e_data"])
    return finish(args, out)


if __name__ == "__main__":
    main(sys.argv[1:])
