#!/usr/bin/env python
"""
Cost of one MLB-Seg stage-2 iteration of :py:class:`monai_mlbseg.engines.MetaTrainer` against one plain supervised
step, where the iteration's time goes, and the cost per optimizer step of every named stage-2 method and pseudo-label
trust (figures (a), (b) and (g) of ``docs/benchmarks.md``).

(a) time of one stage-2 iteration / time of one supervised SGD step (MONAI's ``SupervisedTrainer``, BCE) on the same
    15 views with the same network, for the faithful trainer and the fast modes (``reuse_meta_grad``,
    ``meta_params``, both). Each engine's iterations are timed by its own Ignite events; the engines alternate one
    iteration at a time (interleaved pairs), so that a change of machine load affects both sides of a ratio alike.
(b) share of the faithful iteration in each ``mlbseg.*`` scope the library opens with
    ``torch.profiler.record_function``: the trainer's phases and the view, warp, pair-mapping and PLE functions,
    from ``torch.profiler`` traces of separate faithful iterations (overlapping calls of one scope are merged).
(g) every named stage-2 method of :py:data:`monai_mlbseg.engines.STAGE2_METHODS` and every pseudo-label trust of
    :py:data:`monai_mlbseg.engines.WEIGHTINGS` in the weak-to-strong method (rows ``trust:<name>``): time per iteration,
    per optimizer step (the trainer's ``schedule.steps_per_iteration``, one for a labeled-only method, checked
    against the optimizer's steps), and one optimizer step / one supervised SGD step on the views the method's
    student sees (15 views; 10 clean views for a labeled-only method, which runs with an empty unlabeled loader), in
    interleaved pairs as (a). One-off setup (the ``Events.STARTED`` handlers of a trainer's first run: a
    ``QualityPredictor``'s fit) is timed apart; rows whose trainers have the same ``run_settings`` are measured once.

Usage::

    python -m benchmarks.performance.iteration_cost                     # reduced width 16..256, 144 px, CPU if no GPU
    python -m benchmarks.performance.iteration_cost --device cuda --features 64,128,256,512,1024 --json out.json
    python -m benchmarks.performance.iteration_cost --figures g --methods weak_to_strong,instance_meta,trust:adaptive
    python -m benchmarks.performance.iteration_cost --quick             # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Events
from torch.profiler import ProfilerActivity, profile

from monai_mlbseg.engines import STAGE2_METHODS, WEIGHTINGS, MetaTrainer, pixel_weighting, stage2_method
from monai_mlbseg.engines.stage2 import WeightedStepOnly
from monai_mlbseg.experimental import QualityPredictor
from monai_mlbseg.transforms import PLEViews
from monai_mlbseg.utils import SCOPE_PREFIX

from .common import (
    CpuLoad,
    IterationClock,
    Workload,
    benchmark_parser,
    build_network,
    engine_options,
    finish,
    fmt_s,
    median,
    parse_benchmark_args,
    sgd,
    spread,
    stage2_modes,
    start,
    sync,
    synthetic_batch,
)

#: the figures of the script, in the order they run
FIGURES = ("a", "b", "g")
#: the prefix of figure (g)'s rows of a pseudo-label trust in the weak-to-strong method
TRUST_PREFIX = "trust:"


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


def method_rows() -> list[str]:
    """Figure (g)'s rows: every named stage-2 method, then ``trust:<name>`` for every pseudo-label trust."""
    return list(STAGE2_METHODS) + [TRUST_PREFIX + name for name in WEIGHTINGS]


def parse_methods(text: str) -> list[str]:
    """
    ``--methods``: ``all``, ``none`` or rows of :py:func:`method_rows` separated by commas (``methods`` and
    ``trusts`` stand for all of either kind), in the order given, without repeats.

    Raises:
        ValueError: for an unknown name (the message lists the known ones).
    """
    known = method_rows()
    groups = {
        "all": known,
        "none": [],
        "methods": list(STAGE2_METHODS),
        "trusts": [TRUST_PREFIX + name for name in WEIGHTINGS],
    }
    names: list[str] = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        if item not in groups and item not in known:
            raise ValueError(f"unknown method {item!r}; known: {', '.join(known)} (or all, none, methods, trusts).")
        names += [n for n in groups.get(item, [item]) if n not in names]
    return names


def method_and_trust(row: str) -> tuple[str, str | None]:
    """A row's stage-2 method and pseudo-label trust (``None``: the method's own weighting)."""
    if row.startswith(TRUST_PREFIX):
        return "weak_to_strong", row[len(TRUST_PREFIX) :]
    return row, None


def method_arguments(row: str) -> dict[str, Any]:
    """A row's ``MetaTrainer`` arguments, freshly built."""
    method, trust = method_and_trust(row)
    overrides = {} if trust is None else {"weighting": pixel_weighting(trust)}
    return stage2_method(method, **overrides)


def method_engine(workload: Workload, row: str) -> MetaTrainer:
    """
    A ``MetaTrainer`` of one iteration per epoch on the workload's fixed batches with a row's arguments (a
    labeled-only schedule makes clean steps on the clean loader alone).
    """
    kwargs = method_arguments(row)
    net = build_network(workload.dims, workload.features, workload.device, workload.options.get("channels_last", False))
    return MetaTrainer(
        workload.device,
        max_epochs=1,
        train_data_loader=[synthetic_batch(workload.num_unlabeled, workload.shape, workload.device, 1)],
        clean_data_loader=[synthetic_batch(workload.num_clean, workload.shape, workload.device, seed=2)],
        network=net,
        optimizer=sgd(net),
        views=PLEViews(workload.dims),
        epoch_length=1,
        **engine_options(workload.options),
        **kwargs,
    ).set_random_state(0)


def steps_per_iteration(trainer: MetaTrainer) -> int:
    """Optimizer steps of one iteration: the schedule's, or one clean step when the trainer has no unlabeled data."""
    return 1 if trainer.supervised_only else trainer.schedule.steps_per_iteration


def student_images(trainer: MetaTrainer, workload: Workload) -> tuple[int, int]:
    """
    ``(unlabeled, clean)`` images whose views the trainer's student is trained on in an iteration: the clean batch
    alone without unlabeled data, the unlabeled batch alone for a :py:class:`~monai_mlbseg.engines.WeightedStepOnly`
    schedule, both otherwise (the weighted step and the clean loss, in a clean or a joint step).
    """
    if trainer.supervised_only:
        return 0, workload.num_clean
    return workload.num_unlabeled, 0 if isinstance(trainer.schedule, WeightedStepOnly) else workload.num_clean


def quality_predictors(trainer: MetaTrainer) -> list[QualityPredictor]:
    """The quality predictors of a trainer's weighting and terms (each once)."""
    found = {}
    for part in (trainer.weighting, *trainer.terms):
        predictor = getattr(part, "predictor", None)
        if isinstance(predictor, QualityPredictor):
            found[id(predictor)] = predictor
    return list(found.values())


class MethodClock(IterationClock):
    """
    An :py:class:`~benchmarks.performance.common.IterationClock` of a ``MetaTrainer`` that also counts the student's
    optimizer steps in every iteration (a step post-hook of the trainer's optimizer) and times the one-off setup of
    the first run: from ``step()`` to the end of the ``Events.STARTED`` handlers registered when the trainer was built
    (a ``QualityPredictor``'s fit).

    Args:
        engine: a ``MetaTrainer``.
        device: its device.
    """

    def __init__(self, engine: MetaTrainer, device: torch.device) -> None:
        super().__init__(engine, device)
        self.steps: list[int] = []
        self.setup_s: float | None = None
        self._count, self._called = 0, 0.0
        engine.optimizer.register_step_post_hook(self._stepped)
        engine.add_event_handler(Events.STARTED, self._set_up)
        engine.add_event_handler(Events.ITERATION_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._counted)

    def _stepped(self, *_: Any) -> None:
        self._count += 1

    def _set_up(self, _: Any) -> None:
        if self.setup_s is None:
            sync(self.device)
            self.setup_s = time.perf_counter() - self._called

    def _reset(self, _: Any) -> None:
        self._count = 0

    def _counted(self, _: Any) -> None:
        self.steps.append(self._count)

    def step(self) -> float:
        if self.setup_s is None:
            sync(self.device)
            self._called = time.perf_counter()
        return super().step()


def measure_methods(args: argparse.Namespace, device: torch.device) -> dict:
    """
    Figure (g): interleaved pairs of one iteration of each stage-2 method (or trust) and one supervised step on the
    views its student sees; per row the time per iteration, per optimizer step and the ratio of one optimizer step
    to the supervised step (median of the pairs), the optimizer steps counted and the one-off setup.
    """
    workload = Workload(2, args.features, (args.size, args.size), device, options=options(args))
    clocks: dict[str, MethodClock] = {}
    info: dict[str, dict] = {}
    same_as: dict[str, str] = {}
    unsupported: dict[str, str] = {}
    measured_settings: dict[str, str] = {}
    supervised: dict[tuple[int, int], IterationClock] = {}
    for row in args.methods:
        try:
            engine = method_engine(workload, row)
        except (ValueError, TypeError) as e:
            unsupported[row] = f"{type(e).__name__}: {e}"
            continue
        settings = json.dumps(engine.run_settings, sort_keys=True, default=str)
        if settings in measured_settings:
            same_as[row] = measured_settings[settings]
            continue
        measured_settings[settings] = row
        predictors = quality_predictors(engine)
        configured = sum(p.steps for p in predictors)
        if args.fit_steps:
            for predictor in predictors:
                predictor.steps = args.fit_steps
        images = student_images(engine, workload)
        if images not in supervised:
            baseline = dataclasses.replace(workload, num_unlabeled=images[0], num_clean=images[1]).supervised()
            supervised[images] = IterationClock(baseline, device)
        clocks[row] = MethodClock(engine, device)
        method, trust = method_and_trust(row)
        info[row] = {
            "method": method,
            "trust": trust,
            "images": images,
            "student_views": int(supervised[images].engine.data_loader[0]["image"].shape[0]),
            "steps_per_iteration": steps_per_iteration(engine),
            "schedule_steps_per_iteration": engine.schedule.steps_per_iteration,
            "supervised_only": engine.supervised_only,
            "fit_steps": sum(p.steps for p in predictors),
            "fit_steps_configured": configured,
        }
    print(
        f"  rows measured: {', '.join(clocks)}"
        + (f"; same arguments: {', '.join(f'{r} = {o}' for r, o in same_as.items())}" if same_as else "")
        + (f"; unsupported: {', '.join(unsupported)}" if unsupported else "")
    )
    times: dict[str, list[float]] = defaultdict(list)
    paired: dict[str, list[float]] = defaultdict(list)
    counted: dict[str, list[int]] = defaultdict(list)
    for r in range(args.warmup + args.repeats):
        warm, line = r < args.warmup, []
        for row, clock in clocks.items():
            t_iteration = clock.step()
            t_sup = supervised[info[row]["images"]].step()
            line.append(f"{row} {t_iteration / info[row]['steps_per_iteration'] / t_sup:.2f}x")
            if not warm:
                times[row].append(t_iteration)
                paired[row].append(t_sup)
                counted[row].append(clock.steps[-1])
        label = "warm-up" if warm else f"round {r - args.warmup + 1}/{args.repeats}"
        print(f"    {label} (optimizer step / supervised step): " + "; ".join(line), flush=True)
    rows: dict[str, dict] = {}
    for row, clock in clocks.items():
        steps = info[row]["steps_per_iteration"]
        step_s = [t / steps for t in times[row]]
        fit_steps = info[row]["fit_steps"]
        rows[row] = {
            **{k: v for k, v in info[row].items() if k != "images"},
            "unlabeled_images": info[row]["images"][0],
            "clean_images": info[row]["images"][1],
            "optimizer_steps_counted": counted[row],
            "iteration_s": {"median": median(times[row]), "samples": times[row]},
            "step_s": {"median": median(step_s), "samples": step_s},
            "paired_supervised_s": paired[row],
            "ratio_step_to_supervised": median([a / b for a, b in zip(step_s, paired[row])]),
            "ratio_iteration_to_supervised": median([a / b for a, b in zip(times[row], paired[row])]),
            "setup_s": clock.setup_s,
            "fit_estimate_s": clock.setup_s * info[row]["fit_steps_configured"] / fit_steps if fit_steps else None,
            "same_as": None,
        }
    for row, other in same_as.items():
        method, trust = method_and_trust(row)
        rows[row] = {**rows[other], "method": method, "trust": trust, "same_as": other}
    baseline: dict[int, list[float]] = defaultdict(list)
    for row in clocks:
        baseline[rows[row]["student_views"]] += paired[row]
    order = [row for row in args.methods if row in rows]
    return {
        "rows": {row: rows[row] for row in order},
        "supervised_s": {
            f"{views} views": {"median": median(samples), "samples": samples} for views, samples in baseline.items()
        },
        "unsupported": unsupported,
    }


def print_methods(g: dict) -> None:
    print(
        "\n| method | optimizer steps / iteration | student views | iteration | per optimizer step "
        "| supervised step | step / supervised step | iteration / supervised step | one-off setup |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for row, r in g["rows"].items():
        setup = fmt_s(r["setup_s"]) if r["setup_s"] is not None else "n/a"
        if r["fit_estimate_s"] is not None:
            setup = (
                f"quality fit, {r['fit_steps']} of {r['fit_steps_configured']} steps: {setup} "
                f"(about {fmt_s(r['fit_estimate_s'])} for {r['fit_steps_configured']})"
            )
        name = row if r["same_as"] is None else f"{row} (= {r['same_as']})"
        print(
            f"| {name} | {r['steps_per_iteration']} | {r['student_views']} | {fmt_s(r['iteration_s']['median'])} "
            f"| {fmt_s(r['step_s']['median'])} | {fmt_s(median(r['paired_supervised_s']))} "
            f"| {r['ratio_step_to_supervised']:.2f}x | {r['ratio_iteration_to_supervised']:.2f}x | {setup} |"
        )
    for row, err in g["unsupported"].items():
        print(f"| {row} | not supported ({err}) | | | | | | | |")
    wrong = [
        row for row, r in g["rows"].items() if any(n != r["steps_per_iteration"] for n in r["optimizer_steps_counted"])
    ]
    if wrong:
        print(f"\n  warning: optimizer steps counted differ from steps per iteration for {', '.join(wrong)}")


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
    p.add_argument("--figures", default=",".join(FIGURES), help="figures to measure (default a,b,g)")
    p.add_argument(
        "--methods",
        default="all",
        help=f"rows of (g), comma-separated (default all): {', '.join(method_rows())}; or methods, trusts, none",
    )
    p.add_argument(
        "--fit-steps",
        type=int,
        default=None,
        help="(g): steps of a QualityPredictor's one-off fit (default 20; --quick: 3; 0: its own, 300)",
    )
    args = parse_benchmark_args(p, argv, quick={"repeats": 2, "fit_steps": 3}, full={"repeats": 3, "fit_steps": 20})
    if args.repeats < 1 or args.warmup < 0 or args.fit_steps < 0:
        p.error("--repeats must be >= 1, --warmup and --fit-steps >= 0")
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    if not figures or any(f not in FIGURES for f in figures):
        p.error(f"--figures takes some of {','.join(FIGURES)}, got {args.figures!r}")
    try:
        args.methods = parse_methods(args.methods)
    except ValueError as e:
        p.error(str(e))
    info = start(args)
    device = torch.device(args.device)
    print(f"network: NestedUNet 2D {args.features}, slices {args.size} px, options {options(args) or 'none'}")
    out: dict = {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "json"}}
    load = CpuLoad()
    if "a" in figures:
        print(f"\n(a) stage-2 iteration / supervised step ({args.warmup} warm-up + {args.repeats} interleaved rounds)")
        out["a_time_ratio"] = measure_ratios(args, device)
        print_ratios(out["a_time_ratio"])
    if "b" in figures:
        print("\n(b) share of the faithful stage-2 iteration in the library's mlbseg.* profiler scopes")
        out["b_scopes"] = measure_breakdown(args, device)
        print_breakdown(out["b_scopes"])
    if "g" in figures and args.methods:
        print(
            f"\n(g) every stage-2 method and pseudo-label trust: optimizer step / supervised step on the same views "
            f"({args.warmup} warm-up + {args.repeats} interleaved rounds)"
        )
        began = time.perf_counter()
        out["g_methods"] = measure_methods(args, device)
        print_methods(out["g_methods"])
        print(f"\n  (g) took {time.perf_counter() - began:.0f} s")
    print(f"\n{load.note()}")
    return finish(args, out)


if __name__ == "__main__":
    main(sys.argv[1:])
