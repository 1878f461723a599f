#!/usr/bin/env python
"""
Cost of one MLB-Seg stage-2 iteration of :py:class:`monai_mlbseg.engines.MetaTrainer`, measured through the public API.

Figures (see ``docs/benchmarks.md``):

(a) time of one stage-2 iteration / time of one plain supervised SGD step (BCE) on the same 15 views with the same
    network, for the faithful trainer and the fast modes (``reuse_meta_grad``, ``meta_params``, both);
(b) share of the faithful iteration spent in views, inverse warps, pair mapping and PLE ensembling (plus a coarse
    phase breakdown);
(c) peak memory of a stage-2 iteration / peak memory of the supervised step (fresh subprocess each);
(d) inference throughput and whole-volume latency of ``SliceResizeInferer``;
(e) share of a real ``MetaTrainer`` run spent waiting on ``DataLoader`` s of ``SliceDataset`` s.

Timings are medians over interleaved pairs measured in one run after warm-up. Instrumentation (monkeypatched timers)
lives in this process only; the library is not modified.

Usage::

    python benchmarks/stage2.py                      # default: reduced width 16..256, 144 px, CPU if no GPU
    python benchmarks/stage2.py --device cuda --features 64,128,256,512,1024 --json out.json
    python benchmarks/stage2.py --quick              # tiny smoke configuration
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MEMORY_MARKER = "MLBSEG_MEMORY_JSON "
LR, MOMENTUM, WEIGHT_DECAY = 0.005, 0.9, 5e-4  # the reference optimiser
NUM_UNLABELED, NUM_CLEAN = 1, 2  # slices per iteration (x 5 views = 15 views)
KEEP_ALIVE: list = []  # objects kept until exit (see measure_data)


# ----------------------------------------------------------------------------------------------------------- utils
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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


def machine_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    import monai

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
    }
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            info["memory_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    info["library"] = library_version()
    return info


def library_version() -> str:
    """Git commit of the measured ``monai_mlbseg`` checkout, with a digest of its uncommitted changes if any."""
    import hashlib

    import monai_mlbseg

    root = os.path.dirname(os.path.dirname(os.path.abspath(monai_mlbseg.__file__)))
    try:
        head = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", root, "diff", "HEAD", "--", "monai_mlbseg"], capture_output=True, text=True, check=True
        ).stdout
        untracked = subprocess.run(
            ["git", "-C", root, "ls-files", "--others", "--exclude-standard", "--", "monai_mlbseg"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return f"monai_mlbseg {getattr(monai_mlbseg, '__version__', '?')} (no git)"
    diff += untracked
    if not diff:
        return f"git {head}"
    return f"git {head} + uncommitted changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})"


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
        cpus = os.cpu_count() or 1
        return {
            "wall_s": wall,
            "other_core_s": other,
            "other_share_of_machine": other / max(wall * cpus, 1e-9),
            "steal_core_s": end[2] - self.start[2],
        }


def load_note(load: dict | None) -> str:
    if not load:
        return ""
    return (
        f"other processes used {load['other_core_s']:.1f} core-s ({100 * load['other_share_of_machine']:.0f} % "
        f"of the machine; steal {load['steal_core_s']:.1f} core-s)"
    )


# ------------------------------------------------------------------------------------------------ synthetic data
def synthetic_slices(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` min-max scaled images of a bright ellipse in noise ``[n, 1, S, S]`` and imperfect labels (shifted)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images, labels = [], []
    for _ in range(n):
        c = torch.rand(2, generator=g) * 0.6 - 0.3
        r = 0.2 + 0.3 * torch.rand(2, generator=g)
        mask = ((((xx - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2) < 1).float()
        image = 0.8 * mask + 0.3 * torch.randn(size, size, generator=g)
        image = (image - image.min()) / (image.max() - image.min())
        images.append(image[None])
        labels.append(torch.roll(mask, shifts=(2, -2), dims=(0, 1))[None])
    return torch.stack(images), torch.stack(labels)


def synthetic_volume(shape: Sequence[int], seed: int, initial: bool) -> dict:
    """A left-atrium-like volume ``[1, X, Y, Z]`` of the library's generator, with its label (shifted when
    ``initial``, as an imperfect initial label)."""
    from monai_mlbseg.data import synthetic_case

    image, mask = synthetic_case(np.random.default_rng(seed), shape, kind="la")
    label = np.roll(mask, (3, -3), axis=(0, 1)) if initial else mask
    return {
        "image": torch.from_numpy(image)[None],
        "label": torch.from_numpy(label)[None],
        "case_id": f"synthetic{seed}",
    }


def load_item(item: dict) -> dict:
    """The ``load`` of :py:class:`SliceDataset` for in-memory items (module level: picklable)."""
    return {"image": item["image"], "label": item["label"]}


# -------------------------------------------------------------------------------------------------- the set-ups
def build_network(features: Sequence[int], device: torch.device, seed: int) -> torch.nn.Module:
    from monai_mlbseg.networks import NestedUNet

    torch.manual_seed(seed)
    return NestedUNet(spatial_dims=2, in_channels=1, out_channels=1, features=tuple(features)).to(device)


def sgd(network: torch.nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(network.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def last_decoder_blocks(features: Sequence[int]) -> list[str]:
    return [f"nodes.conv0_{len(features) - 1}", "final"]


def stage2_modes(features: Sequence[int]) -> dict[str, dict]:
    last = last_decoder_blocks(features)
    return {
        "faithful": {},
        "reuse_meta_grad": {"reuse_meta_grad": True},
        "meta_params=" + "+".join(last): {"meta_params": last},
        "reuse_meta_grad+meta_params": {"reuse_meta_grad": True, "meta_params": last},
    }


class Setup:
    """One network, the fixed unlabeled batch and clean batch, their 15 views and labels, and the trainers."""

    def __init__(
        self,
        features: Sequence[int],
        size: int,
        device: torch.device,
        seed: int = 0,
        channels_last: bool = False,
        compile: bool = False,
        amp: str | None = None,
    ) -> None:
        self.device = device
        self.features = tuple(features)
        self.network = build_network(features, device, seed)
        if channels_last:
            self.network = self.network.to(memory_format=torch.channels_last)
        # GPU options, applied alike to both sides of every ratio
        self.options: dict[str, Any] = {}
        if amp:
            dtype = torch.bfloat16 if amp == "bf16" else torch.float16
            self.options.update(amp=True, amp_kwargs={"dtype": dtype})
        if compile:
            self.options["compile"] = True
        self.supervised_forward = torch.compile(self.network) if compile else self.network
        self.optimizer = sgd(self.network)  # shared by the stage-2 trainers
        self.supervised_optimizer = sgd(self.network)  # the plain step's own momentum buffers
        images, labels = synthetic_slices(NUM_UNLABELED + NUM_CLEAN, size, seed)
        self.batch = {"image": images[:NUM_UNLABELED].to(device), "label": labels[:NUM_UNLABELED].to(device)}
        self.clean = {"image": images[NUM_UNLABELED:].to(device), "label": labels[NUM_UNLABELED:].to(device)}
        self.trainers: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        # the 15 views (5 unlabeled + 10 clean) and their labels for the supervised step, drawn once
        from monai_mlbseg.transforms import PLEViews

        views = PLEViews(spatial_dims=2).set_random_state(seed)
        x_unlabeled, y_unlabeled = views(self.batch["image"]), views.warp(self.batch["label"], threshold=0.5)
        x_clean, y_clean = views(self.clean["image"]), views.warp(self.clean["label"], threshold=0.5)
        self.sup_x = torch.cat([x_unlabeled, x_clean]).contiguous()
        self.sup_y = torch.cat([y_unlabeled, y_clean]).contiguous()

    def trainer(self, mode: str, **kwargs: Any) -> Any:
        """A ``MetaTrainer`` on the shared network/optimizer with a fixed-batch loader (``None`` if unsupported)."""
        from monai_mlbseg.engines import MetaTrainer

        if mode in self.trainers or mode in self.errors:
            return self.trainers.get(mode)
        try:
            trainer = MetaTrainer(
                self.device,
                max_epochs=1,
                train_data_loader=[self.batch],
                clean_data_loader=[self.clean],
                network=self.network,
                optimizer=self.optimizer,
                **self.options,
                **kwargs,
            )
        except (ValueError, TypeError) as e:
            self.errors[mode] = f"{type(e).__name__}: {e}"
            return None
        trainer.set_random_state(0)
        self.trainers[mode] = trainer
        return trainer

    def stage2_step(self, mode: str) -> None:
        trainer = self.trainers[mode]
        trainer.state.iteration += 1  # as Ignite does before ITERATION_STARTED (the EMA reads it)
        trainer._iteration(trainer, self.batch)

    def supervised_step(self) -> None:
        net, opt = self.network, self.supervised_optimizer
        net.train()
        opt.zero_grad(set_to_none=True)
        amp = self.options.get("amp_kwargs")
        with torch.autocast(self.device.type, enabled=amp is not None, **(amp or {})):
            logits = self.supervised_forward(self.sup_x)
        loss = F.binary_cross_entropy_with_logits(logits.float(), self.sup_y)
        loss.backward()
        opt.step()


# -------------------------------------------------------------------------------------------- instrumentation
class OutermostTimer:
    """
    Times calls of wrapped callables, attributing nested calls to the outermost wrapped one (no double counting).
    On CUDA the device is synchronised at the outermost entry and exit.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.depth = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list[Callable[[], None]] = []

    def reset(self) -> None:
        self.totals.clear()
        self.calls.clear()

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            if self.depth:
                self.depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.depth -= 1
            sync(self.device)
            start = time.perf_counter()
            self.depth = 1
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.depth = 0
                self.totals[name] += time.perf_counter() - start
                self.calls[name] += 1

        return timed_call

    def patch_function(self, fn: Callable, name: str, package: str = "monai_mlbseg") -> int:
        """Replace ``fn`` in every loaded module of ``package`` that holds it under some name; returns the count."""
        count = 0
        for modname, module in list(sys.modules.items()):
            if module is None or not (modname == package or modname.startswith(package + ".")):
                continue
            for attr, value in list(vars(module).items()):
                if value is fn:
                    setattr(module, attr, self.wrap(name, fn))
                    self._undo.append(functools.partial(setattr, module, attr, fn))
                    count += 1
        return count

    def patch_method(self, owner: Any, attr: str, name: str) -> bool:
        """Wrap ``owner.attr`` (a class or an instance attribute); ``False`` when it does not exist."""
        if not hasattr(owner, attr):
            return False
        had_own = attr in vars(owner)
        original_own = vars(owner).get(attr)
        # a class: wrap the plain function (it becomes a method again); an instance: wrap the bound method
        original = original_fn(owner, attr) if isinstance(owner, type) else getattr(owner, attr)
        setattr(owner, attr, self.wrap(name, original))

        def undo() -> None:
            if had_own:
                setattr(owner, attr, original_own)
            else:
                delattr(owner, attr)

        self._undo.append(undo)
        return True

    def restore(self) -> None:
        while self._undo:
            self._undo.pop()()


def original_fn(cls: type, attr: str) -> Callable:
    """The plain function ``cls.attr`` resolves to through the MRO."""
    for klass in cls.__mro__:
        if attr in vars(klass):
            return vars(klass)[attr]
    raise AttributeError(attr)


#: the view / warp / ensembling functions of figure (b), by the label they are reported under.
VIEW_FUNCTIONS = {
    "warp_to_views": "warp_to_views (label views)",
    "warp_from_views": "warp_from_views (inverse warps)",
    "map_view_pairs": "map_view_pairs (L_pc pair mapping)",
    "ple_pseudo_labels": "ple_pseudo_labels (PLE ensembling)",
}
VIEW_CALL = "view transform __call__ (image views)"


@contextlib.contextmanager
def view_instrumentation(trainer: Any, timer: OutermostTimer, context: OutermostTimer):
    """Install the timers of figure (b) around one trainer; restore everything on exit."""
    import monai_mlbseg.transforms.functional as vf

    patched = {}
    for fname, label in VIEW_FUNCTIONS.items():
        fn = getattr(vf, fname, None)
        patched[label] = timer.patch_function(fn, label) if fn is not None else 0
    patched[VIEW_CALL] = int(timer.patch_method(type(trainer.views), "__call__", VIEW_CALL))
    # coarse phases (independent outermost timer): look-ahead, backward+clip+step, teacher forward, clean forward
    if getattr(trainer, "lookahead", None) is not None:
        context.patch_method(type(trainer.lookahead), "__call__", "look-ahead (A-C)")
    for attr, label in (
        ("_step", "backward + clip + SGD step (both steps)"),
        ("_clean_step_loss", "clean-step forward (student + teacher + regularisers)"),
        ("_teacher_probs", "teacher forward on the unlabeled views"),
    ):
        context.patch_method(trainer, attr, label)
    try:
        yield patched
    finally:
        context.restore()
        timer.restore()


# --------------------------------------------------------------------------------------------- (a) and (b)
def measure_time(setup: Setup, args: argparse.Namespace, out: dict) -> None:
    device = setup.device
    modes = stage2_modes(setup.features)
    for mode, kwargs in modes.items():
        setup.trainer(mode, **kwargs)
    active = [m for m in modes if m in setup.trainers]
    times: dict[str, list[float]] = {m: [] for m in active}
    sup_after: dict[str, list[float]] = {m: [] for m in active}
    ratios: dict[str, list[float]] = {m: [] for m in active}
    view_timer, context_timer = OutermostTimer(device), OutermostTimer(device)
    instrument_inline = device.type == "cpu"  # CPU timers cost microseconds and never synchronise
    breakdown: list[dict] = []
    patched: dict = {}

    def faithful_instrumented() -> float:
        nonlocal patched
        view_timer.reset()
        context_timer.reset()
        trainer = setup.trainers["faithful"]
        with view_instrumentation(trainer, view_timer, context_timer) as patched:
            elapsed = timed(lambda: setup.stage2_step("faithful"), device)
        breakdown.append(
            {
                "iteration_s": elapsed,
                "views": dict(view_timer.totals),
                "calls": dict(view_timer.calls),
                "phases": dict(context_timer.totals),
            }
        )
        return elapsed

    print(f"  modes: {', '.join(active)}" + (f"; unsupported: {', '.join(setup.errors)}" if setup.errors else ""))
    for r in range(args.warmup + args.repeats):
        warm = r < args.warmup
        row = []
        for mode in active:
            if mode == "faithful" and instrument_inline and not warm:
                t_stage2 = faithful_instrumented()
            else:
                t_stage2 = timed(lambda m=mode: setup.stage2_step(m), device)
            if warm and mode != active[0]:  # one supervised warm-up step is enough
                row.append(f"{mode} {fmt_s(t_stage2)}")
                continue
            t_sup = timed(setup.supervised_step, device)
            row.append(f"{mode} {fmt_s(t_stage2)} / sup {fmt_s(t_sup)}")
            if not warm:
                times[mode].append(t_stage2)
                sup_after[mode].append(t_sup)
                ratios[mode].append(t_stage2 / t_sup)
        tag = "warm-up" if warm else f"round {r - args.warmup + 1}/{args.repeats}"
        print(f"    {tag}: " + "; ".join(row))
    if not instrument_inline and "faithful" in active:
        for _ in range(args.repeats):
            faithful_instrumented()

    sup_all = [t for m in active for t in sup_after[m]]
    res_a = {
        "supervised_step_s": {"median": median(sup_all), "samples": sup_all},
        "modes": {},
        "unsupported": dict(setup.errors),
    }
    for mode in active:
        res_a["modes"][mode] = {
            "stage2_s": {"median": median(times[mode]), "samples": times[mode]},
            "paired_supervised_s": sup_after[mode],
            "ratio_median_of_pairs": median(ratios[mode]),
            "ratio_samples": ratios[mode],
            "ratio_of_medians": median(times[mode]) / median(sup_all),
        }
    out["a_time_ratio"] = res_a

    res_b: dict = {}
    if breakdown:
        labels = list(VIEW_FUNCTIONS.values()) + [VIEW_CALL]
        per_fn = {
            label: {
                "median_s": median([b["views"].get(label, 0.0) for b in breakdown]),
                "share_median": median([b["views"].get(label, 0.0) / b["iteration_s"] for b in breakdown]),
                "calls_per_iteration": median([b["calls"].get(label, 0) for b in breakdown]),
                "patched_sites": patched.get(label, 0),
            }
            for label in labels
        }
        total_share = [sum(b["views"].values()) / b["iteration_s"] for b in breakdown]
        phase_labels = sorted({k for b in breakdown for k in b["phases"]})
        phases = {
            label: {
                "median_s": median([b["phases"].get(label, 0.0) for b in breakdown]),
                "share_median": median([b["phases"].get(label, 0.0) / b["iteration_s"] for b in breakdown]),
            }
            for label in phase_labels
        }
        rest = [1 - sum(b["phases"].values()) / b["iteration_s"] for b in breakdown]
        res_b = {
            "iterations": len(breakdown),
            "iteration_s_median": median([b["iteration_s"] for b in breakdown]),
            "instrumented_with_figure_a": instrument_inline,
            "functions": per_fn,
            "total_share_median": median(total_share),
            "total_s_median": median([sum(b["views"].values()) for b in breakdown]),
            "phases": phases,
            "rest_share_median": median(rest),
        }
    out["b_view_share"] = res_b


def print_time(out: dict) -> None:
    a = out["a_time_ratio"]
    print(
        f"  supervised step (15 views, BCE, fwd+bwd+SGD): median {fmt_s(a['supervised_step_s']['median'])} "
        f"{spread(a['supervised_step_s']['samples'])}"
    )
    print(f"  {'mode':40s} {'stage-2 median':>15s} {'ratio (median of pairs)':>24s} {'ratio of medians':>17s}")
    for mode, r in a["modes"].items():
        print(
            f"  {mode:40s} {fmt_s(r['stage2_s']['median']):>15s} {r['ratio_median_of_pairs']:>23.2f}x "
            f"{r['ratio_of_medians']:>16.2f}x   samples {spread(r['stage2_s']['samples'])}"
        )
    for mode, err in a["unsupported"].items():
        print(f"  {mode:40s} not supported by this library version ({err})")
    b = out.get("b_view_share") or {}
    if b:
        print(
            f"\n(b) share of the faithful stage-2 iteration in views / warps / ensembling "
            f"({b['iterations']} iterations, median iteration {fmt_s(b['iteration_s_median'])}; outermost calls only)"
        )
        for label, r in b["functions"].items():
            print(
                f"  {label:45s} {fmt_s(r['median_s']):>10s} {100 * r['share_median']:6.2f} %   "
                f"calls/it {r['calls_per_iteration']:.0f}" + ("" if r["patched_sites"] else "   (not found)")
            )
        print(f"  {'total':45s} {fmt_s(b['total_s_median']):>10s} {100 * b['total_share_median']:6.2f} %")
        print("  coarse phases (outermost only; for orientation):")
        for label, r in b["phases"].items():
            print(f"    {label:55s} {fmt_s(r['median_s']):>10s} {100 * r['share_median']:6.1f} %")
        print(
            f"    {'rest (student fwd 5 views, regulariser backward, PLE, losses, EMA)':55s} "
            f"{'':>10s} {100 * b['rest_share_median']:6.1f} %"
        )


# ---------------------------------------------------------------------------------------------------- (c) memory
def current_rss() -> int:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return max_rss()


def max_rss() -> int:
    """``ru_maxrss`` in bytes. On Linux a child inherits its parent's value through fork + exec, so the parent runs
    the memory workers before it grows (and the workers also report ``VmHWM``, which starts afresh at exec)."""
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
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0, ``/proc/self/clear_refs``); ``False`` when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_worker(args: argparse.Namespace) -> None:
    """Runs in a fresh process: one kind of step, its peak memory as JSON on stdout."""
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    setup = Setup(args.features, args.size, device, **gpu_options(args))
    if args.memory_worker == "supervised":
        step = setup.supervised_step
    else:
        kwargs = stage2_modes(setup.features).get(args.memory_worker)
        if kwargs is None or setup.trainer(args.memory_worker, **kwargs) is None:
            print(MEMORY_MARKER + json.dumps({"error": setup.errors.get(args.memory_worker, "unknown mode")}))
            return
        step = functools.partial(setup.stage2_step, args.memory_worker)
    gc.collect()
    steps = max(args.memory_steps, 1)
    result: dict = {"kind": args.memory_worker, "steps": steps}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        for _ in range(steps - 1):
            step()
        torch.cuda.synchronize(device)
        earlier = torch.cuda.max_memory_allocated(device)
        last_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        last = torch.cuda.max_memory_allocated(device)
        peak = max(earlier, last)
        result.update(
            before_bytes=before,
            peak_bytes=peak,
            increment_bytes=peak - before,
            last_step_before_bytes=last_before,
            last_step_peak_bytes=last,
            last_step_increment_bytes=last - last_before,
        )
    else:
        before, max_before = current_rss(), max_rss()
        for _ in range(steps - 1):
            step()
        last_before, hwm_reset = current_rss(), reset_hwm()
        step()
        peak, hwm = max_rss(), vm_hwm()
        result.update(
            before_bytes=before,
            max_rss_before_steps_bytes=max_before,
            peak_bytes=peak,
            increment_bytes=max(peak - before, 0),
            peak_reached_in_steps=peak > max_before,
            last_step_before_bytes=last_before,
            last_step_peak_bytes=hwm if hwm_reset else None,
            last_step_increment_bytes=(hwm - last_before) if hwm_reset and hwm is not None else None,
        )
    print(MEMORY_MARKER + json.dumps(result))


def gpu_options(args: argparse.Namespace) -> dict:
    """The ``Setup`` keywords of the GPU options on the command line."""
    return {"channels_last": args.channels_last, "compile": args.compile, "amp": args.amp}


def gpu_option_args(args: argparse.Namespace) -> list[str]:
    """The same options as command-line arguments (for the memory workers)."""
    return (
        (["--channels-last"] if args.channels_last else [])
        + (["--compile"] if args.compile else [])
        + (["--amp", args.amp] if args.amp else [])
    )


def measure_memory(args: argparse.Namespace, out: dict) -> None:
    kinds = ["faithful", "supervised"] + (
        [m for m in stage2_modes(args.features) if m != "faithful"] if args.memory_all_modes else []
    )
    results = {}
    for kind in kinds:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--memory-worker",
            kind,
            "--device",
            args.device,
            "--features",
            ",".join(map(str, args.features)),
            "--size",
            str(args.size),
            "--threads",
            str(args.threads),
            "--memory-steps",
            str(args.memory_steps),
            *gpu_option_args(args),
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MEMORY_MARKER)]
        if proc.returncode != 0 or not lines:
            results[kind] = {"error": f"rc {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        else:
            results[kind] = json.loads(lines[-1][len(MEMORY_MARKER) :])
        results[kind]["subprocess_s"] = time.perf_counter() - start
    cuda = args.device.startswith("cuda")
    res: dict = {
        "method": "cuda max_memory_allocated" if cuda else "ru_maxrss + VmHWM",
        "parent_rss_bytes": current_rss(),
    }
    res.update(results)
    f, s = results.get("faithful", {}), results.get("supervised", {})
    if "peak_bytes" in f and "peak_bytes" in s:
        res["ratio_peak"] = f["peak_bytes"] / s["peak_bytes"]
        res["ratio_increment"] = f["increment_bytes"] / max(s["increment_bytes"], 1)
        if f.get("last_step_increment_bytes") and s.get("last_step_increment_bytes"):
            res["ratio_last_step_peak"] = f["last_step_peak_bytes"] / s["last_step_peak_bytes"]
            res["ratio_last_step_increment"] = f["last_step_increment_bytes"] / s["last_step_increment_bytes"]
    out["c_memory"] = res


def print_memory(out: dict) -> None:
    c = out["c_memory"]
    cuda = c["method"].startswith("cuda")
    if cuda:
        print("  method: torch.cuda.max_memory_allocated after reset_peak_memory_stats (fresh subprocess each)")
    else:
        print(
            "  method: fresh subprocess each (started before this process grew); peak = ru_maxrss after all steps, "
            "increment = peak - RSS just before the first step;\n"
            "          last step = VmHWM reset (clear_refs) just before the last step, minus the RSS then"
        )
    for kind, r in c.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            print(f"  {kind:12s} error: {r['error'][-300:]}")
            continue
        extra = ""
        if r.get("peak_reached_in_steps") is False:
            extra = "  (ru_maxrss not exceeded during the steps: inherited/set-up high-water mark; use the last-step)"
        last = ""
        if r.get("last_step_increment_bytes") is not None:
            last = (
                f"; last step: peak {mib(r['last_step_peak_bytes']):7.1f} MiB, "
                f"increment {mib(r['last_step_increment_bytes']):7.1f} MiB"
            )
        print(
            f"  {kind:12s} before {mib(r['before_bytes']):7.1f} MiB, peak {mib(r['peak_bytes']):7.1f} MiB, "
            f"increment {mib(r['increment_bytes']):7.1f} MiB ({r['steps']} steps){last}{extra}"
        )
    if "ratio_peak" in c:
        line = f"  ratio faithful/supervised: peaks {c['ratio_peak']:.2f}x, increments {c['ratio_increment']:.2f}x"
        if "ratio_last_step_increment" in c:
            line += (
                f"; last step: peaks {c['ratio_last_step_peak']:.2f}x, increments {c['ratio_last_step_increment']:.2f}x"
            )
        print(line)


# ------------------------------------------------------------------------------------------------- (d) inference
def measure_inference(setup: Setup, args: argparse.Namespace, out: dict) -> None:
    from monai_mlbseg.inferers import SliceResizeInferer

    device, net = setup.device, setup.network
    inferer = SliceResizeInferer(roi_size=(args.size, args.size))
    volume = synthetic_volume(args.volume, seed=7, initial=False)["image"][None].to(device)  # [1, 1, X, Y, Z]
    depth, sw = volume.shape[-1], inferer.sw_batch_size
    warm = volume[..., : min(depth, sw)]  # one full chunk
    net.eval()
    latencies = []
    with torch.no_grad():
        timed(lambda: inferer(warm, net), device)
        for _ in range(args.inference_runs):
            latencies.append(timed(lambda: inferer(volume, net), device))
    net.train()
    out["d_inference"] = {
        "volume_shape": list(volume.shape[2:]),
        "slices": depth,
        "sw_batch_size": sw,
        "roi_size": [args.size, args.size],
        "latency_s": {"median": median(latencies), "samples": latencies},
        "slices_per_s": depth / median(latencies),
    }


def print_inference(out: dict) -> None:
    d = out["d_inference"]
    print(
        f"  volume {'x'.join(map(str, d['volume_shape']))} ({d['slices']} slices, roi {d['roi_size'][0]}, "
        f"sw_batch_size {d['sw_batch_size']}): latency median {fmt_s(d['latency_s']['median'])} "
        f"{spread(d['latency_s']['samples'])}, {d['slices_per_s']:.1f} slices/s"
    )


# ---------------------------------------------------------------------------------------------------- (e) data
class TimedIterable:
    """Wraps a loader; records the time of ``iter()`` + each ``next()`` (i.e. every batch fetch)."""

    def __init__(self, loader: Iterable, device: torch.device) -> None:
        self.loader = loader
        self.device = device
        self.fetches: list[float] = []

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __iter__(self):
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


def measure_data(setup: Setup, args: argparse.Namespace, out: dict) -> None:
    from ignite.engine import Events
    from monai.data import DataLoader

    from monai_mlbseg.data.slices import SliceDataset
    from monai_mlbseg.engines import MetaTrainer
    from monai_mlbseg.pipeline import slice_augmentation, slice_preprocessing

    device = setup.device
    unlabeled = [synthetic_volume(args.volume, seed=100 + i, initial=True) for i in range(2)]
    clean = [synthetic_volume(args.volume, seed=200, initial=False)]
    start = time.perf_counter()
    common = {
        "load": load_item,
        "slice_transform": slice_preprocessing((args.size, args.size), label_keys=("label",)),
        "transform": slice_augmentation(keys=("image", "label"), label_keys=("label",)),
        "keys": ("image", "label"),
        "progress": False,
    }
    unl_ds, clean_ds = SliceDataset(unlabeled, **common), SliceDataset(clean, **common)
    res: dict = {
        "dataset_build_s": time.perf_counter() - start,
        "unlabeled_slices": len(unl_ds),
        "clean_slices": len(clean_ds),
        "cached": bool(unl_ds.cached and clean_ds.cached),
        "configs": {},
    }
    for workers in args.data_workers:
        loader_kw = {"num_workers": workers, "persistent_workers": workers > 0, "shuffle": True}
        unl_loader = DataLoader(unl_ds, batch_size=NUM_UNLABELED, **loader_kw)
        clean_loader = TimedIterable(DataLoader(clean_ds, batch_size=NUM_CLEAN, **loader_kw), device)
        trainer = MetaTrainer(
            device,
            max_epochs=1,
            train_data_loader=unl_loader,
            clean_data_loader=clean_loader.loader,
            network=setup.network,
            optimizer=setup.optimizer,
            epoch_length=args.data_iterations,
        )
        trainer.set_random_state(0)
        trainer.clean_data_loader = clean_loader  # the trainer cycles it itself inside the iteration
        marks: dict[str, list[float]] = defaultdict(list)
        for event, key in (
            (Events.STARTED, "started"),
            (Events.GET_BATCH_STARTED, "get_started"),
            (Events.GET_BATCH_COMPLETED, "get_completed"),
            (Events.ITERATION_COMPLETED, "iteration_completed"),
        ):
            trainer.add_event_handler(event, lambda e, k=key, m=marks: (sync(device), m[k].append(time.perf_counter())))
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
            "iteration_span_s": span,
            "share_of_run": sum(wait) / total,
            "share_steady": sum(wait[steady]) / sum(span[steady]),
            "mean_iteration_s": sum(span) / max(n, 1),
        }
        # keep the loaders (and their persistent workers) until exit: deleting them here makes the DataLoader join
        # each worker with a 5 s timeout, which measures nothing useful; at interpreter exit the join is skipped
        KEEP_ALIVE.append((trainer, unl_loader, clean_loader))
    out["e_data"] = res


def print_data(out: dict) -> None:
    e = out["e_data"]
    print(
        f"  datasets: {e['unlabeled_slices']} unlabeled + {e['clean_slices']} clean slices, cached={e['cached']}, "
        f"built in {fmt_s(e['dataset_build_s'])}"
    )
    for name, r in e["configs"].items():
        first = r["unlabeled_fetch_s"][0] + r["clean_fetch_s"][0] if r["iterations"] else float("nan")
        steady_u = median(r["unlabeled_fetch_s"][1:]) if r["iterations"] > 1 else float("nan")
        steady_c = median(r["clean_fetch_s"][1:]) if r["iterations"] > 1 else float("nan")
        print(
            f"  {name}: {r['iterations']} iterations, run {fmt_s(r['run_wall_s'])}, start-up {fmt_s(r['startup_s'])}; "
            f"first fetch {fmt_s(first)}; later fetches unlabeled {fmt_s(steady_u)} + clean {fmt_s(steady_c)}; "
            f"waiting share {100 * r['share_of_run']:.3f} % of the run, {100 * r['share_steady']:.3f} % after the "
            f"first iteration; mean iteration {fmt_s(r['mean_iteration_s'])}"
        )


# ------------------------------------------------------------------------------------------------------ profile
def profile_iteration(setup: Setup, rows: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if setup.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        setup.stage2_step("faithful")
        sync(setup.device)
    key = "self_cuda_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


# ---------------------------------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    def ints(text: str) -> list[int]:
        return [int(v) for v in text.split(",") if v.strip()]

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available, else cpu")
    p.add_argument("--features", type=ints, default=None, help="NestedUNet widths (default 16,32,64,128,256)")
    p.add_argument("--size", type=int, default=None, help="slice size (default 144)")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds (default 3)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 2; --quick: 1)")
    p.add_argument("--json", default=None, help="also write all figures (and samples) to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny smoke configuration (features 4,8,16, size 32)")
    p.add_argument(
        "--sections",
        default="time,memory,inference,data",
        help="comma list of: time (a+b), memory (c), inference (d), data (e)",
    )
    p.add_argument("--memory-steps", type=int, default=None, help="steps per memory subprocess (default 2)")
    p.add_argument("--memory-all-modes", action="store_true", help="(c) also for the fast modes")
    p.add_argument("--inference-runs", type=int, default=None, help="timed volume runs (default 3)")
    p.add_argument("--volume", type=ints, default=None, help="inference/data volume shape (default 200,140,88)")
    p.add_argument("--data-iterations", type=int, default=None, help="iterations per data run (default 2)")
    p.add_argument("--data-workers", type=ints, default=[0, 2], help="num_workers to compare (default 0,2)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="also profile one faithful iteration and print the top ROWS ops (off by default)",
    )
    p.add_argument("--channels-last", action="store_true", help="GPU option: channels-last network (both sides)")
    p.add_argument("--compile", action="store_true", help="GPU option: torch.compile the plain forwards (both sides)")
    p.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="GPU option: autocast dtype (both sides)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    quick = {
        "features": [4, 8, 16],
        "size": 32,
        "repeats": 2,
        "warmup": 1,
        "memory_steps": 1,
        "inference_runs": 2,
        "volume": [40, 30, 8],
        "data_iterations": 2,
        "threads": 1,
    }
    full = {
        "features": [16, 32, 64, 128, 256],
        "size": 144,
        "repeats": 3,
        "warmup": 1,
        "memory_steps": 2,
        "inference_runs": 3,
        "volume": [200, 140, 88],
        "data_iterations": 2,
        "threads": 2,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    args.sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = args.sections - {"time", "memory", "inference", "data"}
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args)
        return {}
    t0, total_load = time.perf_counter(), CpuLoad()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = machine_info(device, args.threads)
    with torch.device("meta"):  # parameter count without growing this process before the memory workers
        params = sum(p.numel() for p in build_network(args.features, torch.device("meta"), 0).parameters())
    out: dict = {
        "machine": info,
        "config": {
            "features": args.features,
            "size": args.size,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "parameters": params,
            "quick": args.quick,
            "batch": f"{NUM_UNLABELED} unlabeled + {NUM_CLEAN} clean slices = {5 * (NUM_UNLABELED + NUM_CLEAN)} views",
            "optimizer": f"SGD lr {LR} momentum {MOMENTUM} weight decay {WEIGHT_DECAY}",
            "gpu_options": gpu_options(args),
        },
        "elapsed_s": {},
        "other_load": {},
    }
    print(
        f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch threads {args.threads}, "
        f"torch {info['torch']}, monai {info['monai']}, device {info['device']} ({info['device_name']}); "
        f"library {info['library']}"
    )
    print(
        f"network: NestedUNet 2D features {','.join(map(str, args.features))}: {params:,} parameters; "
        f"slices {args.size}x{args.size}; batch {out['config']['batch']}; options "
        f"{', '.join(gpu_option_args(args)) or 'none'}"
    )

    def section(name: str, title: str, fn: Callable[[], None], show: Callable[[dict], None]) -> None:
        start, load = time.perf_counter(), CpuLoad()
        print(f"\n{title}")
        fn()
        out["elapsed_s"][name] = time.perf_counter() - start
        out["other_load"][name] = load.others()
        show(out)
        print(f"  [{name}: {out['elapsed_s'][name]:.1f} s; {load_note(out['other_load'][name])}]")

    if "memory" in args.sections:  # first: the workers inherit this process's ru_maxrss at fork
        section(
            "memory",
            "(c) peak memory, stage-2 iteration (faithful) vs supervised step",
            lambda: measure_memory(args, out),
            print_memory,
        )
    setup = Setup(args.features, args.size, device, **gpu_options(args))
    if "time" in args.sections:
        section(
            "time",
            f"(a) stage-2 iteration / supervised step ({args.warmup} warm-up + {args.repeats} interleaved "
            "rounds; each stage-2 iteration is paired with the supervised step right after it)",
            lambda: measure_time(setup, args, out),
            print_time,
        )
        if args.profile:
            print(f"\nprofile of one faithful stage-2 iteration (top {args.profile} by self time):")
            profile_iteration(setup, args.profile)
    if "inference" in args.sections:
        section(
            "inference",
            "(d) inference: SliceResizeInferer, eval mode, no_grad",
            lambda: measure_inference(setup, args, out),
            print_inference,
        )
    if "data" in args.sections:
        section(
            "data",
            f"(e) data waiting share: MetaTrainer.run() over DataLoaders of cached SliceDatasets "
            f"({args.data_iterations} iterations per configuration)",
            lambda: measure_data(setup, args, out),
            print_data,
        )
    out["elapsed_s"]["total"] = time.perf_counter() - t0
    out["other_load"]["total"] = total_load.others()
    print(f"\nelapsed: {out['elapsed_s']['total']:.1f} s; during the run {load_note(out['other_load']['total'])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
        print(f"figures written to {args.json}")
    return out


if __name__ == "__main__":
    main()
