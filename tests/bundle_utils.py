"""Helpers to run the two bundles on small synthetic data in the tests."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from monai.bundle import ConfigWorkflow

from monai_mlbseg.data import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"mlbseg_la": REPO / "bundles" / "mlbseg_la", "mlbseg_prostate": REPO / "bundles" / "mlbseg_prostate"}

#: small sizes for CPU tests: tiny network and slices (every workflow) ...
TINY = {"features": [4, 8], "image_size": [32, 32], "device": "cpu", "num_workers": 0}
#: ... and one short epoch per stage (training)
TINY_TRAIN = {"stage1#max_epochs": 1, "train#trainer#max_epochs": 1, "train#trainer#epoch_length": 3}

#: synthetic case ids per format and the case selection (labeled / test, the rest unlabeled)
CASES = {
    "uamt_h5": (["la_a", "la_b", "la_c", "la_d", "la_e"], {"labeled": ["la_a", "la_b"], "test": ["la_e"]}),
    "la_raw": (["raw_a", "raw_b", "raw_c", "raw_d"], {"labeled": ["raw_a"], "test": ["raw_d"]}),
    "msd_heart": (["la_003", "la_004", "la_005", "la_007"], {"labeled": ["la_003"], "test": ["la_007"]}),
    "promise12": (
        ["Case00", "Case01", "Case02", "Case03", "Case04"],
        {"labeled": ["Case00", "Case01"], "test": ["Case04"]},
    ),
    "msd_prostate": (
        ["prostate_00", "prostate_01", "prostate_02", "prostate_04"],
        {"labeled": ["prostate_00"], "test": ["prostate_04"]},
    ),
}


def copy_bundle(name: str, dest: Path) -> Path:
    """A private copy of a bundle (its runs write models/ and work/ inside it)."""
    target = dest / name
    shutil.copytree(BUNDLES[name], target, ignore=shutil.ignore_patterns("models", "work", "eval"))
    return target


def make_data(root: Path, format: str, shape=(40, 36, 8)) -> tuple[Path, dict]:
    """Synthetic volumes in ``format`` and the ``split`` override selecting them."""
    ids, split = CASES[format]
    data = root / f"data_{format}"
    make_synthetic_dataset(data, format, num_cases=len(ids), shape=shape, seed=1, case_ids=ids)
    return data, split


def run_folders(bundle: Path) -> list[Path]:
    """The run folders of a bundle copy's ``work/`` (beside them: the digest cache of the data files)."""
    return sorted(p for p in (bundle / "work").iterdir() if p.is_dir())


def overrides(bundle: Path, data: Path, format: str, split: dict, **extra) -> dict:
    return {
        "bundle_root": str(bundle),
        "dataset_dir": str(data),
        "data_format": format,
        "split": split,
        **TINY,
        **TINY_TRAIN,
        **extra,
    }


def workflow(bundle: Path, configs: list[str], workflow_type: str, run_id: str = "run", **override) -> ConfigWorkflow:
    """A ``ConfigWorkflow`` of the bundle, initialised; training-only overrides are dropped for inference."""
    if workflow_type != "train":
        override = {
            k: v for k, v in override.items() if k not in TINY_TRAIN and not k.startswith(("train#", "stage1#"))
        }
    files = [str(bundle / "configs" / c) for c in configs]
    wf = ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        run_id=run_id,
        **override,
    )
    wf.initialize()
    return wf


#: ``python -m monai.bundle run`` arguments of each workflow: run id and config files
COMMANDS = {
    "training": ("training", ["train.json"]),
    "inference": ("run", ["inference.json"]),
    "evaluation": ("run", ["inference.json", "evaluate.json"]),
}


def bundle_command(bundle: Path, kind: str, data: Path, format: str, split: dict | None, **extra) -> list[str]:
    """The command line of a tiny CPU run of ``kind`` (a key of :py:data:`COMMANDS`); ``extra``: more overrides."""
    run_id, configs = COMMANDS[kind]
    files = [str(bundle / "configs" / c) for c in configs]
    over = {"bundle_root": bundle, "dataset_dir": data, "data_format": format, **TINY, **extra}
    if split is not None:
        over["split"] = split
    if kind == "training":
        over.update(TINY_TRAIN)
    args = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(files)]
    args += ["--meta_file", str(bundle / "configs" / "metadata.json")]
    args += ["--logging_file", str(bundle / "configs" / "logging.conf")]
    for key, value in over.items():
        args += [f"--{key}", str(value)]
    return args


def run_command(cmd: list[str], cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """Run a command (from the repository root by default) on one CPU thread; stdout and stderr come back as one
    text."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=full_env, cwd=cwd
    )


@functools.lru_cache(maxsize=1)
def tmpfs_permitted() -> bool:
    """Whether this process may mount a tmpfs (root with the capability, and a ``mount`` command)."""
    with tempfile.TemporaryDirectory() as folder:
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", folder], capture_output=True)
        except OSError:
            return False
        if done.returncode:
            return False
        subprocess.run(["umount", "-l", folder], capture_output=True)
        return True


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "16m", read_only: bool = False) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (created) for the block: a device that really fills up, or that really is
    read-only (which a folder's mode is not for root). Skips the test, with the reason, where mounting is not
    permitted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
        )
    except OSError as e:
        pytest.skip(f"no mount command here ({e}): the write-call test covers this fault")
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): the write-call test covers this fault")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)
