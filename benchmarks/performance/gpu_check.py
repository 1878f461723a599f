"""
One prepared GPU check of MLB-Seg's training and inference cost (``benchmarks/performance/gpu_check.sh`` runs it).

Measures, on synthetic data of the real sizes, and writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``:

1. the 2D reference-width network (NestedUNet 64-1024, 36.6 M parameters, 144x144): one stage-2 ``MetaTrainer``
   iteration (1 unlabeled slice, 2 clean slices) and one plain supervised step on the same 15 views (MONAI's
   ``SupervisedTrainer``), absolute time, ratio and peak ``torch.cuda.max_memory_allocated`` of each, with the GPU
   options (bf16 autocast, channels-last, ``torch.compile``) off and on;
2. the stage-2 iteration time per unlabeled image at unlabeled batch 1, 4 and 16;
3. the 3D variant (NestedUNet 16-256, 112x112x80 patches, 2 labeled + 2 unlabeled patches): iteration and supervised
   step, time and peak memory;
4. inference volumes per second on a left-atrium-sized volume (192x144x88): 2D slice by slice, 3D sliding window;
5. the projected wall time of the full protocols: 2D, 120 epochs over the 88 slices of 76 unlabeled volumes; 3D,
   15,000 iterations.

Iterations are timed with the trainers' own Ignite events (``ITERATION_STARTED``/``ITERATION_COMPLETED``, after a
device synchronisation); the first ``--warmup`` iterations (compilation, cuDNN autotuning) are left out. ``--quick``
runs tiny sizes (CPU smoke test). Sections that would overrun ``--budget_s`` are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_mlbseg.inferers import MinMaxSlidingWindowInferer, SliceResizeInferer
from monai_mlbseg.networks import NestedUNet

from .common import Workload, build_network, time_engine, time_inference

#: the full protocols the projection is made for
PROTOCOL_2D = {"epochs": 120, "unlabeled_volumes": 76, "slices_per_volume": 88}
PROTOCOL_3D = {"iterations": 15000}

SIZES = {
    "full": {
        "features_2d": (64, 128, 256, 512, 1024),
        "image_2d": (144, 144),
        "features_3d": (16, 32, 64, 128, 256),
        "patch_3d": (112, 112, 80),
        "volume": (192, 144, 88),
        "unlabeled_batches": (1, 4, 16),
        "iterations": 10,
    },
    "quick": {
        "features_2d": (4, 8),
        "image_2d": (32, 32),
        "features_3d": (4, 8),
        "patch_3d": (16, 16, 8),
        "volume": (40, 32, 12),
        "unlabeled_batches": (1, 2, 4),
        "iterations": 2,
    },
}

#: GPU option sets of section 1 (each applied alike to the stage-2 iteration and the supervised step)
OPTION_SETS = {
    "fp32": {},
    "bf16": {"amp": True},
    "channels_last": {"channels_last": True},
    "bf16+channels_last": {"amp": True, "channels_last": True},
    "bf16+channels_last+compile": {"amp": True, "channels_last": True, "compile": True},
}


def pair(workload: Workload, args: Any) -> dict:
    """The stage-2 iteration and the supervised step on its views, timed alike, and their ratio."""
    iterations = args.warmup + args.iterations
    meta = time_engine(workload.stage2(iterations), workload.device, args.warmup, args.iterations)
    plain = time_engine(workload.supervised(iterations), workload.device, args.warmup, args.iterations)
    return {"stage2": meta, "supervised": plain, "ratio": round(meta["ms_median"] / plain["ms_median"], 3)}


def hours(ms: float, iterations: float) -> float:
    return round(ms * iterations / 3.6e6, 2)


def projections(results: dict) -> dict:
    out: dict[str, Any] = {}
    slices = PROTOCOL_2D["epochs"] * PROTOCOL_2D["unlabeled_volumes"] * PROTOCOL_2D["slices_per_volume"]
    two_d = results.get("2d_options", {})
    for name, entry in two_d.items():
        if "stage2" in entry:
            out[f"2d_{name}_batch1_h"] = hours(entry["stage2"]["ms_median"], slices)
    for batch, entry in results.get("2d_unlabeled_batch", {}).items():
        if "ms_median" in entry:
            out[f"2d_fp32_batch{batch}_h"] = hours(entry["ms_median"], math.ceil(slices / int(batch)))
    if "stage2" in results.get("3d", {}):
        out["3d_fp32_h"] = hours(results["3d"]["stage2"]["ms_median"], PROTOCOL_3D["iterations"])
    return out


class Budget:
    """Runs the sections, skipping those that would start after ``seconds``; ``save`` is called after each."""

    def __init__(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.seconds = seconds
        self.save: Callable[[], None] | None = None

    def run(self, results: dict, key: str, fn: Callable[[], dict]) -> None:
        elapsed = time.perf_counter() - self.start
        if elapsed > self.seconds:
            results[key] = {"skipped": f"time budget ({self.seconds:.0f} s) spent"}
            return
        try:
            results[key] = fn()
        except Exception as e:  # one failing section (e.g. out of memory) must not lose the others
            results[key] = {"error": f"{type(e).__name__}: {e}"}
            traceback.print_exc()
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(f"[{time.perf_counter() - self.start:6.1f} s] {key}: {json.dumps(results[key])[:300]}", flush=True)
        if self.save is not None:
            self.save()


def cell(entry: dict, key: str = "ms_median") -> str:
    if "skipped" in entry or "error" in entry:
        return entry.get("skipped") or entry["error"][:60]
    value = entry.get(key)
    return "-" if value is None else f"{value:g}"


def markdown(report: dict) -> str:
    r = report["results"]
    cfg = report["config"]
    lines = [
        f"GPU check on {report['machine']['device_name']} ({report['machine']['device']}), "
        f"torch {report['machine']['torch']}, {'quick sizes' if cfg['quick'] else 'full sizes'}"
        f"{'' if report['complete'] else ' (PARTIAL: the run was cut short)'}; "
        f"median of {cfg['iterations']} iterations after {cfg['warmup']} warm-up; memory: peak "
        "`torch.cuda.max_memory_allocated` (none on CPU).",
        "",
        f"2D (NestedUNet {cfg['features_2d']}, {cfg['params_2d']:,} parameters, {cfg['image_2d']}): "
        "1 unlabeled + 2 clean slices (15 views)",
        "",
        "| options | stage-2 ms | supervised ms | ratio | stage-2 peak MiB | supervised peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, entry in r["2d_options"].items():
        if "stage2" not in entry:
            lines.append(f"| {name} | {cell(entry)} | | | | |")
            continue
        s, p = entry["stage2"], entry["supervised"]
        lines.append(
            f"| {name} | {cell(s)} | {cell(p)} | {entry['ratio']:g} | {cell(s, 'peak_mib')} | {cell(p, 'peak_mib')} |"
        )
    lines += ["", "| unlabeled batch | stage-2 ms | ms per unlabeled image | peak MiB |", "|---|---|---|---|"]
    for batch, entry in r["2d_unlabeled_batch"].items():
        lines.append(f"| {batch} | {cell(entry)} | {cell(entry, 'ms_per_image')} | {cell(entry, 'peak_mib')} |")
    three = r["3d"] or {"skipped": "not run yet"}
    lines += [
        "",
        f"3D (NestedUNet {cfg['features_3d']}, {cfg['params_3d']:,} parameters, patches {cfg['patch_3d']}, "
        "2 labeled + 2 unlabeled)",
        "",
        "| | ms | peak MiB |",
        "|---|---|---|",
    ]
    if "stage2" in three:
        lines.append(f"| stage-2 iteration | {cell(three['stage2'])} | {cell(three['stage2'], 'peak_mib')} |")
        lines.append(f"| supervised step | {cell(three['supervised'])} | {cell(three['supervised'], 'peak_mib')} |")
        lines.append(f"| ratio | {three['ratio']:g} | |")
    else:
        lines.append(f"| stage-2 iteration | {cell(three)} | |")
    lines += ["", f"Inference, one volume of {cfg['volume']}", "", "| | volumes/s | peak MiB |", "|---|---|---|"]
    for name, entry in r["inference"].items():
        lines.append(f"| {name} | {cell(entry, 'volumes_per_s')} | {cell(entry, 'peak_mib')} |")
    lines += [
        "",
        "Projected stage-2 wall time of the full protocols at the measured sizes (hours)",
        "",
        "| protocol | hours |",
        "|---|---|",
    ]
    for name, value in report.get("projection_h", {}).items():
        lines.append(f"| {name} | {value:g} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    p.add_argument("--out", default="gpu_check", help="output folder for gpu_check.json and gpu_check.md")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=None, help="warm-up iterations per measurement (default 3; 1 quick)")
    p.add_argument("--budget_s", type=float, default=420.0, help="sections starting later than this are skipped")
    p.add_argument("--no_compile", action="store_true", help="leave out the torch.compile option set")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    args.iterations = args.iterations or sizes["iterations"]
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    option_sets = dict(OPTION_SETS)
    if args.quick or args.no_compile:  # compiling costs minutes on a CPU; the quick run checks the other paths
        option_sets = {k: v for k, v in option_sets.items() if not v.get("compile")}
    f2, s2, f3, s3 = sizes["features_2d"], sizes["image_2d"], sizes["features_3d"], sizes["patch_3d"]
    volume, repeats = sizes["volume"], 1 if args.quick else 3
    results: dict[str, Any] = {"2d_options": {}, "2d_unlabeled_batch": {}, "3d": {}, "inference": {}}
    report: dict[str, Any] = {
        "complete": False,
        "machine": {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "CPU",
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
        },
        "config": {
            "quick": args.quick,
            "iterations": args.iterations,
            "warmup": args.warmup,
            "features_2d": list(f2),
            "image_2d": list(s2),
            "params_2d": sum(p.numel() for p in NestedUNet(2, features=f2).parameters()),
            "features_3d": list(f3),
            "patch_3d": list(s3),
            "params_3d": sum(p.numel() for p in NestedUNet(3, features=f3).parameters()),
            "volume": list(volume),
            "protocol_2d": PROTOCOL_2D,
            "protocol_3d": PROTOCOL_3D,
            "option_sets": option_sets,
            "elapsed_s": None,
        },
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)

    def save() -> None:
        """Write what is measured so far (a run cut short by the time limit keeps its figures)."""
        report["projection_h"] = projections(results)
        report["config"]["elapsed_s"] = round(time.perf_counter() - budget.start, 1)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "gpu_check.md").write_text(markdown(report))

    budget.save = save

    def two_d(options: dict) -> Callable[[], dict]:
        return lambda: pair(Workload(2, f2, s2, device, options=options), args)

    def per_batch(b: int) -> Callable[[], dict]:
        def run() -> dict:
            engine = Workload(2, f2, s2, device, num_unlabeled=b).stage2(args.warmup + args.iterations)
            entry = time_engine(engine, device, args.warmup, args.iterations)
            entry["ms_per_image"] = round(entry["ms_median"] / b, 2)
            return entry

        return run

    # in order of importance: the compiled option set (minutes of compilation) comes last
    names = list(option_sets)
    budget.run(results["2d_options"], names[0], two_d(option_sets[names[0]]))
    budget.run(results, "3d", lambda: pair(Workload(3, f3, s3, device, num_unlabeled=2), args))
    for batch in sizes["unlabeled_batches"]:
        budget.run(results["2d_unlabeled_batch"], str(batch), per_batch(batch))
    budget.run(
        results["inference"],
        "2d_slices",
        lambda: time_inference(build_network(2, f2, device), SliceResizeInferer(s2), volume, device, repeats),
    )
    budget.run(
        results["inference"],
        "3d_sliding_window",
        lambda: time_inference(
            build_network(3, f3, device),
            MinMaxSlidingWindowInferer(s3, sw_batch_size=4, overlap=0.5, mode="gaussian"),
            volume,
            device,
            repeats,
        ),
    )
    for name in names[1:]:
        budget.run(results["2d_options"], name, two_d(option_sets[name]))
    report["complete"] = True
    save()
    print(markdown(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
