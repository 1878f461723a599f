#!/usr/bin/env python
"""
Figure (f): the CPU memory allocator's share of a stage-2 iteration. The same ``MetaTrainer`` iterations run in a
fresh subprocess per allocator: glibc's ``malloc`` as it comes, glibc with its mmap and trim thresholds raised (the
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables), and jemalloc and tcmalloc through
``LD_PRELOAD`` where their libraries are installed (Debian: ``libjemalloc2``, ``libgoogle-perftools4``). On CPU the
activations of one iteration are freed and allocated again every iteration; glibc returns the large blocks to the
kernel, and every new page costs a minor page fault (zeroed by the kernel), which shows as system time. The script
reports, per allocator, the median time per iteration, the minor page faults per iteration and the ratio to glibc
as it comes, and checks that the network's weights after the iterations are bit-identical under every allocator
(the allocator decides where tensors live, not what they hold). The allocators alternate round by round, so that a
change of machine load affects all of them alike.

Usage::

    python -m benchmarks.performance.allocator --features 8,16,32,64,128 --size 64 --clean 32  # the real_la.py sizes
    python -m benchmarks.performance.allocator --quick  # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from .common import (
    IterationClock,
    Workload,
    benchmark_parser,
    finish,
    fmt_s,
    median,
    parse_benchmark_args,
    run_worker_process,
    start,
)

MARKER = "ALLOCATOR_RESULT "

#: where the shared libraries of the preloadable allocators are looked for (Debian / Ubuntu, RHEL, macOS Homebrew)
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")
LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}

#: glibc's thresholds raised to their largest accepted values (the mmap threshold is capped at 32 MiB on 64 bits)
GLIBC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**36)}


def find_library(name: str, dirs: Sequence[str] = LIBRARY_DIRS) -> str | None:
    """The first ``dirs/name`` that exists, else ``None``."""
    return next((str(Path(d) / name) for d in dirs if (Path(d) / name).is_file()), None)


def allocators(dirs: Sequence[str] = LIBRARY_DIRS) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{name: environment}`` of every allocator that can run here, and the names of those whose library is absent."""
    found: dict[str, dict[str, str]] = {"glibc": {}, "glibc_tuned": dict(GLIBC_TUNED)}
    missing = []
    for name, lib in LIBRARIES.items():
        path = find_library(lib, dirs)
        if path is None:
            missing.append(name)
        else:
            found[name] = {"LD_PRELOAD": path}
    return found, missing


def worker(args: argparse.Namespace) -> dict:
    """In a fresh process: ``args.warmup + args.iterations`` stage-2 iterations; their times and page faults."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workload = Workload(2, args.features, (args.size, args.size), device, num_clean=args.clean)
    engine = workload.stage2()
    clock = IterationClock(engine, device)
    for _ in range(args.warmup):
        clock.step()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [clock.step() for _ in range(args.iterations)]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    weights = torch.cat([p.detach().flatten().double().cpu() for p in engine.network.parameters()])
    digest = hashlib.sha1(weights.numpy().tobytes()).hexdigest()
    return {"times_s": times, "minor_faults_per_iteration": faults / max(args.iterations, 1), "weights_sha1": digest}


def run_worker(args: argparse.Namespace, env: dict[str, str]) -> dict:
    extra = ["--worker", "--clean", str(args.clean), "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    return run_worker_process(__spec__.name, args, extra, MARKER, env)


def measure(args: argparse.Namespace) -> dict:
    """Figure (f): ``args.rounds`` rounds, one fresh subprocess per allocator each; medians and ratios to glibc."""
    found, missing = allocators()
    if args.allocators:
        missing = [m for m in missing if m in args.allocators]
        found = {name: env for name, env in found.items() if name in args.allocators or name == "glibc"}
    samples: dict[str, dict] = {
        name: {"times_s": [], "faults": [], "digests": set(), "env": env} for name, env in found.items()
    }
    for _ in range(args.rounds):
        for name, env in found.items():
            result = run_worker(args, env)
            if "error" in result:
                samples[name]["error"] = result["error"]
                continue
            samples[name]["times_s"] += result["times_s"]
            samples[name]["faults"].append(result["minor_faults_per_iteration"])
            samples[name]["digests"].add(result["weights_sha1"])
    base = median(samples["glibc"]["times_s"])
    digests = set().union(*(s["digests"] for s in samples.values()))
    out: dict = {"missing": missing, "same_weights": len(digests) == 1, "allocators": {}}
    for name, s in samples.items():
        entry: dict = {"env": s["env"]}
        if s["times_s"]:
            entry |= {
                "iteration_s_median": median(s["times_s"]),
                "iteration_s_samples": s["times_s"],
                "minor_faults_per_iteration": median(s["faults"]),
                "speedup_vs_glibc": base / median(s["times_s"]),
                "weights_sha1": sorted(s["digests"]),
            }
        if "error" in s:
            entry["error"] = s["error"]
        out["allocators"][name] = entry
    return out


def print_figures(f: dict) -> None:
    for name, r in f["allocators"].items():
        if "iteration_s_median" not in r:
            print(f"  {name:12s} error: {r.get('error', '?')[-300:]}")
            continue
        print(
            f"  {name:12s} {fmt_s(r['iteration_s_median']):>10s} per iteration, "
            f"{r['minor_faults_per_iteration']:>12.0f} minor page faults per iteration, "
            f"{r['speedup_vs_glibc']:.2f}x glibc's speed"
        )
    same = "identical" if f["same_weights"] else "DIFFERENT"
    print(f"  network weights after the iterations: {same} under every allocator (sha1 of all parameters)")
    if f["missing"]:
        print(f"  not installed here: {', '.join(f['missing'])}")


def main(argv: Sequence[str] | None = None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--clean", type=int, default=None, help="clean images per iteration (default 2, the reference)")
    p.add_argument("--iterations", type=int, default=None, help="timed iterations per subprocess (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per subprocess (default 1)")
    p.add_argument("--rounds", type=int, default=None, help="subprocesses per allocator (default 2)")
    p.add_argument("--allocators", default=None, help="comma-separated subset (default: all; glibc always runs)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parse_benchmark_args(
        p, argv, quick={"clean": 2, "iterations": 1, "rounds": 1}, full={"clean": 2, "iterations": 3, "rounds": 2}
    )
    if args.allocators:
        args.allocators = [a.strip() for a in args.allocators.split(",") if a.strip()]
        unknown = sorted(set(args.allocators) - {"glibc", "glibc_tuned", *LIBRARIES})
        if unknown:
            p.error(f"--allocators: unknown {', '.join(unknown)}; known: glibc, glibc_tuned, {', '.join(LIBRARIES)}")
    if args.worker:
        print(MARKER + json.dumps(worker(args)))
        return {}
    info = start(args)
    print(f"\n(f) stage-2 iteration per CPU allocator ({args.clean} clean images, fresh subprocess each)")
    began = time.perf_counter()
    out = {"machine": info, "f_allocator": measure(args)}
    print_figures(out["f_allocator"])
    print(f"  measured in {time.perf_counter() - began:.0f} s")
    return finish(args, out)


if __name__ == "__main__":
    main()
