#!/usr/bin/env python
"""
Peak memory of one MLB-Seg stage-2 iteration against one plain supervised step on the same 15 views (figure (c) of
``docs/benchmarks.md``).

Each kind of step runs in a fresh subprocess started before this process grows: the engine of
``benchmarks/performance/common.py``, ``--steps`` iterations. On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``. On CPU: peak = ``ru_maxrss`` after all steps, increment = peak - RSS just before the first
step, and the last step alone from ``VmHWM`` reset through ``/proc/self/clear_refs`` (Linux).

Usage::

    python -m benchmarks.performance.memory                    # reduced width 16..256, 144 px, CPU if no GPU
    python -m benchmarks.performance.memory --all-modes        # also the fast modes
    python -m benchmarks.performance.memory --quick            # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Sequence

import torch

from .common import (
    IterationClock,
    Workload,
    benchmark_parser,
    finish,
    mib,
    parse_benchmark_args,
    run_worker_process,
    stage2_modes,
    start,
)

MARKER = "MLBSEG_MEMORY_JSON "


def current_rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return max_rss()


def max_rss() -> int:
    """``ru_maxrss`` in bytes (a child inherits its parent's value through fork + exec, hence the fresh workers)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def vm_hwm() -> int | None:
    """Peak RSS of this process image (``VmHWM``, Linux), ``None`` elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return None


def reset_hwm() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); ``False`` when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args: argparse.Namespace) -> dict:
    """In a fresh process: ``args.steps`` iterations of one kind of step; its peak memory."""
    device = torch.device(args.device)
    options = {"channels_last": args.channels_last, "amp": args.amp}
    workload = Workload(2, args.features, (args.size, args.size), device, options=options)
    if args.worker == "supervised":
        engine = workload.supervised()
    else:
        engine = workload.stage2(**stage2_modes(args.features)[args.worker])
    clock = IterationClock(engine, device)
    steps = max(args.steps, 1)
    result: dict = {"kind": args.worker, "steps": steps}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            clock.step()
        peak = torch.cuda.max_memory_allocated(device)
        return result | {"before_bytes": before, "peak_bytes": peak, "increment_bytes": peak - before}
    before, max_before = current_rss(), max_rss()
    for _ in range(steps - 1):
        clock.step()
    last_before, hwm_reset = current_rss(), reset_hwm()
    clock.step()
    peak, hwm = max_rss(), vm_hwm()
    return result | {
        "before_bytes": before,
        "peak_bytes": peak,
        "increment_bytes": max(peak - before, 0),
        "peak_reached_in_steps": peak > max_before,
        "last_step_peak_bytes": hwm if hwm_reset else None,
        "last_step_increment_bytes": (hwm - last_before) if hwm_reset and hwm is not None else None,
    }


def measure(args: argparse.Namespace) -> dict:
    """Figure (c): one fresh worker per kind of step; ratios of the faithful iteration to the supervised step."""
    kinds = ["faithful", "supervised"] + (
        [m for m in stage2_modes(args.features) if m != "faithful"] if args.all_modes else []
    )
    results = {}
    for kind in kinds:
        extra = ["--worker", kind, "--steps", str(args.steps)]
        extra += (["--channels-last"] if args.channels_last else []) + (["--amp"] if args.amp else [])
        start = time.perf_counter()
        results[kind] = run_worker_process(__spec__.name, args, extra, MARKER)
        results[kind]["subprocess_s"] = time.perf_counter() - start
    res: dict = {"method": "cuda max_memory_allocated" if args.device == "cuda" else "ru_maxrss + VmHWM", **results}
    f, s = results.get("faithful", {}), results.get("supervised", {})
    if "peak_bytes" in f and "peak_bytes" in s:
        res["ratio_peak"] = f["peak_bytes"] / s["peak_bytes"]
        res["ratio_increment"] = f["increment_bytes"] / max(s["increment_bytes"], 1)
        if f.get("last_step_increment_bytes") and s.get("last_step_increment_bytes"):
            res["ratio_last_step_increment"] = f["last_step_increment_bytes"] / s["last_step_increment_bytes"]
    return res


def print_memory(c: dict) -> None:
    print(f"  method: {c['method']}, fresh subprocess each")
    for kind, r in c.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            print(f"  {kind:36s} error: {r['error'][-300:]}")
            continue
        last = r.get("last_step_increment_bytes")
        print(
            f"  {kind:36s} before {mib(r['before_bytes']):7.1f} MiB, peak {mib(r['peak_bytes']):7.1f} MiB, increment "
            f"{mib(r['increment_bytes']):7.1f} MiB ({r['steps']} steps)"
            + (f"; last step increment {mib(last):7.1f} MiB" if last is not None else "")
        )
    if "ratio_peak" in c:
        line = f"  ratio faithful/supervised: peaks {c['ratio_peak']:.2f}x, increments {c['ratio_increment']:.2f}x"
        if "ratio_last_step_increment" in c:
            line += f"; last-step increments {c['ratio_last_step_increment']:.2f}x"
        print(line)


def main(argv: Sequence[str] | None = None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--steps", type=int, default=None, help="steps per subprocess (default 2)")
    p.add_argument("--all-modes", action="store_true", help="also the fast modes")
    p.add_argument("--channels-last", action="store_true", help="GPU option: channels-last network (both sides)")
    p.add_argument("--amp", action="store_true", help="GPU option: bf16 autocast (both sides)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parse_benchmark_args(p, argv, quick={"steps": 1}, full={"steps": 2})
    if args.worker:
        torch.set_num_threads(args.threads)
        print(MARKER + json.dumps(worker(args)))
        return {}
    info = start(args)
    print("\n(c) peak memory, stage-2 iteration (faithful) vs supervised step")
    out = {"machine": info, "c_memory": measure(args)}
    print_memory(out["c_memory"])
    return finish(args, out)


if __name__ == "__main__":
    main(sys.argv[1:])
