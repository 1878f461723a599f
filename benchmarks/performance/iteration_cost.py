#!/usr/bin/env python
"""
Cost of one MLB-Seg stage-2 iteration of :py:class:`monai_mlbseg.engines.MetaTrainer` against one plain supervised
step, and where the iteration's time goes (figures (a) and (b) of ``docs/benchmarks.md``).

(a) time of one stage-2 iteration / time of one supervised SGD step (MONAI's ``SupervisedTrainer``, BCE) on the same
    15 views with the same network, for the faithful trainer and the fast modes (``reuse_meta_grad``,
    ``meta_params``, both). Each engine's iterations are timed by its own Ignite events; the engines alternate one
    iteration at a time (interleaved pairs), so that a change of machine load affects both sides of a ratio alike.
(b) share of the faithful iteration in each ``mlbseg.*`` scope the library opens with
    ``torch.profiler.record_function``: the trainer's phases and the view, warp, pair-mapping and PLE functions,
    from ``torch.profiler`` traces of separate faithful iterations (overlapping calls of one scope are merged).

Usage::

    python -m benchmarks.performance.iteration_cost                     # reduced width 16..256, 144 px, CPU if no GPU
    python -m benchmarks.performance.iteration_cost --device cuda --features 64,128,256,512,1024 --json out.json
    python -m benchmarks.performance.iteration_cost --quick             # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from monai_mlbseg.utils import SCOPE_PREFIX

from .common import (
    CpuLoad,
    IterationClock,
    Workload,
    benchmark_parser,
    finish,
    fmt_s,
    median,
    parse_benchmark_args,
    spread,
    stage2_modes,
    start,
    sync,
)


def options(args: argparse.Namespace) -> dict:
    """The GPU options of the command line."""
    return {k: True for k in ("amp", "channels_last", "compile") if getattr(args, k)}


def measure_ratios(args: argparse.Namespace, device: torch.device) -> dict:
    """Figure (a): interleaved pairs of one stage-2 iteration (each mode) and one supervised step."""
    workload = Workload(2, args.features, (args.size, args.size), device, options=options(args))
    clocks, unsupported = {}, {}
    for mode, kwargs in stage2_modes(args.features).items():
        try:
            clocks[mode] = IterationClock(workload.stage2(**kwargs), device)
        except (ValueError, TypeError) as e:
            unsupported[mode] = f"{type(e).__name__}: {e}"
    supervised = IterationClock(workload.supervised(), device)
    print(f"  modes: {', '.join(clocks)}" + (f"; unsupported: {', '.join(unsupported)}" if unsupported else ""))
    times: dict[str, list[float]] = defaultdict(list)
    paired: dict[str, list[float]] = defaultdict(list)
    for r in range(args.warmup + args.repeats):
        warm, row = r < args.warmup, []
        for mode, clock in clocks.items():
            t_stage2, t_sup = clock.step(), supervised.step()
            row.append(f"{mode} {fmt_s(t_stage2)} / sup {fmt_s(t_sup)}")
            if not warm:
                times[mode].append(t_stage2)
                paired[mode].append(t_sup)
        print(f"    {'warm-up' if warm else f'round {r - args.warmup + 1}/{args.repeats}'}: " + "; ".join(row))
    sup_all = [t for mode in clocks for t in paired[mode]]
    return {
        "supervised_step_s": {"median": median(sup_all), "samples": sup_all},
        "modes": {
            mode: {
                "stage2_s": {"median": median(times[mode]), "samples": times[mode]},
                "paired_supervised_s": paired[mode],
                "ratio_median_of_pairs": median([a / b for a, b in zip(times[mode], paired[mode])]),
                "ratio_of_medians": median(times[mode]) / median(sup_all),
            }
            for mode in clocks
        },
        "unsupported": unsupported,
    }


def scope_totals(prof: profile) -> dict[str, tuple[float, int]]:
    """Seconds and calls of every ``mlbseg.*`` scope of a trace; overlapping (nested) calls of one name are merged."""
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for event in prof.events():
        if event.name.startswith(SCOPE_PREFIX):
            spans[event.name].append((event.time_range.start, event.time_range.end))
    totals = {}
    for name, intervals in spans.items():
        intervals.sort()
        covered, end = 0.0, float("-inf")
        for begin, stop in intervals:
            covered += max(0.0, stop - max(begin, end))
            end = max(end, stop)
        totals[name] = (covered * 1e-6, len(intervals))
    return totals


def measure_breakdown(args: argparse.Namespace, device: torch.device) -> dict:
    """Figure (b): share of profiled faithful iterations in each ``mlbseg.*`` scope."""
    workload = Workload(2, args.features, (args.size, args.size), device, options={"channels_last": args.channels_last})
    engine = workload.stage2()
    clock = IterationClock(engine, device)
    clock.step()  # warm-up, outside the trace
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rows: list[tuple[float, dict[str, tuple[float, int]]]] = []
    for _ in range(args.repeats):
        with profile(activities=activities) as prof:
            elapsed = clock.step()
            sync(device)
        rows.append((elapsed, scope_totals(prof)))
    if args.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile))
    names = sorted({name for _, totals in rows for name in totals})
    return {
        "iterations": len(rows),
        "iteration_s_median": median([elapsed for elapsed, _ in rows]),
        "scopes": {
            name: {
                "median_s": median([totals.get(name, (0.0, 0))[0] for _, totals in rows]),
                "share_median": median([totals.get(name, (0.0, 0))[0] / elapsed for elapsed, totals in rows]),
                "calls_per_iteration": median([totals.get(name, (0.0, 0))[1] for _, totals in rows]),
            }
            for name in names
        },
    }


def print_ratios(a: dict) -> None:
    sup = a["supervised_step_s"]
    print(f"  supervised step (15 views, BCE, fwd+bwd+SGD): median {fmt_s(sup['median'])} {spread(sup['samples'])}")
    print(f"  {'mode':40s} {'stage-2 median':>15s} {'ratio (median of pairs)':>24s} {'ratio of medians':>17s}")
    for mode, r in a["modes"].items():
        print(
            f"  {mode:40s} {fmt_s(r['stage2_s']['median']):>15s} {r['ratio_median_of_pairs']:>23.2f}x "
            f"{r['ratio_of_medians']:>16.2f}x   samples {spread(r['stage2_s']['samples'])}"
        )
    for mode, err in a["unsupported"].items():
        print(f"  {mode:40s} not supported ({err})")


def print_breakdown(b: dict) -> None:
    print(
        f"  {b['iterations']} profiled iterations, median {fmt_s(b['iteration_s_median'])} (profiler overhead "
        "included); nested scopes are inside their parents' shares"
    )
    for name, r in sorted(b["scopes"].items(), key=lambda kv: -kv[1]["median_s"]):
        print(
            f"  {name:40s} {fmt_s(r['median_s']):>10s} {100 * r['share_median']:6.2f} %   "
            f"calls/it {r['calls_per_iteration']:.0f}"
        )


def main(argv: Sequence[str] | None = None) -> dict:
    p = benchmark_parser(__doc__)
    p.add_argument("--repeats", type=int, default=None, help="measured rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (default 1)")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS", help="also print the top ROWS ops of (b)")
    p.add_argument("--channels-last", action="store_true", help="GPU option: channels-last network (both sides)")
    p.add_argument("--compile", action="store_true", help="GPU option: torch.compile the forwards (both sides)")
    p.add_argument("--amp", action="store_true", help="GPU option: bf16 autocast (both sides)")
    args = parse_benchmark_args(p, argv, quick={"repeats": 2}, full={"repeats": 3})
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    info = start(args)
    device = torch.device(args.device)
    print(f"network: NestedUNet 2D {args.features}, slices {args.size} px, options {options(args) or 'none'}")
    out: dict = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "json"}}
    load = CpuLoad()
    print(f"\n(a) stage-2 iteration / supervised step ({args.warmup} warm-up + {args.repeats} interleaved rounds)")
    out["a_time_ratio"] = measure_ratios(args, device)
    print_ratios(out["a_time_ratio"])
    print("\n(b) share of the faithful stage-2 iteration in the library's mlbseg.* profiler scopes")
    out["b_scopes"] = measure_breakdown(args, device)
    print_breakdown(out["b_scopes"])
    print(f"\n{load.note()}")
    return finish(args, out)


if __name__ == "__main__":
    main(sys.argv[1:])
