"""
What the benchmark scripts share: synthetic batches, the two engines every ratio compares (one ``MetaTrainer``
stage-2 iteration and one plain supervised step of MONAI's ``SupervisedTrainer`` on the same 15 views), timing through
the engines' own Ignite events, the machine description and the formatting of figures.

Nothing here patches the library: iterations are timed with ``ITERATION_STARTED``/``ITERATION_COMPLETED`` and phases
with the ``torch.profiler.record_function`` scopes the library opens (``mlbseg.*``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import SimpleInferer

from monai_mlbseg.data import synthetic_case, synthetic_discs
from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import MetaWeighting, TwoSteps
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.transforms import PLEViews

LR, MOMENTUM, WEIGHT_DECAY = 0.005, 0.9, 5e-4  # the reference optimiser


# ---------------------------------------------------------------------------------------------------- device
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


# ------------------------------------------------------------------------------------------------ statistics
def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def fmt_s(seconds: float) -> str:
    if seconds != seconds:  # nan
        return "n/a"
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.3f} s"


def spread(values: Sequence[float]) -> str:
    return f"[{fmt_s(min(values))} .. {fmt_s(max(values))}]" if values else ""


def mib(num_bytes: float) -> float:
    return num_bytes / 2**20


# ------------------------------------------------------------------------------------------- data and engines
def synthetic_batch(n: int, shape: Sequence[int], device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """``n`` images ``[1, *shape]`` and their masks from the library's generators: discs in noise in 2D
    (:py:func:`~monai_mlbseg.data.synthetic_discs`, square ``shape``), left-atrium-like volumes in 3D
    (:py:func:`~monai_mlbseg.data.synthetic_case`). The content does not change the timing."""
    if len(shape) == 2:
        if shape[0] != shape[1]:
            raise ValueError(f"2D synthetic batches are square, got {tuple(shape)}")
        samples = synthetic_discs(n, size=shape[0], seed=seed)
        images, labels = [s["image"] for s in samples], [s["label"] for s in samples]
    else:
        rng = np.random.default_rng(seed)
        cases = [synthetic_case(rng, tuple(shape), kind="la") for _ in range(n)]
        images, labels = [torch.from_numpy(i)[None] for i, _ in cases], [torch.from_numpy(m)[None] for _, m in cases]
    return {"image": torch.stack(images).float().to(device), "label": torch.stack(labels).float().to(device)}


def build_network(
    dims: int, features: Sequence[int], device: torch.device, channels_last: bool = False
) -> torch.nn.Module:
    torch.manual_seed(0)
    net = NestedUNet(dims, in_channels=1, out_channels=1, features=tuple(features)).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last if dims == 2 else torch.channels_last_3d)
    return net


def sgd(network: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(network.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def engine_options(options: dict) -> dict:
    """``{"amp": bool, "compile": bool}`` as the keywords of MONAI's trainers (bf16 autocast)."""
    out: dict[str, Any] = {}
    if options.get("amp"):
        out.update(amp=True, amp_kwargs={"dtype": torch.bfloat16})
    if options.get("compile"):
        out["compile"] = True
    return out


def last_decoder_blocks(features: Sequence[int]) -> list[str]:
    return [f"nodes.conv0_{len(features) - 1}", "final"]


def stage2_modes(features: Sequence[int]) -> dict[str, dict]:
    """The faithful stage 2 and the fast modes, as ``MetaTrainer`` parts replacing MLB-Seg's (fresh on every call)."""
    last = last_decoder_blocks(features)
    return {
        "faithful": {},
        "reuse_meta_grad": {"schedule": TwoSteps(reuse_meta_grad=True)},
        "meta_params=" + "+".join(last): {"weighting": MetaWeighting(last)},
        "reuse_meta_grad+meta_params": {"schedule": TwoSteps(reuse_meta_grad=True), "weighting": MetaWeighting(last)},
    }


@dataclass
class Workload:
    """
    The batch of one stage-2 iteration, and the two engines every ratio compares on it: ``num_unlabeled`` unlabeled
    and ``num_clean`` clean images of ``shape`` (5 PLE views each), a ``NestedUNet`` of ``features`` (seed 0) and the
    reference SGD.

    Args:
        dims: spatial dimensions (2 or 3).
        features: the network's widths.
        shape: the images' spatial shape.
        device: where everything runs.
        num_unlabeled: unlabeled images per iteration.
        num_clean: clean images per iteration.
        options: GPU options ``{"amp", "channels_last", "compile"}`` (bools), applied alike to both engines.
    """

    dims: int
    features: Sequence[int]
    shape: Sequence[int]
    device: torch.device
    num_unlabeled: int = 1
    num_clean: int = 2
    options: dict = field(default_factory=dict)

    def _network(self) -> torch.nn.Module:
        return build_network(self.dims, self.features, self.device, self.options.get("channels_last", False))

    def stage2(self, iterations: int = 1, **trainer_kwargs: Any) -> MetaTrainer:
        """
        A ``MetaTrainer`` of ``iterations`` iterations on the fixed batches: MLB-Seg (the reference) with its parts
        replaced by ``trainer_kwargs``.
        """
        net = self._network()
        return MetaTrainer(
            self.device,
            max_epochs=1,
            train_data_loader=[synthetic_batch(self.num_unlabeled, self.shape, self.device, seed=1)],
            clean_data_loader=[synthetic_batch(self.num_clean, self.shape, self.device, seed=2)],
            network=net,
            optimizer=sgd(net),
            views=PLEViews(self.dims),
            epoch_length=iterations,
            **engine_options(self.options),
            **{**stage2_method("mlbseg"), **trainer_kwargs},
        ).set_random_state(0)

    def supervised(self, iterations: int = 1) -> SupervisedTrainer:
        """One plain supervised step per iteration (MONAI's ``SupervisedTrainer``, BCE, SGD) on all the views."""
        net = self._network()
        batch = synthetic_batch(self.num_unlabeled + self.num_clean, self.shape, self.device, seed=1)
        views = PLEViews(self.dims).set_random_state(0)
        data = {"image": views(batch["image"]).contiguous(), "label": views.warp(batch["label"], threshold=0.5)}
        return SupervisedTrainer(
            self.device,
            max_epochs=1,
            train_data_loader=[data],
            network=net,
            optimizer=sgd(net),
            loss_function=torch.nn.BCEWithLogitsLoss(),
            inferer=SimpleInferer(),
            epoch_length=iterations,
            **engine_options(self.options),
        )


class IterationClock:
    """
    Per-iteration wall times of an engine, from its own ``ITERATION_STARTED``/``ITERATION_COMPLETED`` events (the
    device is synchronised at both). ``step()`` runs the engine for one more epoch, so that two engines can be
    measured in interleaved pairs.

    Args:
        engine: a MONAI/Ignite engine.
        device: its device.
    """

    def __init__(self, engine: Any, device: torch.device) -> None:
        self.engine, self.device = engine, device
        self.times: list[float] = []
        self._start = 0.0
        engine.add_event_handler(Events.ITERATION_STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._completed)

    def _started(self, _: Any) -> None:
        sync(self.device)
        self._start = time.perf_counter()

    def _completed(self, _: Any) -> None:
        sync(self.device)
        self.times.append(time.perf_counter() - self._start)

    def run(self) -> list[float]:
        """The engine's run as configured; returns the times of its iterations."""
        done = len(self.times)
        self.engine.run()
        return self.times[done:]

    def step(self) -> float:
        """One more epoch of the engine (one iteration when ``epoch_length`` is 1); returns its time."""
        state = self.engine.state
        if state.epoch >= state.max_epochs:  # the configured epochs are done: extend the run by one
            state.max_epochs += 1
        return sum(self.run())


def time_engine(engine: Any, device: torch.device, warmup: int, iterations: int) -> dict:
    """Run ``engine`` (``warmup + iterations`` iterations); median per-iteration time and peak memory."""
    reset_peak(device)
    times = IterationClock(engine, device).run()
    kept = times[warmup:]
    return {
        "ms_median": round(1000 * statistics.median(kept), 2),
        "ms_min": round(1000 * min(kept), 2),
        "iterations_timed": len(kept),
        "warmup_ms": [round(1000 * t, 1) for t in times[:warmup]],
        "peak_mib": peak_mib(device),
    }


@torch.no_grad()
def time_inference(
    net: torch.nn.Module, inferer: Any, volume: Sequence[int], device: torch.device, repeats: int
) -> dict:
    """Whole-volume latency of ``inferer(x, net)`` on a synthetic ``[1, 1, *volume]`` (eval mode, after a warm-up)."""
    net.eval()
    x = synthetic_batch(1, volume, device, seed=3)["image"]
    inferer(x, net)
    reset_peak(device)
    latencies = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        inferer(x, net)
        sync(device)
        latencies.append(time.perf_counter() - start)
    net.train()
    seconds = median(latencies)
    return {
        "latency_s": {"median": seconds, "samples": latencies},
        "s_per_volume": round(seconds, 4),
        "volumes_per_s": round(1 / seconds, 3),
        "peak_mib": peak_mib(device),
    }


# ------------------------------------------------------------------------------------------------ the machine
def library_version() -> str:
    """Git commit of the measured ``monai_mlbseg`` checkout, with a digest of its uncommitted changes if any."""
    import monai_mlbseg

    root = os.path.dirname(os.path.dirname(os.path.abspath(monai_mlbseg.__file__)))

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True).stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        diff = git("diff", "HEAD", "--", "monai_mlbseg") + git(
            "ls-files", "--others", "--exclude-standard", "--", "monai_mlbseg"
        )
    except (OSError, subprocess.CalledProcessError):
        return f"monai_mlbseg {getattr(monai_mlbseg, '__version__', '?')} (no git)"
    if not diff:
        return f"git {head}"
    return f"git {head} + uncommitted changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})"


def machine_info(device: torch.device, threads: int) -> dict:
    """CPU, versions, device and the measured library's commit."""
    import monai

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "library": library_version(),
    }
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    return info


def print_machine(info: dict) -> None:
    print(
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, "
        f"torch {info['torch']}, monai {info['monai']}, device {info['device']} ({info['device_name']}); "
        f"library {info['library']}"
    )


class CpuLoad:
    """CPU time used by *other* processes while a block runs (Linux ``/proc/stat``; ``None`` elsewhere)."""

    def __init__(self) -> None:
        self.start = self._snapshot()

    @staticmethod
    def _snapshot() -> tuple[float, float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        tick = os.sysconf("SC_CLK_TCK")
        busy = (sum(values) - values[3] - values[4]) / tick  # everything but idle and iowait, steal included
        own = sum(
            getattr(resource.getrusage(who), f)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for f in ("ru_utime", "ru_stime")
        )
        return busy, own, values[7] / tick, time.perf_counter()

    def others(self) -> dict | None:
        """Core-seconds used by other processes (and stolen by the hypervisor) since construction."""
        end = self._snapshot()
        if self.start is None or end is None:
            return None
        wall = end[3] - self.start[3]
        other = max((end[0] - self.start[0]) - (end[1] - self.start[1]), 0.0)
        return {
            "wall_s": wall,
            "other_core_s": other,
            "other_share_of_machine": other / max(wall * (os.cpu_count() or 1), 1e-9),
            "steal_core_s": end[2] - self.start[2],
        }

    def note(self) -> str:
        """One line on the other processes' load since construction (empty where it cannot be read)."""
        load = self.others()
        if not load:
            return ""
        return (
            f"other processes used {load['other_core_s']:.1f} core-s ({100 * load['other_share_of_machine']:.0f} % "
            f"of the machine; steal {load['steal_core_s']:.1f} core-s)"
        )


# --------------------------------------------------------------------------------------------- command line
#: the repository root, the working directory of the workers ``run_worker_process`` starts (``python -m ...``)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: the sizes of every script: ``--quick`` (a smoke run of seconds) and the default (reduced width, 144 px)
QUICK = {"features": "4,8,16", "size": 32, "volume": "40,30,8", "threads": 1}
FULL = {"features": "16,32,64,128,256", "size": 144, "volume": "200,140,88", "threads": 2}


def ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in str(text).split(",") if v.strip())


def run_worker_process(
    module: str, args: argparse.Namespace, extra: Sequence[str], marker: str, env: dict[str, str] | None = None
) -> dict:
    """Run ``python -m module`` (e.g. ``benchmarks.performance.memory``) in a fresh interpreter, from the repository
    root, with the shared options of ``args`` (device, widths, size, threads) and ``extra``; returns the JSON of its
    last stdout line that starts with ``marker``, or ``{"error": ...}``."""
    cmd = [
        sys.executable,
        "-m",
        module,
        "--device",
        args.device,
        "--features",
        ",".join(map(str, args.features)),
        "--size",
        str(args.size),
        "--threads",
        str(args.threads),
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(marker)]
    if proc.returncode != 0 or not lines:
        return {"error": f"rc {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(lines[-1][len(marker) :])


def benchmark_parser(doc: str) -> argparse.ArgumentParser:
    """The options every script shares: device, sizes, threads, ``--json`` and ``--quick``."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--features", default=None, help=f"NestedUNet widths (default {FULL['features']})")
    p.add_argument("--size", type=int, default=None, help=f"slice size (default {FULL['size']})")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; --quick: 1)")
    p.add_argument("--json", default=None, help="also write every figure and sample to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (features 4,8,16, 32 px)")
    return p


def parse_benchmark_args(
    p: argparse.ArgumentParser, argv: Sequence[str] | None, quick: dict | None = None, full: dict | None = None
) -> argparse.Namespace:
    """Parse, fill what was not given from ``QUICK``/``FULL`` (updated by the script's ``quick``/``full``), parse
    the width and shape lists and choose the device."""
    args = p.parse_args(argv)
    defaults = {**QUICK, **(quick or {})} if args.quick else {**FULL, **(full or {})}
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.features = ints(args.features)
    if hasattr(args, "volume"):
        args.volume = ints(args.volume)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    return args


def start(args: argparse.Namespace) -> dict:
    """Set the threads and print the machine; returns its description."""
    torch.set_num_threads(args.threads)
    info = machine_info(torch.device(args.device), args.threads)
    print_machine(info)
    return info


def finish(args: argparse.Namespace, out: dict) -> dict:
    """Write ``out`` to ``--json`` when given; returns it."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"figures written to {args.json}")
    return out
