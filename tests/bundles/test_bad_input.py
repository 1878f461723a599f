"""Bad input through the public commands: every case gets a message naming the file or case and the problem, a
non-zero exit, and nothing written."""

import json
import logging
import os
import re
import subprocess
import sys
import zlib

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import ITKReader
from monai.transforms import LoadImage

from monai_mlbseg.__main__ import main
from monai_mlbseg.data import build_datalist, captured_stderr, make_synthetic_dataset, training_datalist, write_case
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.recipe import parsed, run_training_step
from tests.bundle_utils import REPO, bundle_command, copy_bundle, make_data, overrides, run_command, workflow
from tests.nifti_headers import write_sform, write_without_spacing

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
    header.write_text(header.read_text().replace("DimSize = 16", "DimSize = sixteen"))
    return ["--format", "promise12", "--labeled", ids[0], "--test", ids[3]], [
        f"{ids[0]}.mhd",
        "DimSize = 'sixteen 16 8' is not a list of positive integers",
    ]


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


def no_data_sentinels(tmp_path):
    """Finite but extreme no-data values (a float32's largest value) whose min-max range overflows."""
    data, ids = uamt(tmp_path)
    with h5py.File(data / ids[2] / "mri_norm2.h5", "r") as f:
        image = f["image"][()].astype(np.float32)
    image[:2, :2, :] = -np.finfo(np.float32).max
    image[-1, -1, -1] = np.finfo(np.float32).max
    rewrite_h5(data / ids[2] / "mri_norm2.h5", image=image)
    return ["--labeled", ids[0], "--test", ids[4]], [ids[2], f"{2 * 2 * SHAPE[2] + 1} voxels of magnitude 3.4e+38"]


def label_without_background(tmp_path):
    data, ids = uamt(tmp_path)
    with h5py.File(data / ids[0] / "mri_norm2.h5", "r") as f:
        label = f["label"][()]
    rewrite_h5(data / ids[0] / "mri_norm2.h5", label=np.ones_like(label))
    return ["--labeled", ids[0], "--test", ids[4]], [ids[0], "no background voxel"]


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


def constant_image(tmp_path):
    data, ids = uamt(tmp_path)
    rewrite_h5(data / ids[1] / "mri_norm2.h5", image=np.full(SHAPE, 0.25, np.float32))
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", ids[4]], [ids[1], "constant image (every voxel is 0.25)"]


def constant_image_foreground_label(tmp_path):
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    label = np.asarray(nib.load(data / "labelsTr" / image.name).dataobj)
    assert label.any(), "the label has foreground"
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), np.eye(4)), image)
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], [image.name, "constant image"]


def constant_unlabeled_image(tmp_path):
    data, ids = uamt(tmp_path)
    rewrite_h5(data / ids[3] / "mri_norm2.h5", image=np.zeros(SHAPE, np.float32))
    return ["--labeled", ids[0], "--test", ids[4]], [f"unlabeled[2] (case {ids[3]})", "constant image"]


def tiny_volume(tmp_path):
    data, ids = heart(tmp_path)
    write_case(data, ids[1], np.random.rand(3, 3, 3).astype(np.float32), np.eye(3, dtype=np.uint8)[None].repeat(3, 0),
               "msd_heart")  # fmt: skip
    return ["--format", "msd_heart", "--labeled", ids[1], "--test", ids[3]], [ids[1], "too small for a scan"]


def flat_volume(tmp_path):
    data, ids = uamt(tmp_path)
    rewrite_h5(data / ids[2] / "mri_norm2.h5", image=np.random.rand(64, 64, 2).astype(np.float32),
               label=np.ones((64, 64, 2), np.uint8))  # fmt: skip
    return ["--labeled", ids[0], "--test", ids[4]], [ids[2], "(64, 64, 2) is too small", "2 < 4"]


def write_list(data, name, lines):
    (data / name).write_text("\n".join(lines) + "\n")


def duplicate_labeled_id(tmp_path):
    data, ids = uamt(tmp_path)
    write_list(data, "train.list", [ids[0], ids[1], ids[0], ids[2], ids[3]])
    args = ["--train_list", "train.list", "--num_labeled", "3", "--test", ids[4]]
    return args, ["train.list", f"case id {ids[0]!r} listed twice: lines 1 and 3"]


def duplicate_unlabeled_id(tmp_path):
    data, ids = uamt(tmp_path)
    write_list(data, "train.list", [ids[0], ids[1], "# unlabeled", ids[2], ids[3], "", f"  {ids[2]}  "])
    args = ["--train_list", "train.list", "--num_labeled", "1", "--test", ids[4]]
    return args, ["train.list", f"case id {ids[2]!r} listed twice: lines 4 and 7"]


def duplicate_test_id(tmp_path):
    data, ids = uamt(tmp_path)
    write_list(data, "train.list", ids[:3])
    write_list(data, "test.list", [ids[4], ids[3], ids[4]])
    args = ["--train_list", "train.list", "--test_list", "test.list", "--num_labeled", "1"]
    return args, ["test.list", f"case id {ids[4]!r} listed twice: lines 1 and 3"]


def duplicate_given_id(tmp_path):
    data, ids = uamt(tmp_path)
    return ["--labeled", f"{ids[0]},{ids[1]}", "--test", f"{ids[4]},{ids[3]},{ids[4]}"], [
        "test: case id",
        "given twice: positions 1 and 3",
    ]


def num_labeled_too_large(tmp_path):
    data, ids = uamt(tmp_path)
    write_list(data, "train.list", ids[:4])
    args = ["--train_list", "train.list", "--num_labeled", "9", "--test", ids[4]]
    return args, ["train.list", "num_labeled=9 but the list has only 4 cases"]


def promise(tmp_path):
    data = tmp_path / "data"
    return data, make_synthetic_dataset(data, "promise12", num_cases=4, shape=SHAPE, seed=0)


def edit_header(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def _mhd_case(edit, expected):
    def case(tmp_path):
        data, ids = promise(tmp_path)
        header = data / f"{ids[1]}.mhd"
        edit(header)
        return ["--format", "promise12", "--labeled", f"{ids[0]},{ids[1]}", "--test", ids[3]], [header.name, expected]

    case.__name__ = f"mhd_{expected.split()[2 if expected.startswith('the header') else 0]}"
    return case


mhd_no_ndims = _mhd_case(lambda h: edit_header(h, "NDims = 3\n", ""), "the header has no NDims")
mhd_no_dimsize = _mhd_case(lambda h: edit_header(h, "DimSize", "DimSizeBroken"), "the header has no DimSize")
mhd_dimsize_ndims = _mhd_case(
    lambda h: edit_header(h, "DimSize = 16 16 8", "DimSize = 16 16"), "DimSize has 2 values but its NDims = 3"
)
mhd_element_type = _mhd_case(
    lambda h: edit_header(h, "ElementType = MET_FLOAT", "ElementType = MET_FLOAT32"), "ElementType 'MET_FLOAT32' is"
)
mhd_no_element_type = _mhd_case(lambda h: edit_header(h, "ElementType = MET_FLOAT\n", ""), "has no ElementType")
mhd_no_data_file = _mhd_case(
    lambda h: edit_header(h, "ElementDataFile = Case01.raw\n", ""), "the header has no ElementDataFile"
)
mhd_missing_raw = _mhd_case(lambda h: os.remove(h.with_suffix(".raw")), "named in the header is missing")
mhd_short_raw = _mhd_case(
    lambda h: h.with_suffix(".raw").write_bytes(h.with_suffix(".raw").read_bytes()[:100]), "holds 100 bytes"
)
mhd_long_raw = _mhd_case(
    lambda h: h.with_suffix(".raw").write_bytes(h.with_suffix(".raw").read_bytes() + b"\0" * 64),
    "64 bytes too many",
)


def _compress_raw(header, damage):
    raw = header.with_suffix(".raw")
    data = bytearray(zlib.compress(raw.read_bytes()))
    damage(data)
    raw.write_bytes(bytes(data))
    edit_header(header, "ElementDataFile", "CompressedData = True\nElementDataFile")


def _flip_last_byte(data):
    data[-1] ^= 0xFF  # the end of zlib's Adler-32 checksum


mhd_bad_checksum = _mhd_case(lambda h: _compress_raw(h, _flip_last_byte), "compressed data file")


def nifti_bad_crc(tmp_path):
    """A .nii.gz whose gzip CRC does not match its data (damaged in transfer): refused, not read."""
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    raw = bytearray(image.read_bytes())
    raw[-8] ^= 0xFF  # the gzip trailer: CRC-32, then the length
    image.write_bytes(bytes(raw))
    expected = [image.name, "gzip data are damaged", "CRC check failed"]
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], expected


def singular_sform(tmp_path):
    """Image and label of a labeled case with the same singular sform (axis 2 without spacing, qform unset, pixdim
    1.37 there): MONAI's reader would read the unset qform instead and find nothing wrong."""
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    for path in (image, data / "labelsTr" / image.name):
        write_sform(path, np.diag([1.25, 1.25, 0.0, 1.0]), (1.25, 1.25, 1.37))
    expected = [f"{image.name}: labeled[0] (case {ids[0]}) image: singular orientation", "axis 2 no voxel spacing"]
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], expected


def nifti_without_spacing(tmp_path):
    """A test image with pixdim 0 and neither qform nor sform: nibabel would read it as 1 mm."""
    data, ids = heart(tmp_path)
    image = data / "imagesTr" / f"{ids[3]}.nii.gz"
    write_without_spacing(image)
    expected = [f"{image.name}: test[0] (case {ids[3]}) image: the header gives no voxel spacing", "--spacing SX,SY,SZ"]
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], expected


def label_most_of_a_voxel_off(tmp_path):
    """A label whose origin is 0.8 mm (0.8 of a 1 mm voxel) off its image's."""
    data, ids = heart(tmp_path)
    label = data / "labelsTr" / f"{ids[0]}.nii.gz"
    img = nib.load(label)
    affine = img.affine.copy()
    affine[0, 3] += 0.8
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), label)
    expected = [label.name, "are not aligned", "0.8 image voxels (0.8 mm)", "more than the tolerance of 0.5 voxel"]
    return ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3]], expected


def prostate_three_channels(tmp_path):
    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "msd_prostate", num_cases=4, shape=SHAPE, seed=0)
    image = first_nifti(data, "imagesTr")
    img = nib.load(image)
    both = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.concatenate([both, both[..., :1]], axis=-1), img.affine), image)
    expected = [image.name, "3 channels", "expected 2 channels, or 1 (channel 0 alone"]
    return ["--format", "msd_prostate", "--labeled", ids[0], "--test", ids[3]], expected


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
    constant_image,
    constant_image_foreground_label,
    constant_unlabeled_image,
    tiny_volume,
    flat_volume,
    duplicate_labeled_id,
    duplicate_unlabeled_id,
    duplicate_test_id,
    duplicate_given_id,
    num_labeled_too_large,
    mhd_no_ndims,
    mhd_no_dimsize,
    mhd_dimsize_ndims,
    mhd_element_type,
    mhd_no_element_type,
    mhd_no_data_file,
    mhd_missing_raw,
    mhd_short_raw,
    mhd_long_raw,
    mhd_bad_checksum,
    nifti_bad_crc,
    no_data_sentinels,
    label_without_background,
    singular_sform,
    nifti_without_spacing,
    label_most_of_a_voxel_off,
    prostate_three_channels,
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
    assert "MET_Read" not in err and "MetaImage: " not in err, "ITK's parser output is kept out"
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


def test_the_bundles_spacing_is_the_spacing_of_nifti_files_that_store_none(tmp_path):
    """MSD heart files without spacing: training and inference refuse them, naming the file and the ``spacing`` id;
    with ``spacing`` set, the data check passes and the volumes are loaded with that spacing."""
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "msd_heart")
    for case in (*split["labeled"], *split["test"]):
        for folder in ("imagesTr", "labelsTr"):
            write_without_spacing(data / folder / f"{case}.nii.gz")
    over = overrides(bundle, data, "msd_heart", split)
    message = run_training(bundle, over)
    labeled_image = data / "imagesTr" / f"{split['labeled'][0]}.nii.gz"
    assert f"{labeled_image}: labeled[0]" in message and "the header gives no voxel spacing" in message
    assert 'the config id "spacing"' in message
    assert_nothing_trained(bundle)
    spacing = [1.25, 1.25, 1.37]
    wf = workflow(bundle, ["train.json"], "train", run_id="training", **over, spacing=spacing)
    run_training_step(wf, "data check")
    item = parsed(wf, "load_volume")(parsed(wf, "train#dataset#data")[0])
    np.testing.assert_allclose(item["image"].pixdim.numpy(), spacing, rtol=1e-6)
    test_image = data / "imagesTr" / f"{split['test'][0]}.nii.gz"
    for extra, fragment in (({}, f"{test_image}: test[0]"), ({"spacing": spacing}, "model.pt")):
        with pytest.raises(Exception) as info:  # no weights: inference gets as far as loading them
            workflow(bundle, ["inference.json"], "infer", **over, **extra)
        chain, error = [], info.value
        while error is not None:
            chain.append(str(error))
            error = error.__cause__
        assert fragment in "\n".join(chain) and ("no voxel spacing" in "\n".join(chain)) == (not extra)


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


def test_prepare_warns_about_extreme_anisotropy_and_accepts(tmp_path, caplog):
    data, ids = heart(tmp_path)
    image = first_nifti(data, "imagesTr")
    for path in (image, data / "labelsTr" / image.name):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([0.2, 0.2, 5.0, 1.0])), path)
    with caplog.at_level(logging.WARNING):
        main(["prepare", "--data_dir", str(data), "--format", "msd_heart", "--labeled", ids[0], "--test", ids[3],
              "--progress", "False"])  # fmt: skip
    assert (data / "datalist.json").exists()
    assert any(image.name in r.getMessage() and "extremely anisotropic (ratio 25 > 20)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)  # fmt: skip


def _moved_label(tmp_path, shift_mm):
    """A heart data set of 1.25 mm voxels whose first label's origin is ``shift_mm`` off its image's."""
    data, ids = heart(tmp_path)
    for path in (first_nifti(data, "imagesTr"), first_nifti(data, "labelsTr")):
        affine = np.diag([1.25, 1.25, 1.25, 1.0])
        affine[0, 3] = shift_mm if "labelsTr" in path.parts else 0.0
        nib.save(nib.Nifti1Image(np.asarray(nib.load(path).dataobj), affine), path)
    return data, ids, first_nifti(data, "labelsTr")


@pytest.mark.parametrize("shift_mm, warned", [(0.01, False), (0.1, True)], ids=["0.01mm", "0.1mm"])
def test_prepare_and_check_accept_a_label_a_fraction_of_a_voxel_off(shift_mm, warned, tmp_path, capsys, caplog):
    """0.01 mm of a 1.25 mm voxel (0.008 voxel) is accepted silently; 0.1 mm (0.08 voxel) with a WARNING naming the
    label file and the displacement."""
    data, ids, label = _moved_label(tmp_path, shift_mm)
    with caplog.at_level(logging.WARNING):
        main(["prepare", "--data_dir", str(data), "--format", "msd_heart", "--labeled", ids[0], "--test", ids[3],
              "--progress", "False"])  # fmt: skip
        main(["check", str(data / "datalist.json"), "--progress", "False"])
    out = capsys.readouterr().out
    assert f"prepare: wrote {data / 'datalist.json'}" in out and "is usable [msd_heart]" in out
    assert json.loads((data / "datalist.json").read_text())["labeled"][0]["label"] == f"labelsTr/{label.name}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and str(label) in r.getMessage()]
    if warned:
        assert len(warnings) == 2, warnings  # prepare, then check
        assert all("slightly misaligned" in w and "0.08 image voxels (0.1 mm)" in w for w in warnings)
    else:
        assert warnings == []


def test_prepare_and_check_accept_a_nifti_without_spacing_only_with_a_spacing(tmp_path, capsys):
    """Refused without ``--spacing`` (naming the file and the option), accepted with it, by prepare and check."""
    data, ids = heart(tmp_path)
    files = [data / folder / f"{ids[0]}.nii.gz" for folder in ("imagesTr", "labelsTr")]
    for path in files:
        write_without_spacing(path)
    args = ["--format", "msd_heart", "--labeled", ids[0], "--test", ids[3], "--progress", "False"]
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--data_dir", str(data), *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and not (data / "datalist.json").exists()
    for path in files:
        assert f"{path}: labeled[0] (case {ids[0]}) " in err
    assert err.count("the header gives no voxel spacing (pixdim [0.0, 0.0, 0.0], no sform)") == 2
    assert "--spacing SX,SY,SZ" in err
    main(["prepare", "--data_dir", str(data), *args, "--spacing", "1.25,1.25,1.37"])
    out = capsys.readouterr().out
    assert f"prepare: wrote {data / 'datalist.json'}" in out and "read as [1.25, 1.25, 1.37] mm" in out
    datalist = str(data / "datalist.json")
    with pytest.raises(SystemExit) as exit_info:
        main(["check", datalist, "--progress", "False"])
    assert exit_info.value.code == 2 and "the header gives no voxel spacing" in capsys.readouterr().err
    main(["check", datalist, "--progress", "False", "--spacing", "1.25,1.25,1.37"])
    assert "is usable [msd_heart]: 1 labeled" in capsys.readouterr().out


def test_prepare_and_check_accept_prostate_images_of_t2_alone(tmp_path, capsys):
    """MSD prostate images of T2 alone (3D, as PROMISE12's), next to T2+ADC ones."""
    data = tmp_path / "data"
    ids = make_synthetic_dataset(data, "msd_prostate", num_cases=4, shape=SHAPE, seed=0)
    for case in ids[:2]:
        image = data / "imagesTr" / f"{case}.nii.gz"
        img = nib.load(image)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine), image)
    main(["prepare", "--data_dir", str(data), "--format", "msd_prostate", "--labeled", f"{ids[0]},{ids[2]}",
          "--test", ids[3], "--progress", "False"])  # fmt: skip
    main(["check", str(data / "datalist.json"), "--progress", "False"])
    out = capsys.readouterr().out
    assert "prepare: wrote" in out and "is usable [msd_prostate]: 2 labeled, 1 unlabeled, 1 test" in out


@pytest.mark.parametrize("how", ["not writable", "write fails", "not a folder"])
def test_prepare_refuses_an_output_it_cannot_write(how, tmp_path, capsys, monkeypatch):
    data, ids = uamt(tmp_path)
    args = ["prepare", "--data_dir", str(data), "--labeled", ids[0], "--test", ids[4], "--progress", "False"]
    folder = data
    if how == "not writable":  # a read-only folder or file system (chmod alone does not stop root)
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(data) else real_access(p, mode))
    elif how == "write fails":

        def refuse(path, text):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(sys.modules["monai_mlbseg.data.prepare"], "atomic_write_text", refuse)
    else:
        (tmp_path / "plain_file").write_text("x")
        folder = tmp_path / "plain_file"
        args += ["--output", str(folder / "datalist.json")]
    before = sorted(data.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{folder}: " in err and "--output" in err
    assert "partial" not in err, "no temporary file is named"
    assert sorted(data.rglob("*")) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_prepare_read_only_folder_command_line(tmp_path):
    data, ids = uamt(tmp_path)
    data.chmod(0o555)
    try:
        result = run_command([sys.executable, "-m", "monai_mlbseg", "prepare", "--data_dir", str(data),
                              "--labeled", ids[0], "--test", ids[4], "--progress", "False"])  # fmt: skip
    finally:
        data.chmod(0o755)
    assert result.returncode == 2 and "Traceback" not in result.stdout
    assert f"{data}: is not writable" in result.stdout and "--output" in result.stdout


def test_captured_stderr_keeps_itk_noise_out(tmp_path, capfd):
    data, ids = promise(tmp_path)
    header = data / f"{ids[0]}.mhd"
    edit_header(header, "DimSize", "DimSizeBroken")
    with captured_stderr() as noise, pytest.raises(RuntimeError):
        LoadImage(image_only=True)(str(header), reader=ITKReader())
    assert "DimSize required" in noise.getvalue()
    assert "DimSize" not in capfd.readouterr().err


# ---- `python -m monai_mlbseg check DATALIST`: the same checks on an existing datalist ----


def decathlon(tmp_path, n=4):
    data, ids = heart(tmp_path, n)
    entry = {"image": f"./imagesTr/{ids[0]}.nii.gz", "label": f"./labelsTr/{ids[0]}.nii.gz"}
    datalist = {
        "name": "Heart",
        "numTraining": 3,
        "training": [entry, {"image": f"imagesTr/{ids[1]}.nii.gz"}, f"imagesTr/{ids[2]}.nii.gz"],
        "test": [{"image": f"imagesTr/{ids[3]}.nii.gz", "label": f"labelsTr/{ids[3]}.nii.gz"}],
    }
    return data, ids, datalist


def run_check(tmp_path, datalist, capsys, *args, text=None):
    path = tmp_path / "data" / "dataset.json"
    path.write_text(json.dumps(datalist) if text is None else text)
    before = sorted((tmp_path / "data").rglob("*"))
    code = 0
    try:
        main(["check", str(path), "--progress", "False", *args])
    except SystemExit as e:
        code = e.code
    assert sorted((tmp_path / "data").rglob("*")) == before, "check writes nothing"
    out = capsys.readouterr()
    return code, out.out + out.err


def test_check_accepts_a_decathlon_datalist(tmp_path, capsys):
    data, ids, datalist = decathlon(tmp_path)
    code, out = run_check(tmp_path, datalist, capsys, "--format", "msd_heart")
    assert code == 0 and "is usable [msd_heart]: 1 labeled, 2 unlabeled, 1 test" in out
    loaded = training_datalist(data, "msd_heart", data / "dataset.json")
    assert [it["case_id"] for it in loaded["unlabeled"]] == [ids[1], ids[2]]
    assert loaded["labeled"][0]["label"] == str(data / "labelsTr" / f"{ids[0]}.nii.gz")


def _decathlon_missing_file(data, ids, dl):
    dl["training"][2] = f"imagesTr/{ids[2]}_ghost.nii.gz"
    return ["--format", "msd_heart"], [f"{ids[2]}_ghost.nii.gz", "file not found"]


def _decathlon_constant_image(data, ids, dl):
    nib.save(nib.Nifti1Image(np.ones(SHAPE, np.float32), np.eye(4)), data / "imagesTr" / f"{ids[0]}.nii.gz")
    return ["--format", "msd_heart"], [f"{ids[0]}.nii.gz", "constant image"]


def _decathlon_test_without_label(data, ids, dl):
    dl["test"].append(f"imagesTr/{ids[1]}.nii.gz")
    return ["--format", "msd_heart"], ["dataset.json test[1]", "test entries need a 'label'"]


def _decathlon_duplicate_entry(data, ids, dl):
    dl["training"].append(dict(dl["training"][0]))
    return ["--format", "msd_heart"], [f"case {ids[0]}", "listed more than once"]


def _decathlon_outside(data, ids, dl):
    dl["training"].append({"image": "../../elsewhere.nii.gz"})
    return ["--format", "msd_heart"], ["elsewhere.nii.gz", "outside the data folder"]


def _decathlon_no_format(data, ids, dl):
    return [], ["dataset.json", "records no format: give --format"]


def _decathlon_mixed_forms(data, ids, dl):
    dl["labeled"] = []
    return ["--format", "msd_heart"], ["dataset.json", "mixes MONAI's decathlon form"]


def _unknown_keys(data, ids, dl):
    dl.clear()
    dl.update({"train": [], "val": []})
    return ["--format", "msd_heart"], ["dataset.json", "holds none of the lists", "'train', 'val'"]


def _label_shape(data, ids, dl):
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 6), np.uint8), np.eye(4)), data / "labelsTr" / f"{ids[0]}.nii.gz")
    return ["--format", "msd_heart"], [f"labelsTr/{ids[0]}.nii.gz", "label shape"]


CHECK_CASES = [
    _decathlon_missing_file,
    _decathlon_constant_image,
    _decathlon_test_without_label,
    _decathlon_duplicate_entry,
    _decathlon_outside,
    _decathlon_no_format,
    _decathlon_mixed_forms,
    _unknown_keys,
    _label_shape,
]


@pytest.mark.parametrize("case", CHECK_CASES, ids=lambda f: f.__name__.strip("_"))
def test_check_refuses_bad_datalists(case, tmp_path, capsys):
    data, ids, dl = decathlon(tmp_path)
    args, expected = case(data, ids, dl)
    code, out = run_check(tmp_path, dl, capsys, *args)
    assert code == 2 and out.startswith("error: check: ") and "Traceback" not in out
    assert all(f in out for f in expected), out


@pytest.mark.parametrize("text", ["", "{ training: [", "[1, 2]"])
def test_check_refuses_malformed_json(text, tmp_path, capsys):
    decathlon(tmp_path)
    code, out = run_check(tmp_path, None, capsys, "--format", "msd_heart", text=text)
    assert code == 2 and "dataset.json" in out and ("not a readable JSON" in out or "must hold a JSON object" in out)


@pytest.mark.parametrize("case", [c for c in PREPARE_CASES if c not in (no_clean, num_labeled_too_large)
                                  and not c.__name__.startswith("duplicate")], ids=lambda f: f.__name__)  # fmt: skip
def test_check_refuses_what_prepare_refuses(case, tmp_path, capsys):
    """The datalist prepare would have written, checked by `check`: the same problems."""
    args, expected = case(tmp_path)
    data = tmp_path / "data"
    options = dict(zip((a.lstrip("-") for a in args[::2]), args[1::2]))
    fmt = options.pop("format", "uamt_h5")
    if "num_labeled" in options:
        options["num_labeled"] = int(options["num_labeled"])
    datalist = build_datalist(data, fmt, **options)
    code, out = run_check(tmp_path, datalist, capsys)
    assert code == 2 and "Traceback" not in out
    assert all(f in out for f in expected), out


# ---- the bundles' command line on bad data: the problem list, each with its file, is the end of the output ----


def _constant_labeled_image(tmp_path, data):
    rewrite_h5(data / "la_b" / "mri_norm2.h5", image=np.full((40, 36, 8), 7.0, np.float32))
    return {}, ["la_b/mri_norm2.h5", "constant image (every voxel is 7)"]


def _tiny_unlabeled_volume(tmp_path, data):
    rewrite_h5(data / "la_c" / "mri_norm2.h5", image=np.random.rand(3, 3, 3).astype(np.float32), label=None)
    rewrite_h5(data / "la_b" / "mri_norm2.h5", label=np.zeros((40, 36, 8), np.uint8))  # a second problem
    return {}, ["la_c/mri_norm2.h5", "(3, 3, 3) is too small", "la_b/mri_norm2.h5", "empty label"]


def _duplicate_in_train_list(tmp_path, data):
    write_list(data, "train.list", ["la_a", "la_b", "la_c", "la_a", "la_d"])
    return {"split": {"train_list": str(data / "train.list"), "num_labeled": 2, "test": ["la_e"]}}, [
        "train.list",
        "case id 'la_a' listed twice: lines 1 and 4",
    ]


def _num_labeled_too_large(tmp_path, data):
    write_list(data, "train.list", ["la_a", "la_b", "la_c"])
    return {"split": {"train_list": str(data / "train.list"), "num_labeled": 9, "test": ["la_e"]}}, [
        "train.list",
        "num_labeled=9 but the list has only 3 cases",
    ]


def _malformed_json(tmp_path, data):
    (data / "datalist.json").write_text('{"labeled": [')
    return {"datalist_file": data / "datalist.json"}, ["datalist.json", "not a readable JSON file"]


def _empty_datalist(tmp_path, data):
    (data / "datalist.json").write_text('{"labeled": [], "unlabeled": [], "test": []}')
    return {"datalist_file": data / "datalist.json"}, ["datalist: no labeled cases"]


def _decathlon_with_missing_file(tmp_path, data):
    entry = {"image": "la_a/mri_norm2.h5", "label": "la_a/mri_norm2.h5"}
    test = {"image": "la_e/mri_norm2.h5", "label": "la_e/mri_norm2.h5"}
    dl = {"training": [entry, {"image": "la_b/mri_norm2.h5"}, {"image": "la_q/mri_norm2.h5"}], "test": [test]}
    (data / "dataset.json").write_text(json.dumps(dl))
    return {"datalist_file": data / "dataset.json"}, ["la_q/mri_norm2.h5", "file not found"]


def _outside_data_folder(tmp_path, data):
    (tmp_path / "elsewhere.h5").write_bytes(b"")
    dl = {"labeled": [{"image": "la_a/mri_norm2.h5", "label": "la_a/mri_norm2.h5"}], "unlabeled": [], "test": []}
    dl["unlabeled"].append({"case_id": "x", "image": "../elsewhere.h5"})
    (data / "datalist.json").write_text(json.dumps(dl))
    return {"datalist_file": data / "datalist.json"}, ["elsewhere.h5", "outside the data folder"]


def _missing_data_folder(tmp_path, data):
    return {"dataset_dir": tmp_path / "nowhere"}, ["nowhere: data folder not found"]


def _constant_test_image(tmp_path, data):
    rewrite_h5(data / "la_e" / "mri_norm2.h5", image=np.zeros((40, 36, 8), np.float32))
    return {}, ["la_e/mri_norm2.h5", "constant image"]


def _test_label_shape(tmp_path, data):
    rewrite_h5(data / "la_e" / "mri_norm2.h5", label=np.zeros((40, 36, 6), np.uint8))
    return {}, ["la_e/mri_norm2.h5", "label shape (40, 36, 6) differs from image shape (40, 36, 8)"]


def _mhd_without_dimsize(tmp_path, data):
    edit_header(data / "Case01.mhd", "DimSize", "DimSizeBroken")
    return {}, ["Case01.mhd", "the header has no DimSize"]


def _missing_test_raw(tmp_path, data):
    os.remove(data / "Case04.raw")
    return {}, ["Case04.mhd", "Case04.raw named in the header is missing"]


def _decathlon_test_entry_without_label(tmp_path, data):
    entry = {"image": "Case00.mhd", "label": "Case00_segmentation.mhd"}
    (data / "dataset.json").write_text(json.dumps({"training": [entry, "Case02.mhd"], "test": ["Case04.mhd"]}))
    return {"datalist_file": data / "dataset.json"}, ["dataset.json test[0] (Case04.mhd)", "need a 'label'"]


BUNDLE_CASES = [
    ("mlbseg_la", "training", _constant_labeled_image),
    ("mlbseg_la", "training", _tiny_unlabeled_volume),
    ("mlbseg_la", "training", _duplicate_in_train_list),
    ("mlbseg_la", "training", _num_labeled_too_large),
    ("mlbseg_la", "training", _malformed_json),
    ("mlbseg_la", "training", _empty_datalist),
    ("mlbseg_la", "training", _decathlon_with_missing_file),
    ("mlbseg_la", "training", _outside_data_folder),
    ("mlbseg_la", "training", _missing_data_folder),
    ("mlbseg_la", "inference", _constant_test_image),
    ("mlbseg_la", "evaluation", _test_label_shape),
    ("mlbseg_prostate", "training", _mhd_without_dimsize),
    ("mlbseg_prostate", "inference", _missing_test_raw),
    ("mlbseg_prostate", "evaluation", _decathlon_test_entry_without_label),
]


def assert_problem_list_ends_the_output(result, expected, once=True):
    """Exit status 2; the last lines are the problem list (after one ERROR headline), each problem once (a debug
    run's traceback repeats them)."""
    out = result.stdout
    assert result.returncode == 2, out[-3000:]
    lines = out.rstrip().splitlines()
    head = max(i for i, line in enumerate(lines) if " - ERROR - " in line)
    problems = lines[head + 1 :]
    count = re.search(r"\((\d+) problems?\):$", lines[head])
    assert count and int(count.group(1)) == len(problems) > 0, lines[head:]
    assert all(re.fullmatch(r"  - \S.*: .+", p) for p in problems), problems
    assert not once or all(out.count(p.strip()) == 1 for p in problems), "each problem is printed once"
    for fragment in expected:
        assert any(fragment in p for p in problems), f"{fragment!r} not in {problems}"
    return out


@pytest.mark.parametrize("name,kind,case", BUNDLE_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_bundle_command_line_refuses_bad_data(name, kind, case, tmp_path):
    bundle = copy_bundle(name, tmp_path)
    format = "uamt_h5" if name == "mlbseg_la" else "promise12"
    data, split = make_data(tmp_path, format)
    over, expected = case(tmp_path, data)
    over = {"split": split, "dataset_dir": data, **over}
    cmd = bundle_command(bundle, kind, over.pop("dataset_dir"), format, over.pop("split"), **over)
    out = assert_problem_list_ends_the_output(run_command(cmd), expected)
    assert "Traceback" not in out and "Failed to evaluate" not in out
    assert not [p for p in ("models", "work", "eval") if (bundle / p).exists()], "nothing written"


def test_bundle_debug_flag_shows_the_traceback_before_the_problem_list(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    over, expected = _constant_labeled_image(tmp_path, data)
    cmd = bundle_command(bundle, "training", data, "uamt_h5", split)
    out = assert_problem_list_ends_the_output(run_command(cmd, MLBSEG_DEBUG="1"), expected, once=False)
    assert "Traceback" in out and out.index("Traceback") < out.index(" - ERROR - ")


@pytest.mark.parametrize("error,status", [("InputError", 2), ("ValueError", 1)])
def test_exit_on_input_error_only_takes_input_errors(error, status):
    script = (
        "import logging; logging.basicConfig(level=logging.INFO)\n"
        "from monai_mlbseg.utils import InputError, Problem, exit_on_input_error\n"
        "exit_on_input_error(); exit_on_input_error()\n"
        "def inner():\n"
        f"    raise {error}([Problem('/data/a.h5', 'constant image')], 'checks') if {error} is InputError "
        f"else {error}('a bug')\n"
        "try:\n    inner()\nexcept Exception as e:\n    raise RuntimeError('Failed to evaluate') from e\n"
    )
    result = run_command([sys.executable, "-c", script])
    assert result.returncode == status
    if status == 2:
        assert result.stdout.rstrip().endswith("ERROR:monai_mlbseg:checks (1 problem):\n  - /data/a.h5: constant image")
        assert "Traceback" not in result.stdout
    else:
        assert "Traceback" in result.stdout and "ValueError: a bug" in result.stdout
