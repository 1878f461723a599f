"""The bundles' inference and evaluation commands keep going past a volume that passed the input check and then
fails when the run reaches it: the others are written and evaluated, the failed one is named, and the command exits
with status 3."""

import ast
import json

import nibabel as nib
import numpy as np
import torch

from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.utils.errors import CASES_FAILED_STATUS
from tests.bundle_utils import bundle_command, copy_bundle, make_data, run_command


def bundle_with_weights(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, _ = make_data(tmp_path, "uamt_h5")
    (bundle / "models").mkdir()
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    return bundle, data


def damaging_command(tmp_path, bundle, kind, damage, data, split, **over):
    """The command of ``kind`` with one more config file, whose ``run`` list runs ``damage`` (an expression) after
    the input check passed, just before the evaluator."""
    run = json.loads((bundle / "configs" / "inference.json").read_text())["run"]
    hook = tmp_path / "damage.json"
    hook.write_text(json.dumps({"run": [damage, *run]}))
    cmd = bundle_command(bundle, kind, data, "uamt_h5", split, **over)
    i = cmd.index("--config_file") + 1
    cmd[i] = str([*ast.literal_eval(cmd[i]), str(hook)])
    return cmd


def assert_ends_with_the_failed_cases(out, total, failed):
    """Exit status 3 is checked by the caller; the output ends with the count and one line per failed file."""
    lines = out.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if " - ERROR - " in line)
    done = total - len(failed)
    assert lines[head].endswith(f"{len(failed)} of {total} cases failed (the other {done} are done):"), lines[head:]
    assert [line.split(": ")[0] for line in lines[head + 1 :]] == [f"  - {f}" for f in failed]
    assert "Traceback" not in out


def test_inference_writes_the_other_volumes_and_names_the_one_damaged_after_the_check(tmp_path):
    bundle, data = bundle_with_weights(tmp_path)
    files = [str(data / c / "mri_norm2.h5") for c in ("la_a", "la_b", "la_c")]
    stale = bundle / "eval" / "la_b" / "mri_norm2_seg.nii.gz"  # la_b's mask from an earlier run
    stale.parent.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((40, 36, 8), np.uint8), np.eye(4)), stale)
    damage = f"$open({files[1]!r}, 'r+b').truncate(300)"
    result = run_command(damaging_command(tmp_path, bundle, "inference", damage, data, None, input_files=files))
    out = result.stdout
    assert result.returncode == CASES_FAILED_STATUS == 3, out[-3000:]
    named = [line for line in out.splitlines() if " - ERROR - " in line and "skipped, the run goes on" in line]
    assert len(named) == 1 and f"{files[1]}: cannot read dataset 'image'" in named[0] and "truncated file" in named[0]
    assert f"its earlier output {stale} removed" in named[0]
    masks = sorted(p.relative_to(bundle / "eval").as_posix() for p in (bundle / "eval").rglob("*.nii.gz"))
    assert masks == ["la_a/mri_norm2_seg.nii.gz", "la_c/mri_norm2_seg.nii.gz"], "1 and 3 written, no mask for 2"
    assert_ends_with_the_failed_cases(out, 3, [files[1]])


def test_evaluation_replaces_the_earlier_metrics_and_lists_the_volume_deleted_after_the_check(tmp_path):
    bundle, data = bundle_with_weights(tmp_path)
    split = {"labeled": ["la_a"], "test": ["la_c", "la_d", "la_e"]}
    (bundle / "eval").mkdir()
    for name in ("metrics.csv", "metrics.json"):  # an earlier run's report
        (bundle / "eval" / name).write_text('case_id,dice\nold_case,0.99\n{"cases": [{"case_id": "old_case"}]}\n')
    deleted = data / "la_d" / "mri_norm2.h5"
    damage = f"$__import__('os').remove({str(deleted)!r})"
    result = run_command(damaging_command(tmp_path, bundle, "evaluation", damage, data, split))
    out = result.stdout
    assert result.returncode == 3, out[-3000:]
    assert f"{deleted}: no such file" in out
    with open(bundle / "eval" / "metrics.csv") as f:
        rows = {line.split(",")[0]: line.rstrip("\n").split(",") for line in f}
    assert list(rows) == ["case_id", "la_c", "la_e", "la_d", "mean", "std"], "this run's cases only"
    assert rows["case_id"][-1] == "failed" and rows["la_d"][-1].startswith(f"{deleted}: no such file")
    assert all(v != "" for v in rows["la_c"][1:-1]) and rows["la_c"][-1] == ""
    report = json.loads((bundle / "eval" / "metrics.json").read_text())
    assert [c["case_id"] for c in report["cases"]] == ["la_c", "la_e"] and report["failed"][0]["case_id"] == "la_d"
    assert "1 failed, not in the means: la_d" in out
    assert_ends_with_the_failed_cases(out, 3, [str(deleted)])
