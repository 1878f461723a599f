#!/usr/bin/env python
"""
Semi-supervised against supervised-only ``/train`` through a real MONAI Label server, on real left-atrium MRI.

The left-atrium scans of UA-MT's ``train.list`` (``test.list`` is never read) become a MONAI Label studies folder as a
user would have it: every study a NIfTI image ``<studies>/<case>.nii.gz`` (UA-MT's arrays with LA's 0.625 mm
isotropic spacing), the first ``--num_labeled`` cases with their final label in ``labels/final/``, the rest of the
list but its last ``--num_validation`` cases unlabeled beside them. The validation cases are written apart (MSD
layout, never served). The package's app (``python -m monai_mlbseg monailabel_app``) is served by
``monailabel start_server`` on 127.0.0.1, with the bundle's sizes set in its configs (``--image_size``,
``--features``), and each arm is one ``POST /train/mlbseg_la`` over HTTP, timed from the request to the task's end
(wall time, and the CPU time of the server's train process, which does not depend on what else the machine runs):

- ``semi_supervised``: the default request (``use_unlabeled`` true): stage 1 for ``--stage1_iterations``, the initial
  labels of the unlabeled studies, stage 2 with the bundle's default method for ``--stage2_steps`` optimizer steps;
- ``supervised``: ``use_unlabeled`` false, stage 2 on the labeled studies alone for ``--stage1_iterations`` +
  ``--stage2_steps`` optimizer steps: the same number of optimizer steps.

Both start from scratch (``pretrained`` false). After each ``/train`` the bundle's ``models/model.pt`` is evaluated on
the validation volumes (Dice, Jaccard, 95HD and ASD in voxels, per volume) and kept in the arm's folder.

Resumable: each arm writes ``<out>/seed<N>/<arm>/result.json``; a rerun skips finished arms, and an interrupted
``/train`` resumes from its run's checkpoints (the run folder is keyed by the studies' content and the settings; its
wall time is then flagged ``resumed``). ``table.md`` / ``table.json`` are rebuilt at the end of every run.

Usage::

    python -m benchmarks.experiments.monailabel_la --data_dir /data/LA --out runs/monailabel_la
    python -m benchmarks.experiments.monailabel_la --quick --out /tmp/ml_smoke        # synthetic smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import h5py
import numpy as np
import torch

from benchmarks.experiments.real_la import data_folder, evaluate, split_ids
from monai_mlbseg.data import FORMATS, build_datalist, resolve_datalist
from monai_mlbseg.data.writers import write_nifti
from monai_mlbseg.engines import load_weights
from monai_mlbseg.recipe import parsed, training_workflow
from monai_mlbseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger("monailabel_la")

#: the left atrium's voxel spacing in millimetres (UA-MT's arrays are the LA challenge's 0.625 mm isotropic MRI,
#: cropped, not resampled; its HDF5 files store no geometry)
LA_SPACING = (0.625, 0.625, 0.625)

#: the repository root (the server process imports the package and the app's ``main.py`` from it)
REPO = Path(__file__).resolve().parents[2]

ARMS = ("semi_supervised", "supervised")

QUICK = {"num_cases": 8, "num_validation": 2, "image_size": 32, "features": (4, 8), "volume_shape": (40, 36, 8)}


def write_studies(data_dir: Path, studies: Path, labeled: Sequence[str], unlabeled: Sequence[str]) -> None:
    """
    The UA-MT cases as a MONAI Label studies folder: ``studies/<case>.nii.gz`` for every case of ``labeled`` and
    ``unlabeled``, ``studies/labels/final/<case>.nii.gz`` for the labeled ones. Files already there are kept.
    """
    for case in [*labeled, *unlabeled]:
        image_file, label_file = studies / f"{case}.nii.gz", studies / "labels" / "final" / f"{case}.nii.gz"
        if image_file.is_file() and (case not in labeled or label_file.is_file()):
            continue
        with h5py.File(data_dir / case / "mri_norm2.h5", "r") as f:
            image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"], np.uint8)
        if case in labeled:
            label_file.parent.mkdir(parents=True, exist_ok=True)
            write_nifti(label_file, label, LA_SPACING)
        write_nifti(image_file, image, LA_SPACING)


def write_validation(data_dir: Path, folder: Path, cases: Sequence[str]) -> Path:
    """The validation cases in the MSD layout under ``folder`` and their datalist (``folder/datalist.json``)."""
    for case in cases:
        if not (folder / "labelsTr" / f"{case}.nii.gz").is_file():
            with h5py.File(data_dir / case / "mri_norm2.h5", "r") as f:
                image, label = np.asarray(f["image"], np.float32), np.asarray(f["label"], np.uint8)
            FORMATS["msd_heart"].write(folder, case, image, label, spacing=LA_SPACING)
    datalist_file = folder / "datalist.json"
    atomic_write_json(datalist_file, build_datalist(folder, "msd_heart", validation=list(cases)))
    return datalist_file


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(NamedTuple):
    """A running server: its URL and its process id."""

    url: str
    pid: int


def cpu_seconds(pid: int) -> float:
    """The CPU time of process ``pid`` and of its children that have ended (MONAI Label runs each ``/train`` in a
    child process it waits for), in seconds: a cost that does not depend on what else the machine runs."""
    import psutil

    times = psutil.Process(pid).cpu_times()
    return times.user + times.system + times.children_user + times.children_system


@contextlib.contextmanager
def serve(
    app: Path, studies: Path, log_file: Path, env: Mapping[str, str] | None = None, start_timeout: float = 180
) -> Iterator[Served]:
    """
    ``monailabel start_server`` (as MONAI Label's script runs it) with ``app``, ``studies`` and ``--conf models
    mlbseg_la`` on a free port of 127.0.0.1, its output in ``log_file``; yields its URL and process id once
    ``/info/`` answers and stops it (its whole process group) on exit.

    Raises:
        RuntimeError: with the end of the server's log, when it exits or does not answer within ``start_timeout``.
    """
    import httpx

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies)]
    cmd += ["--conf", "models", "mlbseg_la", "--host", "127.0.0.1", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with open(log_file, "w") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=log_file.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + start_timeout
            while proc.poll() is None:
                try:
                    if httpx.get(f"{url}/info/", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.time() > deadline:
                    break
                time.sleep(1)
            else:
                raise RuntimeError(f"the server exited ({proc.returncode}):\n{log_file.read_text()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"the server did not answer in {start_timeout} s:\n{log_file.read_text()[-3000:]}")
            yield Served(url, proc.pid)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def train(server: Served, request: Mapping[str, Any], timeout: float) -> tuple[dict, float, float]:
    """
    ``POST /train/mlbseg_la`` with ``request``, waiting for the task to end; returns the task's result (the train
    task's return value, from its log), the wall time from the request to the end and the CPU time it took
    (:py:func:`cpu_seconds` of the server).

    Raises:
        RuntimeError: with the end of the task's log, when the task fails or outlasts ``timeout``.
    """
    import httpx

    url, start, cpu = server.url, time.perf_counter(), cpu_seconds(server.pid)
    started = httpx.post(f"{url}/train/mlbseg_la", params={"run_sync": False}, json=dict(request), timeout=60)
    if started.status_code != 200:
        raise RuntimeError(f"/train refused ({started.status_code}): {started.text[-2000:]}")
    while True:
        status = httpx.get(f"{url}/train/", timeout=60).json()
        if status["status"] not in ("SUBMITTED", "RUNNING"):
            break
        if time.perf_counter() - start > timeout:
            raise RuntimeError(f"/train did not finish in {timeout} s")
        time.sleep(2)
    wall_s, cpu_s = time.perf_counter() - start, cpu_seconds(server.pid) - cpu
    details = status.get("details", [])
    lines = [line for line in details if " - Result: " in line]
    if status["status"] != "DONE" or not lines:
        raise RuntimeError(f"/train ended {status['status']}:\n" + "\n".join(details)[-3000:])
    return json.loads(lines[-1].split(" - Result: ")[1]), wall_s, cpu_s


def requests(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The ``/train`` request of each arm: the same optimizer steps, from scratch, on the CPU."""
    common = {"pretrained": False, "device": args.device}
    return {
        "semi_supervised": {
            **common,
            "use_unlabeled": True,
            "stage1_iterations": args.stage1_iterations,
            "stage2_steps": args.stage2_steps,
        },
        "supervised": {**common, "use_unlabeled": False, "stage2_steps": args.stage1_iterations + args.stage2_steps},
    }


def app_for_seed(out: Path, args: argparse.Namespace, seed: int) -> Path:
    """The app folder of ``seed``, its bundle's configs set to the benchmark's sizes and seed (both configs alike,
    so ``/infer`` serves the trained network); everything else is the shipped bundle's."""
    from monai_mlbseg.monailabel import write_app  # MONAI Label's server is an optional dependency

    app = write_app(out / f"seed{seed}" / "app")
    sizes = {"image_size": [args.image_size] * 2, "features": list(args.features), "num_workers": 0, "seed": seed}
    sizes["progress"] = False  # no progress bars in the server's log
    for config in ("train.json", "inference.json"):
        path = app / "model" / "mlbseg_la" / "configs" / config
        atomic_write_text(path, json.dumps({**json.loads(path.read_text(encoding="utf-8")), **sizes}, indent=4))
    return app


def validate(app: Path, validation_dir: Path, datalist_file: Path, device: torch.device) -> dict:
    """Per-case metrics of the app's ``models/model.pt`` on the validation volumes, read as the bundle reads them."""
    bundle = app / "model" / "mlbseg_la"
    overrides = {
        "bundle_root": str(bundle),
        "dataset_dir": str(validation_dir),
        "data_format": "msd_heart",
        "datalist_file": str(datalist_file),
        "device": str(device),
    }
    workflow = training_workflow(bundle, overrides)
    network, inferer, load = (parsed(workflow, k) for k in ("network", "inferer", "load_volume"))
    load_weights(network, bundle / "models" / "model.pt", map_location=device)
    items = resolve_datalist(json.loads(datalist_file.read_text(encoding="utf-8")), validation_dir)
    return evaluate(network, inferer, items["validation"], load, device)


def table(results: dict[str, dict[int, dict]]) -> tuple[str, dict]:
    """Mean per-case Dice/95HD/ASD per arm over seeds, the paired Dice difference against ``supervised`` and the wall
    time of each ``/train``."""
    lines = ["| arm | Dice | 95HD (vox) | ASD (vox) | paired Dice vs supervised | /train wall / CPU time (min) |"]
    lines.append("|---|---|---|---|---|---|")
    figures: dict[str, Any] = {}
    for arm, seeds in results.items():
        cases = [row for result in seeds.values() for row in result["cases"]]
        mean = {  # a distance is undefined (None) where a prediction is empty: averaged over the others
            m: statistics.fmean([row[m] for row in cases if row[m] is not None] or [math.nan])
            for m in ("dice", "hd95_voxel", "asd_voxel")
        }
        diffs = []
        for seed, result in seeds.items():
            ref = {
                row["case_id"]: row["dice"] for row in results.get("supervised", {}).get(seed, {"cases": []})["cases"]
            }
            diffs += [100 * (row["dice"] - ref[row["case_id"]]) for row in result["cases"] if row["case_id"] in ref]
        gain = statistics.fmean(diffs) if diffs and arm != "supervised" else None
        better = sum(d > 0 for d in diffs)
        wall = [result["wall_s"] / 60 for result in seeds.values()]
        gain_text = f"{gain:+.2f} ({better}/{len(diffs)} better)" if gain is not None else "-"
        walls = ", ".join(
            f"{r['wall_s'] / 60:.1f} / {r['cpu_s'] / 60:.1f}" + (" (resumed)" if r.get("resumed") else "")
            for r in seeds.values()
        )
        distances = f"{mean['hd95_voxel']:.2f} | {mean['asd_voxel']:.2f}"
        lines.append(f"| {arm} | {100 * mean['dice']:.2f} | {distances} | {gain_text} | {walls} |")
        figures[arm] = {
            "dice": 100 * mean["dice"],
            "hd95_voxel": mean["hd95_voxel"],
            "asd_voxel": mean["asd_voxel"],
            "paired_dice_vs_supervised": gain,
            "wall_min": wall,
            "cpu_min": [result["cpu_s"] / 60 for result in seeds.values()],
        }
    return "\n".join(lines), figures


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data_dir", default=None, help="UA-MT layout folder (<case>/mri_norm2.h5) with train.list")
    p.add_argument("--out", default="monailabel_la_runs", help="benchmark folder (rerun to resume)")
    p.add_argument("--seeds", default="0")
    p.add_argument("--num_labeled", type=int, default=4)
    p.add_argument("--num_validation", type=int, default=16)
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--features", default="8,16,32,64,128")
    p.add_argument("--stage1_iterations", type=int, default=1000, help="the app's default request")
    p.add_argument("--stage2_steps", type=int, default=1200, help="the app's default request")
    p.add_argument("--threads", type=int, default=2, help="OMP threads of the server")
    p.add_argument("--device", default="cpu")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds one /train may take")
    p.add_argument("--quick", action="store_true", help="tiny synthetic smoke run (no real data needed)")
    p.add_argument(
        "--report", action="store_true", help="train nothing: rebuild table.md / table.json from the arms under --out"
    )
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.features = tuple(int(f) for f in str(args.features).split(",") if f.strip())
    if args.quick:
        args.num_validation, args.image_size, args.features = (
            QUICK["num_validation"],
            QUICK["image_size"],
            QUICK["features"],
        )
        args.num_labeled, args.stage1_iterations, args.stage2_steps = 2, 4, 3
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per status poll
    out = Path(args.out).resolve()
    if args.report:
        results: dict[str, dict[int, dict]] = {}
        for arm in ARMS:
            for file in sorted(out.glob(f"seed*/{arm}/result.json"), key=lambda f: int(f.parent.parent.name[4:])):
                results.setdefault(arm, {})[int(file.parent.parent.name[4:])] = json.loads(file.read_text())
        text, figures = table(results)
        atomic_write_text(out / "table.md", text + "\n")
        atomic_write_json(
            out / "table.json",
            {
                "figures": figures,
                "settings": {**vars(args), "seeds": sorted({seed for seeds in results.values() for seed in seeds})},
            },
        )
        print(text)
        return results
    data_dir = data_folder(args, out, QUICK)
    split = split_ids(data_dir / "train.list", args.num_labeled, args.num_validation)
    studies = out / "studies"
    logger.info(f"writing the studies folder {studies} ({len(split['labeled'])} labeled, {len(split['unlabeled'])})")
    write_studies(data_dir, studies, split["labeled"], split["unlabeled"])
    validation_datalist = write_validation(data_dir, out / "validation", split["validation"])
    atomic_write_json(out / "settings.json", {**vars(args), **split})
    results = {}
    for seed in args.seeds:
        app = app_for_seed(out, args, seed)
        pending = [arm for arm in ARMS if not (out / f"seed{seed}" / arm / "result.json").is_file()]
        for arm in ARMS:
            if arm not in pending:
                results.setdefault(arm, {})[seed] = json.loads((out / f"seed{seed}" / arm / "result.json").read_text())
        if pending:
            with serve(
                app, studies, out / f"seed{seed}" / "server.log", env={"OMP_NUM_THREADS": str(args.threads)}
            ) as server:
                for arm in pending:
                    folder = out / f"seed{seed}" / arm
                    folder.mkdir(parents=True, exist_ok=True)
                    resumed = (folder / "started").is_file()
                    atomic_write_text(folder / "started", time.strftime("%Y-%m-%d %H:%M:%S\n"))
                    request = requests(args)[arm]
                    logger.info(f"seed {seed} {arm}: POST {server.url}/train/mlbseg_la {request}")
                    task, wall_s, cpu_s = train(server, request, args.timeout)
                    metrics = validate(app, out / "validation", validation_datalist, torch.device(args.device))
                    model = app / "model" / "mlbseg_la" / "models" / "model.pt"
                    (folder / "model.pt").write_bytes(model.read_bytes())
                    result = {
                        **metrics,
                        "arm": arm,
                        "request": request,
                        "wall_s": wall_s,
                        "cpu_s": cpu_s,
                        "resumed": resumed,
                        "trained_on": {"labeled": len(task["labeled"]), "unlabeled": len(task["unlabeled"])},
                        "run_dir": task["run_dir"],
                    }
                    atomic_write_json(folder / "result.json", result)
                    results.setdefault(arm, {})[seed] = result
                    dice = 100 * metrics["summary"]["dice"]["mean"]
                    logger.info(f"seed {seed} {arm}: Dice {dice:.2f}, /train {wall_s / 60:.1f} min")
        text, figures = table({arm: results[arm] for arm in ARMS if arm in results})
        atomic_write_text(out / "table.md", text + "\n")
        atomic_write_json(out / "table.json", {"figures": figures, "settings": {**vars(args), **split}})
    print(text)
    return results


if __name__ == "__main__":
    main()
