"""Bad input through the public commands: every case gets a message naming the file or case and the problem, a
non-zero exit, and nothing written."""

import json
import os
import subprocess
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mlbseg.__main__ import main
from monai_mlbseg.data import make_synthetic_dataset
from monai_mlbseg.networks import NestedUNet

from .bundle_utils import REPO, copy_bundle, make_data, overrides, workflow

SHAPE = (16, 16, 8)


def uamt(tmp_path, n=5):
    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "uamt_h5", num_cases=n, shape=SHAPE, seed=0)
    return data, ids


def heart(tmp_path, n=4):
    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "msd_heart", num_cases=n, shape=SHAPE, seed=0)
    return data, ids


def rewrite_h5(path, **datasets):
    with h5py.File(path, "r") as f:
        content = {k: f[k][()] for k in f}
    content.update(datasets)
    with h5py.File(path, "w") as f:
        for k, v in content.items():
            if v is not None:
                f.create_dataset(k, data=v)


def first_nifti(data, folder):
    return sorted((data / folder).glob("*.nii.gz"))[0]


# each case: builds a bad data folder and returns (prepare arguments, [expected message fragments])
def missing_file(tmp_path):
    data, ids = uamt(tmp_path)
    os.remove(data / ids[1] / "mri_norm2.h5")
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", ids[4]], [ids[1], "file not found"]


def truncated_nifti(tmp_path):
    data, ids = heart(tmp_path)
    path = first_nifti(data, "imagesTr")
    path.write_bytes(path.read_bytes()[:200])
    return ["--format", "msd_heart", "--labeled", ids[1], "--test", ids[3]], [path.name, "unreadable or corrupt"]


def h5_without_label(tmp_path):
    data, ids = uamt(tmp_path)
    rewrite_h5(data / ids[0] / "mri_norm2.h5", label=None)
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", ids[4]], [ids[0], "no dataset 'label'"]


def bad_mhd_header(tmp_path):
    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "promise12", num_cases=4, shape=SHAPE, seed=0)
    header = data / f"{ids[0]}.mhd"
    header.write_text(header.read_text().replace("DimSize", "DimSizeBroken"))
    return ["--format", "promise12", "--labeled", ids[0], "--test", ids[3]], [f"{ids[0]}.mhd", "unreadable or corrupt"]


def shape_mismatch(tmp_path):
    data, ids = heart(tmp_path)
    label = first_nifti(data, "labelsTr")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.uint8), np.eye(4)), label)
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], [label.name, "label shape"]


def affine_mismatch(tmp_path):
    data, ids = heart(tmp_path)
    label = first_nifti(data, "labelsTr")
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), label)
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], [label.name, "spacing"]


def non_binary_label(tmp_path):
    data, ids = uamt(tmp_path)
    with h5py.File(data / ids[0] / "mri_norm2.h5", "r") as f:
        label = f["label"][()]
    label[label > 0] = 3
    rewrite_h5(data / ids[0] / "mri_norm2.h5", label=label)
    return ["--labeled", ids[0], "--test", ids[4]], [ids[0], "label values 3"]


def empty_clean_label(tmp_path):
    data, ids = uamt(tmp_path)
    rewrite_h5(data / ids[1] / "mri_norm2.h5", label=np.zeros(SHAPE, np.uint8))
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", ids[4]], [ids[1], "empty label"]


def nan_intensities(tmp_path):
    data, ids = uamt(tmp_path)
    with h5py.File(data / ids[2] / "mri_norm2.h5", "r") as f:
        image = f["image"][()]
    image[3, 4, 5] = np.nan
    image[1, 1, 1] = np.inf
    rewrite_h5(data / ids[2] / "mri_norm2.h5", image=image)
    return ["--labeled", ids[0], "--test", ids[4]], [ids[2], "2 NaN/inf intensities"]


def image_2d(tmp_path):
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), image)
    return ["--format", "msd_heart", "--labeled", ids[1], "--test", ids[3]], [image.name, "expected a 3D volume"]


def image_4d(tmp_path):
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8, 3), np.float32), np.eye(4)), image)
    return ["--format", "msd_heart", "--labeled", ids[1], "--test", ids[3]], [image.name, "channels"]


def no_unlabeled(tmp_path):
    data, ids = uamt(tmp_path, n=3)
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", ids[2]], ["datalist", "no unlabeled cases"]


def no_clean(tmp_path):
    data, ids = uamt(tmp_path)
    (data / "train.list").write_text("\n".join(ids[:4]) + "\n")
    return ["--train_list", "train.list", "--num_labeled", "0", "--test", ids[4]], ["no labeled cases"]


def case_in_training_and_test(tmp_path):
    data, ids = uamt(tmp_path)
    return ["--labeled", f"{ids[0]},{ids[4]}", "--test", ids[4]], [f"case {ids[4]}", "listed more than once"]


def unknown_case(tmp_path):
    data, ids = uamt(tmp_path)
    return ["--labeled", f"{ids[0]},ghost_case", "--test", ids[4]], ["ghost_case", "file not found"]


PREPARE_CASES = [
    missing_file,
    truncated_nifti,
    h5_without_label,
    bad_mhd_header,
    shape_mismatch,
    affine_mismatch,
    non_binary_label,
    empty_clean_label,
    nan_intensities,
    image_2d,
    image_4d,
    no_unlabeled,
    no_clean,
    case_in_training_and_test,
    unknown_case,
]


@pytest.mark.parametrize("case", PREPARE_CASES, ids=lambda f: f.__name__)
def test_prepare_refuses_bad_data(case, tmp_path, capsys):
    args, expected = case(tmp_path)
    data = tmp_path / "data"
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(data), "--progress", "False", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in expected:
        assert fragment in err, f"{fragment!r} missing from: {err}"
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before, "prepare wrote nothing"


def test_prepare_command_line_exit_status_and_message(tmp_path):
    args, expected = missing_file(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "monai_mlbseg", "prepare", "--data_dir", str(tmp_path / "data"), *args],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and all(f in result.stderr for f in expected)
    assert not (tmp_path / "data" / "datalist.json").exists()


def run_training(bundle, over):
    wf = workflow(bundle, ["train.json"], "train", run_id="training", **over)
    with pytest.raises(Exception) as info:
        wf.run()
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    return "\n".join(chain)


def assert_nothing_trained(bundle):
    assert not (bundle / "models" / "model.pt").exists()
    assert not list(bundle.rglob("*.pt")) and not list(bundle.rglob("*.nii.gz"))


def bundle_with_data(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    return bundle, data, split


def test_bundle_refuses_a_datalist_path_outside_the_data_folder(tmp_path):
    bundle, data, split = bundle_with_data(tmp_path)
    (tmp_path / "elsewhere.h5").write_bytes(b"")
    datalist = {
        "labeled": [{"case_id": "la_a", "image": "la_a/mri_norm2.h5", "label": "la_a/mri_norm2.h5"}],
        "unlabeled": [{"case_id": "x", "image": "../elsewhere.h5"}],
        "test": [],
    }
    (data / "datalist.json").write_text(json.dumps(datalist))
    over = overrides(bundle, data, "uamt_h5", split, datalist_file=str(data / "datalist.json"))
    message = run_training(bundle, over)
    assert "elsewhere.h5" in message and "outside the data folder" in message
    assert_nothing_trained(bundle)


@pytest.mark.parametrize(
    "content,fragment",
    [("", "not a readable JSON"), ("{ labeled: [", "not a readable JSON"), ("[1, 2]", "must hold a JSON object")],
)
def test_bundle_refuses_an_empty_or_malformed_datalist(content, fragment, tmp_path):
    bundle, data, split = bundle_with_data(tmp_path)
    (data / "datalist.json").write_text(content)
    over = overrides(bundle, data, "uamt_h5", split, datalist_file=str(data / "datalist.json"))
    message = run_training(bundle, over)
    assert "datalist.json" in message and fragment in message
    assert_nothing_trained(bundle)


def test_bundle_refuses_zero_clean_cases(tmp_path):
    bundle, data, split = bundle_with_data(tmp_path)
    message = run_training(bundle, overrides(bundle, data, "uamt_h5", {"labeled": [], "test": ["la_e"]}))
    assert "no labeled cases" in message
    assert_nothing_trained(bundle)


def test_bundle_refuses_a_missing_data_folder(tmp_path):
    bundle, data, split = bundle_with_data(tmp_path)
    message = run_training(bundle, overrides(bundle, tmp_path / "nowhere", "uamt_h5", split))
    assert "nowhere" in message and "data folder not found" in message
    assert_nothing_trained(bundle)


@pytest.mark.parametrize("kind", ["not a state dict", "another network", "not a checkpoint"])
def test_inference_refuses_a_bad_checkpoint(kind, tmp_path):
    bundle, data, split = bundle_with_data(tmp_path)
    (bundle / "models").mkdir()
    model = bundle / "models" / "model.pt"
    if kind == "not a state dict":
        torch.save({"weights": [1, 2, 3]}, model)
    elif kind == "another network":
        torch.save(NestedUNet(2, features=(8, 16)).state_dict(), model)
    else:
        model.write_text("definitely not a zip archive")
    over = overrides(bundle, data, "uamt_h5", split)
    with pytest.raises(Exception) as info:
        workflow(bundle, ["inference.json"], "infer", **over)
    chain, error = [], info.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__
    message = "\n".join(chain)
    assert "model.pt" in message
    assert {
        "not a state dict": "is not a state dict",
        "another network": "does not match the network NestedUNet",
        "not a checkpoint": "not a readable weights-only",
    }[kind] in message
    assert not (bundle / "eval").exists()
