"""Kill a bundle training run with SIGKILL at several points, rerun the same command, and check that it resumes."""

import json
import os
import shutil
import signal
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mlbseg.engines import latest_checkpoint
from monai_mlbseg.utils.io import TEMP_MARKER
from tests.bundle_utils import REPO, copy_bundle, make_data, run_folders, tmpfs, tmpfs_permitted

STAGE1_ITERATIONS = 12  # 3 epochs x (2 labeled volumes x 8 slices / batch 4)
STAGE2_ITERATIONS = 12  # 2 epochs of 6

HOOKS = {
    "stage1": "$crash_hooks.kill_at_iteration(@stage1#trainer, 5)",
    "initial_labels": "$crash_hooks.kill_while_writing(2)",
    "stage2": "$crash_hooks.kill_at_iteration(@train#trainer, 7)",
}


def saver_index(bundle, stage):
    """The position of the ``AtomicCheckpointSaver`` among the ``stage``'s handlers in the bundle's train.json."""
    handlers = json.loads((bundle / "configs" / "train.json").read_text())[stage]["handlers"]
    return next(i for i, h in enumerate(handlers) if h.get("_target_", "").endswith("AtomicCheckpointSaver"))


def command(bundle, data, split, extra_config=None):
    configs = [str(bundle / "configs" / "train.json")] + ([str(extra_config)] if extra_config else [])
    stage1_saver, stage2_saver = saver_index(bundle, "stage1"), saver_index(bundle, "train")
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(configs),
        "--meta_file", str(bundle / "configs" / "metadata.json"),
        "--logging_file", str(bundle / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
        "--dataset_dir", str(data),
        "--split", str(split),
        "--features", "[4,8]",
        "--image_size", "[32,32]",
        "--device", "cpu",
        "--num_workers", "0",
        "--stage1#max_epochs", "3",
        f"--stage1#handlers#{stage1_saver}#save_interval", "2",
        "--train#trainer#max_epochs", "2",
        "--train#trainer#epoch_length", "6",
        f"--train#handlers#{stage2_saver}#save_interval", "2",
    ]  # fmt: skip


def run(cmd):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def trainer_iteration(checkpoint):
    return torch.load(checkpoint, weights_only=True)["trainer"]["iteration"]


def hooked(tmp_path, hook):
    """A bundle copy, its data and split, and an extra config that runs the ``crash_hooks`` expression ``hook``
    before the training steps."""
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    train = json.loads((bundle / "configs" / "train.json").read_text())
    config = tmp_path / "hooks.json"
    hooks = {
        "imports": [*train["imports"], "$import tests.crash_hooks as crash_hooks"],
        "training": [hook, *train["training"]],
    }
    config.write_text(json.dumps(hooks))
    return bundle, data, split, config


@pytest.mark.parametrize("point", sorted(HOOKS))
def test_killed_run_resumes_and_finishes(point, tmp_path):
    bundle, data, split, kill = hooked(tmp_path, HOOKS[point])
    killed = run(command(bundle, data, split, kill))
    assert killed.returncode == -signal.SIGKILL, killed.stdout[-2000:] + killed.stderr[-2000:]
    work = run_folders(bundle)[0]
    assert not (bundle / "models" / "model.pt").exists()
    if point == "stage1":
        assert not (work / "stage1.pt").exists()
        assert latest_checkpoint(work / "stage1").name == "checkpoint_iteration=4.pt"
    if point == "initial_labels":
        assert (work / "stage1.pt").is_file()
        labels = work / "initial_labels"
        assert len(list(labels.glob("*.nii.gz"))) == 2, "one complete label and one half-written temporary file"
        assert len(list(labels.glob(f".*{TEMP_MARKER}*"))) == 1
    if point == "stage2":
        assert latest_checkpoint(work / "stage2").name == "checkpoint_iteration=6.pt"

    resumed = run(command(bundle, data, split))
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    if point == "stage1":
        assert "checkpoint_iteration=4.pt at iteration 4" in log
    if point == "initial_labels":
        assert "stage.pt exists" not in log and "stage1.pt exists: stage skipped" in log
    if point == "stage2":
        assert "checkpoint_iteration=6.pt at iteration 6" in log

    assert trainer_iteration(latest_checkpoint(work / "stage1")) == STAGE1_ITERATIONS
    assert trainer_iteration(latest_checkpoint(work / "stage2")) == STAGE2_ITERATIONS
    torch.load(bundle / "models" / "model.pt", weights_only=True)
    labels = sorted((work / "initial_labels").glob("*.nii.gz"))
    assert [p.name for p in labels] == ["la_c.nii.gz", "la_d.nii.gz"]
    assert not list((work / "initial_labels").glob(f".*{TEMP_MARKER}*")), "stale temporary files are removed"
    for path in labels:
        assert set(np.unique(np.asarray(nib.load(path).dataobj))) <= {0, 1}
    assert not list(bundle.rglob(f"*{TEMP_MARKER}*"))


def test_a_second_run_in_the_same_folder_is_refused_at_once_and_the_first_finishes(tmp_path):
    import time

    marker = tmp_path / "paused"
    bundle, data, split, pause = hooked(
        tmp_path, f"$crash_hooks.pause_at_iteration(@stage1#trainer, 2, {str(marker)!r}, 120)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(command(bundle, data, split, pause), env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.time() + 300
        while not marker.exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert marker.exists(), "the first run reached stage 1"
        second = run(command(bundle, data, split))
        work = run_folders(bundle)[0]
        assert second.returncode == 2, second.stdout[-2000:] + second.stderr[-2000:]
        said = second.stdout + second.stderr
        assert str(work) in said and f"in use by process {first.pid}" in said, said[-3000:]
        assert "Traceback" not in said
        marker.unlink()  # the first run goes on
        out, _ = first.communicate(timeout=600)
        assert first.returncode == 0, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert trainer_iteration(latest_checkpoint(work / "stage2")) == STAGE2_ITERATIONS, "the first run was not disturbed"


@pytest.mark.skipif(tmpfs_permitted(), reason="a disk filled for real is tested instead (the next test)")
def test_a_full_disk_during_stage_2_ends_with_a_message_and_the_rerun_continues(tmp_path):
    bundle, data, split, full = hooked(tmp_path, "$crash_hooks.fill_disk_at_save(12)")
    failed = run(command(bundle, data, split, full))
    said = failed.stdout + failed.stderr
    work = run_folders(bundle)[0]
    assert failed.returncode == 2 and "no space left on the device" in said, said[-3000:]
    assert str(work) in said and "run the same command again" in said and "Traceback" not in said
    assert not list(work.rglob(f"*{TEMP_MARKER}*")) and not list(work.rglob("tmp*")), "no half file kept"
    resumed = run(command(bundle, data, split))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert trainer_iteration(latest_checkpoint(work / "stage2")) == STAGE2_ITERATIONS


def test_a_really_full_disk_during_stage_2_ends_with_a_message_and_the_rerun_continues(tmp_path):
    """The same on a small tmpfs filled for real after stage-2 iteration 3: the next checkpoint write fails in the
    kernel (``torch.save``'s stream error, no errno of its own)."""
    with tmpfs(tmp_path / "disk", size="8m") as disk:
        filler = disk / "filler"
        bundle, data, split, full = hooked(
            disk, f"$crash_hooks.fill_disk_at_iteration(@train#trainer, 3, {str(filler)!r})"
        )
        failed = run(command(bundle, data, split, full))
        said = failed.stdout + failed.stderr
        work = run_folders(bundle)[0]
        assert filler.stat().st_size > 0 and shutil.disk_usage(disk).free < (1 << 20), "the disk was full"
        assert failed.returncode == 2 and "no space left on the device" in said, said[-3000:]
        assert str(work / "stage2") in said and "run the same command again" in said and "Traceback" not in said
        assert trainer_iteration(latest_checkpoint(work / "stage2")) == 2, "the last complete checkpoint is kept"
        filler.unlink()
        resumed = run(command(bundle, data, split))
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
        assert "at iteration 2" in resumed.stdout + resumed.stderr
        assert trainer_iteration(latest_checkpoint(work / "stage2")) == STAGE2_ITERATIONS
        assert not list(bundle.rglob(f"*{TEMP_MARKER}*")) and not list(work.rglob("tmp*"))
