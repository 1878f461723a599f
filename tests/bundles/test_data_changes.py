"""Runs are keyed by what they were trained on: through the bundle commands, a moved project resumes, a corrected
label starts a new run (or reuses stage 1 when the user asks), and data changed under a running stage stop it."""

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np

from monai_mlbseg.utils import MANIFEST_FILE
from monai_mlbseg.utils.io import TEMP_MARKER
from tests.bundle_utils import bundle_command, copy_bundle, make_data, run_command, tmpfs

SPLIT = {"labeled": ["la_a", "la_b"], "test": ["la_e"]}


def project(root: Path) -> tuple[Path, list[str]]:
    """A project folder with the bundle and its data side by side, and the training command in relative paths."""
    copy_bundle("mlbseg_la", root)
    make_data(root, "uamt_h5")
    return root, bundle_command(Path("mlbseg_la"), "training", Path("data_uamt_h5"), "uamt_h5", SPLIT)


def runs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "mlbseg_la" / "work").iterdir() if p.is_dir())


def corrected_label(h5: Path, out: Path) -> Path:
    """A copy of the UA-MT file ``h5`` with its label corrected (one slab of foreground more)."""
    shutil.copyfile(h5, out)
    with h5py.File(out, "r+") as f:
        label = np.array(f["label"])
        label[:10, :10, :] = 1
        f["label"][...] = label
    return out


def test_a_moved_project_resumes_and_a_corrected_label_is_a_new_run(tmp_path):
    root, cmd = project(tmp_path / "before")
    first = run_command(cmd, cwd=root)
    assert first.returncode == 0, first.stdout[-3000:]
    (old,) = runs(root)
    assert json.loads((old / MANIFEST_FILE).read_text())["files"]["la_a/mri_norm2.h5"]["sha256"]

    moved = tmp_path / "moved"
    os.rename(root, moved)
    again = run_command(cmd, cwd=moved)
    log = again.stdout
    assert again.returncode == 0, log[-3000:]
    assert [p.name for p in runs(moved)] == [old.name], "the same run folder, not a new one"
    assert "stage1.pt exists: stage skipped" in log and "wrote" not in log, "stage 1 and its labels are kept"
    assert f"resumed from {Path('mlbseg_la', 'work', old.name, 'stage2')}" in log and "at iteration 3 (epoch 1)" in log

    old = moved / "mlbseg_la" / "work" / old.name
    stage1 = (old / "stage1.pt").read_bytes()
    corrected_label(moved / "data_uamt_h5" / "la_a" / "mri_norm2.h5", tmp_path / "fixed.h5")
    shutil.copyfile(tmp_path / "fixed.h5", moved / "data_uamt_h5" / "la_a" / "mri_norm2.h5")
    reuse = run_command([*cmd, "--stage1_dir", str(old)], cwd=moved)
    log = reuse.stdout
    assert reuse.returncode == 0, log[-3000:]
    new = next(p for p in runs(moved) if p.name != old.name)
    earlier = Path("mlbseg_la", "work", old.name)  # as the user's relative command names it
    assert f"the data changed since the run in {earlier}" in log and f"--stage1_dir {earlier}" in log
    assert "la_a/mri_norm2.h5" in log
    assert "la_b/mri_norm2.h5" not in log.split("the data changed")[1].split("\n")[0], "only the changed file"
    assert f"{old / 'stage1.pt'} exists: stage skipped" in log, "stage 1 of the earlier run, as the user asked"
    assert not (new / "stage1.pt").exists() and (new / "stage2" / "checkpoint_final_iteration=3.pt").is_file()
    assert (old / "stage1.pt").read_bytes() == stage1, "the earlier run is untouched"


def test_data_replaced_during_stage_1_stop_the_run_and_the_rerun_starts_anew(tmp_path):
    root, cmd = project(tmp_path)
    label = root / "data_uamt_h5" / "la_b" / "mri_norm2.h5"
    fixed = corrected_label(label, tmp_path / "fixed.h5")
    hook = tmp_path / "hook.json"
    train = json.loads((root / "mlbseg_la" / "configs" / "train.json").read_text())
    change = f"$crash_hooks.replace_file_at_iteration(@stage1#trainer, 2, {str(label)!r}, {str(fixed)!r})"
    hook.write_text(json.dumps({"imports": [*train["imports"], "$import tests.crash_hooks as crash_hooks"],
                                "training": [change, *train["training"]]}))  # fmt: skip
    configs = json.loads(cmd[cmd.index("--config_file") + 1].replace("'", '"'))
    hooked = [*cmd]
    hooked[cmd.index("--config_file") + 1] = str([*configs, str(hook)])
    stopped = run_command(hooked, cwd=root)
    said = stopped.stdout
    assert stopped.returncode == 2, said[-3000:]
    assert f"{label}: changed while training (iteration 3) was using it (content)" in said, said[-3000:]
    assert "Traceback" not in said
    (old,) = runs(root)
    assert not (old / "stage1.pt").exists(), "no stage-1 weights from mixed data"

    rerun = run_command(cmd, cwd=root)
    log = rerun.stdout
    assert rerun.returncode == 0, log[-3000:]
    assert len(runs(root)) == 2 and "stage1.pt exists" not in log, "the changed data are a new run, from the start"
    assert f"the data changed since the run in {Path('mlbseg_la', 'work', old.name)}" in log
    assert "la_b/mri_norm2.h5" in log


def test_a_read_only_output_folder_is_refused_before_any_work_with_a_message(tmp_path):
    root, cmd = project(tmp_path)
    with tmpfs(tmp_path / "read_only", size="1m", read_only=True) as mount:
        output = mount / "work"
        done = run_command([*cmd, "--output_dir", str(output)], cwd=root)
    said = done.stdout
    assert done.returncode == 2, said[-3000:]
    assert f"{output}" in said and "cannot be written (Read-only file system)" in said, said[-3000:]
    assert "make the folder writable or give another output folder" in said and "Traceback" not in said
    assert "stage1" not in said.lower().split("cannot be written")[0].split("\n")[-1]
    assert not (root / "mlbseg_la" / "models" / "model.pt").exists()
    assert not list(root.rglob(f"*{TEMP_MARKER}*"))
