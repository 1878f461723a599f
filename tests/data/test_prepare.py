"""prepare: writes a checked datalist; every bad input is reported by file/case and nothing is written."""

from __future__ import annotations

import gzip
import json
import os
import shutil

import h5py
import nibabel as nib
import numpy as np
import pytest

from monai_mlbseg.data import load_datalist, load_volume_transforms, make_synthetic_dataset, prepare
from monai_mlbseg.data.datalist.check import GEOMETRY_MAX_VOXELS, GEOMETRY_WARN_VOXELS
from monai_mlbseg.utils import InputError
from tests.nifti_headers import write_sform, write_without_spacing

# ITK (SWIG) warns on import under Python 3.11+
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

SHAPE = (24, 24, 12)


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    base = tmp_path_factory.mktemp("templates")
    for fmt, n in (("uamt_h5", 6), ("msd_heart", 4), ("promise12", 4), ("msd_prostate", 3)):
        make_synthetic_dataset(base / fmt, fmt, num_cases=n, shape=SHAPE, seed=2)
    return base


@pytest.fixture
def data(templates, tmp_path):
    """A fresh copy of a template data set: ``data("msd_heart") -> folder``."""

    def copy(fmt):
        dst = tmp_path / fmt
        shutil.copytree(templates / fmt, dst)
        return dst

    return copy


UAMT = {"format": "uamt_h5", "train_list": "train.list", "test_list": "test.list", "num_labeled": 2}
HEART = {"format": "msd_heart", "labeled": "la_000,la_001", "test": "la_003"}
PROMISE = {"format": "promise12", "labeled": "Case00,Case01", "test": "Case03"}


def _fails(root, kwargs, *expected):
    """Run prepare, expect an InputError whose problems contain all ``expected`` strings in one message."""
    with pytest.raises(InputError) as err:
        prepare(str(root), progress=False, **kwargs)
    text = str(err.value)
    assert text.startswith("prepare:")
    assert any(all(e in str(p) for e in expected) for p in err.value.problems), text
    assert not (root / "datalist.json").exists()
    assert not [p for p in root.rglob("*datalist*")]
    return err.value.problems


def _nifti(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))


def _read_nifti(path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


# ---- good input ----


def test_prepare_writes_checked_datalist(data, capsys):
    root = data("uamt_h5")
    out = prepare(str(root), progress=False, **UAMT)
    assert out == str(root / "datalist.json")
    dl = json.loads((root / "datalist.json").read_text())
    assert [len(dl[k]) for k in ("labeled", "unlabeled", "test", "validation")] == [2, 3, 1, 0]
    assert "2 labeled, 3 unlabeled, 1 test" in capsys.readouterr().out
    assert load_datalist(out)["labeled"][0]["image"] == str(root / "case000" / "mri_norm2.h5")
    # same content again: fine, file untouched; a different selection needs overwrite
    mtime = os.stat(out).st_mtime_ns
    assert prepare(str(root), progress=False, **UAMT) == out and os.stat(out).st_mtime_ns == mtime
    with pytest.raises(InputError, match="exists with a different datalist"):
        prepare(str(root), progress=False, **{**UAMT, "num_labeled": 3})
    assert json.loads((root / "datalist.json").read_text()) == dl
    prepare(str(root), progress=False, overwrite=True, **{**UAMT, "num_labeled": 3})
    assert len(json.loads((root / "datalist.json").read_text())["labeled"]) == 3


def test_prepare_fire_style_arguments(data, tmp_path):
    root = data("promise12")
    out = tmp_path / "lists" / "promise.json"
    prepare(str(root), format="promise12", output=str(out), labeled=("Case00", "Case01"), test="Case03", progress=False)
    dl = json.loads(out.read_text())
    assert [it["case_id"] for it in dl["labeled"]] == ["Case00", "Case01"]
    assert [it["case_id"] for it in dl["unlabeled"]] == ["Case02"]
    root = data("msd_prostate")
    prepare(str(root), format="msd_prostate", labeled="prostate_00", test=["prostate_02"], progress=False)
    assert json.loads((root / "datalist.json").read_text())["unlabeled"][0]["case_id"] == "prostate_01"


def test_prepare_allow_no_unlabeled(data):
    root = data("uamt_h5")
    _fails(root, {**UAMT, "num_labeled": 5}, "no unlabeled cases")
    prepare(str(root), progress=False, allow_no_unlabeled=True, **{**UAMT, "num_labeled": 5})
    assert (root / "datalist.json").exists()


# ---- bad input: one test each ----


def test_missing_file(data):
    root = data("uamt_h5")
    os.remove(root / "case001" / "mri_norm2.h5")
    _fails(root, UAMT, str(root / "case001" / "mri_norm2.h5"), "labeled[1] (case case001) image: file not found")


def test_unknown_case_id(data):
    root = data("msd_heart")
    _fails(root, {**HEART, "labeled": "la_000,la_077"}, "imagesTr/la_077.nii.gz", "(case la_077)", "file not found")


def test_truncated_nifti(data):
    root = data("msd_heart")
    path = root / "imagesTr" / "la_001.nii.gz"
    path.write_bytes(path.read_bytes()[:1000])
    _fails(root, HEART, str(path), "(case la_001) image: unreadable or corrupt file")


def test_gzip_garbage(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_000.nii.gz"
    path.write_bytes(gzip.compress(b"definitely not a NIfTI header" * 20))
    _fails(root, HEART, str(path), "(case la_000) label: unreadable or corrupt file")


@pytest.mark.parametrize(
    "case, dataset, where",
    [("case000", "label", "(case case000) label"), ("case003", "image", "unlabeled[1] (case case003) image")],
)
def test_h5_without_a_dataset(data, case, dataset, where):
    root = data("uamt_h5")
    path = root / case / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        del f[dataset]
    _fails(root, UAMT, str(path), where, f"no dataset '{dataset}'")


def test_bad_mhd_header(data):
    root = data("promise12")
    path = root / "Case01.mhd"
    path.write_text(path.read_text().replace("DimSize = 24 24 12", "DimSize = twenty four"))
    _fails(root, PROMISE, str(path), "(case Case01) image: the header's DimSize = 'twenty four' is not a list of")


def test_missing_raw(data):
    root = data("promise12")
    os.remove(root / "Case00_segmentation.raw")
    raw = root / "Case00_segmentation.raw"
    _fails(root, PROMISE, str(root / "Case00_segmentation.mhd"), f"(case Case00) label: the data file {raw} named in")


def test_shape_mismatch(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_001.nii.gz"
    label, affine = _read_nifti(path)
    _nifti(path, label[:, :-2], affine)
    _fails(
        root, HEART, str(path), "(case la_001) label: label shape (24, 22, 12) differs from image shape (24, 24, 12)"
    )


def test_spacing_mismatch(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_000.nii.gz"
    label, _ = _read_nifti(path)
    _nifti(path, label, np.diag([1.0, 1.0, 2.5, 1.0]))
    _fails(
        root,
        HEART,
        str(path),
        "label spacing [1.0, 1.0, 2.5] differs from image spacing [1.0, 1.0, 1.0]",
        "a label voxel lies up to 16.5 image voxels (16.5 mm)",  # the last slice (11) at 27.5 mm instead of 11 mm
        "more than the tolerance of 0.5 voxel",
    )


def test_affine_mismatch(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_003.nii.gz"  # a test case
    label, affine = _read_nifti(path)
    affine = affine.copy()
    affine[:3, 3] = [5.0, 0.0, 0.0]
    _nifti(path, label, affine)
    _fails(
        root,
        HEART,
        str(path),
        f"test[0] (case la_003) label: label and image ({root / 'imagesTr' / 'la_003.nii.gz'}) are not aligned",
        "label origin differs from the image's by up to 5 mm: a label voxel lies up to 5 image voxels (5 mm)",
    )


def _shifted_label_case(root, shift_mm, turn_degrees=0.0):
    """Case la_000 with 1.25 x 1.25 x 1.5 mm voxels, its label's origin moved by ``shift_mm`` along x and its axes
    turned by ``turn_degrees`` about z (around the volume's centre); returns the label's path."""
    spacing = np.diag([1.25, 1.25, 1.5, 1.0])
    image, _ = _read_nifti(root / "imagesTr" / "la_000.nii.gz")
    _nifti(root / "imagesTr" / "la_000.nii.gz", image, spacing)
    path = root / "labelsTr" / "la_000.nii.gz"
    label, _ = _read_nifti(path)
    t = np.radians(turn_degrees)
    turn = np.array([[np.cos(t), -np.sin(t), 0, 0], [np.sin(t), np.cos(t), 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    centre = np.eye(4)
    centre[:3, 3] = spacing[:3, :3] @ (np.array(SHAPE) - 1) / 2
    moved = centre @ turn @ np.linalg.inv(centre) @ spacing
    moved[0, 3] += shift_mm
    _nifti(path, label, moved)
    return path


@pytest.mark.parametrize(
    "shift_mm, turn_degrees, warned",
    [(0.01, 0.0, None), (-0.1, 0.0, "0.08 image voxels (0.1 mm)"), (0.0, 0.3, "label axes turned by up to 0.3 deg")],
    ids=["0.01mm-silent", "0.1mm-warned", "0.3deg-warned"],
)
def test_a_label_less_than_half_a_voxel_off_its_image_is_accepted(data, caplog, shift_mm, turn_degrees, warned):
    """Below GEOMETRY_WARN_VOXELS silently (a 0.01 mm shift is 0.008 of a 1.25 mm voxel), up to GEOMETRY_MAX_VOXELS
    with a WARNING naming the label file and the displacement: every label voxel still lies on its own image voxel."""
    assert (GEOMETRY_WARN_VOXELS, GEOMETRY_MAX_VOXELS) == (0.01, 0.5)
    root = data("msd_heart")
    path = _shifted_label_case(root, shift_mm, turn_degrees)
    with caplog.at_level("WARNING", logger="monai_mlbseg.data.datalist"):
        prepare(str(root), progress=False, **HEART)
    assert (root / "datalist.json").exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(path) in r.getMessage()]
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and "slightly misaligned" in warnings[0] and warned in warnings[0], warnings
        assert "accepted (at most 0.5 voxel" in warnings[0]


@pytest.mark.parametrize(
    "shift_mm, turn_degrees, expected",
    [
        (1.0, 0.0, "by up to 1 mm: a label voxel lies up to 0.8 image voxels (1 mm)"),
        (0.0, 3.0, "label axes turned by up to 3 degrees from the image's: a label voxel lies up to 0.618 image"),
    ],
    ids=["1mm", "3deg"],
)
def test_a_label_more_than_half_a_voxel_off_its_image_is_refused(data, shift_mm, turn_degrees, expected):
    root = data("msd_heart")
    path = _shifted_label_case(root, shift_mm, turn_degrees)
    _fails(root, HEART, str(path), "label and image", "are not aligned", expected, "tolerance of 0.5 voxel")


def _with_affine(path, change):
    """Rewrite ``path`` with its sform changed by ``change``, no qform."""
    _, affine = _read_nifti(path)
    affine = affine.copy()
    change(affine)
    write_sform(path, affine, (1.0, 1.0, 1.0))


@pytest.mark.parametrize(
    "folder, case, change, expected",
    [
        ("imagesTr", "la_000", lambda a: a.__setitem__((0, 3), np.nan), "holds NaN or inf values"),
        ("labelsTr", "la_001", lambda a: a.__setitem__((0, 3), np.nan), "holds NaN or inf values"),
        (
            "imagesTr",
            "la_002",
            lambda a: a.__setitem__((slice(0, 3), 2), 0.0),
            "singular orientation: the header gives axis 2 no voxel spacing",
        ),
        (
            "imagesTr",
            "la_002",
            lambda a: a.__setitem__((slice(0, 3), 1), a[:3, 0]),
            "singular orientation: two axes of the header's orientation matrix point the same way",
        ),
    ],
    ids=["nan-origin-image", "nan-origin-label", "no-spacing-unlabeled", "parallel-axes-unlabeled"],
)
def test_a_header_geometry_that_cannot_place_the_volume_is_refused(data, folder, case, change, expected):
    """In any file, also an unlabeled image (la_002), which has no label to compare with."""
    root = data("msd_heart")
    path = root / folder / f"{case}.nii.gz"
    _with_affine(path, change)
    _fails(root, HEART, str(path), expected)


def test_a_singular_sform_is_refused_although_monai_reads_the_unset_qform_instead(data):
    """Image and label of a labeled case with the same singular sform (axis 2 without spacing, qform unset) and a
    pixdim of 1.37 mm on that axis: MONAI's reader finds the sform's spacing at odds with pixdim and reads the unset
    qform instead (a plausible diagonal affine), so the file itself must be judged by its header."""
    from monai.transforms import LoadImage

    root = data("msd_heart")
    singular = np.diag([1.25, 1.25, 0.0, 1.0])
    paths = [root / "imagesTr" / "la_000.nii.gz", root / "labelsTr" / "la_000.nii.gz"]
    for path in paths:
        write_sform(path, singular, (1.25, 1.25, 1.37))
    read = LoadImage(image_only=True)(str(paths[0])).affine.numpy()
    np.testing.assert_allclose(read, np.diag([1.25, 1.25, 1.37, 1.0]), rtol=1e-6)  # what MONAI makes of it
    problems = _fails(root, HEART, str(paths[0]), "image: singular orientation", "axis 2 no voxel spacing")
    assert any(p.where == str(paths[1]) and "label: singular orientation" in p.what for p in problems)


def test_an_sform_monai_would_replace_by_the_qform_is_refused(data):
    """A valid sform (1.25 x 1.25 x 1.37 mm, origin 10 mm) with a stale pixdim of 1 mm: MONAI's reader would read the
    unset qform (1 mm, origin 0) instead, silently."""
    root = data("msd_heart")
    path = root / "imagesTr" / "la_002.nii.gz"  # an unlabeled image: no label to compare with
    sform = np.diag([1.25, 1.25, 1.37, 1.0])
    sform[:3, 3] = 10.0
    write_sform(path, sform, (1.0, 1.0, 1.0))
    expected = (
        "MONAI's reader does not read the geometry of the header's sform: the sform's spacing [1.25, 1.25, 1.37] "
        "disagrees with pixdim [1.0, 1.0, 1.0], so it reads the unset qform instead (spacing [1.0, 1.0, 1.0], origin "
        "[0.0, 0.0, 0.0]); make the sform and pixdim agree"
    )
    _fails(root, HEART, str(path), "unlabeled[0] (case la_002) image: " + expected)


def test_a_nifti_without_spacing_is_refused_in_any_split_and_read_with_a_given_spacing(data):
    """pixdim 0 without qform or sform: nibabel guesses 1 mm. Refused for the labeled, unlabeled and test cases
    alike; accepted with ``spacing``, and the loader then reads the volume with that spacing."""
    root = data("msd_heart")
    cases = {"la_000": "labeled[0]", "la_002": "unlabeled[0]", "la_003": "test[0]"}
    for case in cases:
        for folder in ("imagesTr", "labelsTr"):
            write_without_spacing(root / folder / f"{case}.nii.gz")
    problems = _fails(root, HEART, str(root / "imagesTr" / "la_000.nii.gz"), "no voxel spacing (pixdim [0.0, 0.0, 0.0]")
    for case, where in cases.items():
        image = [p for p in problems if p.where == str(root / "imagesTr" / f"{case}.nii.gz")]
        assert len(image) == 1 and f"{where} (case {case}) image: the header gives no voxel spacing" in image[0].what
        assert "give the spacing (prepare and check: --spacing SX,SY,SZ" in image[0].what
    with pytest.raises(InputError, match="spacing must be 3 positive numbers"):
        prepare(str(root), progress=False, spacing=(1.25, 1.25), **HEART)
    spacing = (1.25, 1.25, 1.37)
    prepare(str(root), progress=False, spacing=spacing, **HEART)
    labeled = load_datalist(root / "datalist.json")["labeled"][0]
    assert labeled["case_id"] == "la_000"
    item = load_volume_transforms("msd_heart", spacing=spacing)({k: labeled[k] for k in ("image", "label")})
    for key in ("image", "label"):
        np.testing.assert_allclose(item[key].pixdim.numpy(), spacing, rtol=1e-6)
    np.testing.assert_allclose(item["image"].affine.numpy(), item["label"].affine.numpy())
    with_spacing = load_volume_transforms("msd_heart", spacing=spacing)({"image": str(root / "imagesTr/la_001.nii.gz")})
    np.testing.assert_allclose(with_spacing["image"].pixdim.numpy(), [1.0, 1.0, 1.0])  # a header's spacing is kept


def test_a_qform_without_spacing_on_one_axis_is_refused_naming_the_axis(data):
    root = data("msd_heart")
    path = root / "imagesTr" / "la_002.nii.gz"
    array = np.asarray(nib.load(str(path)).dataobj)
    header = nib.Nifti1Header()
    header.set_data_shape(array.shape)
    header.set_data_dtype(array.dtype)
    header.set_qform(np.eye(4), code=1)
    header["pixdim"][1:4] = [1.0, 1.0, 0.0]
    header["vox_offset"] = 352
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + array.tobytes(order="F")))
    _fails(root, HEART, str(path), "the header gives axis 2 no spacing (pixdim [1.0, 1.0, 0.0], no sform)")


def test_unexpected_label_values(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_000.nii.gz"
    label, affine = _read_nifti(path)
    _nifti(path, (label * 2).astype(np.uint8), affine)
    _fails(root, HEART, str(path), "label values 2 (format msd_heart expects 0, 1)")


def test_la_values_in_uamt_file(data):
    root = data("uamt_h5")
    path = root / "case004" / "mri_norm2.h5"  # unlabeled: its ground truth is checked too
    with h5py.File(path, "r+") as f:
        f["label"][...] = f["label"][()] * 255
    _fails(root, UAMT, str(path), "(case case004) gt: label values 255")


def test_empty_label_in_labeled_set(data):
    root = data("msd_heart")
    path = root / "labelsTr" / "la_001.nii.gz"
    label, affine = _read_nifti(path)
    _nifti(path, np.zeros_like(label), affine)
    _fails(root, HEART, str(path), "labeled[1] (case la_001) label: empty label")


def test_nan_intensities(data):
    root = data("uamt_h5")
    path = root / "case002" / "mri_norm2.h5"
    with h5py.File(path, "r+") as f:
        image = f["image"][()]
        image[3, 4, 5], image[0, 0, 0] = np.nan, np.inf
        f["image"][...] = image
    _fails(root, UAMT, str(path), "(case case002) image: 2 NaN/inf intensities")


def test_2d_file(data):
    root = data("msd_heart")
    path = root / "imagesTr" / "la_002.nii.gz"
    _nifti(path, np.zeros((24, 24), np.float32))
    _fails(root, HEART, str(path), "(case la_002) image: 2D array of shape (24, 24), expected a 3D volume")


def test_4d_file_where_3d_expected(data):
    root = data("msd_heart")
    path = root / "imagesTr" / "la_000.nii.gz"
    image, affine = _read_nifti(path)
    _nifti(path, np.stack([image, image], axis=-1), affine)
    _fails(root, HEART, str(path), "(case la_000) image: 2 channels", "expected a 3D single-channel volume")


def test_prostate_images_of_t2_alone_are_accepted_other_channel_counts_refused(data):
    """MSD prostate images are T2 and ADC; the method reads T2 (channel 0) alone, so a 3D T2 volume will do."""
    root = data("msd_prostate")
    path = root / "imagesTr" / "prostate_01.nii.gz"
    image, affine = _read_nifti(path)
    _nifti(path, image[..., 0], affine)
    prepare(str(root), format="msd_prostate", labeled="prostate_00,prostate_01", progress=False)
    assert [it["case_id"] for it in load_datalist(root / "datalist.json")["labeled"]] == ["prostate_00", "prostate_01"]
    os.remove(root / "datalist.json")
    _nifti(path, np.concatenate([image, image[..., :1]], axis=-1), affine)
    _fails(
        root,
        {"format": "msd_prostate", "labeled": "prostate_00"},
        str(path),
        "3 channels (shape (3, 24, 24, 12)), expected 2 channels, or 1 (channel 0 alone",
    )


def test_zero_labeled(data):
    root = data("uamt_h5")
    _fails(root, {**UAMT, "num_labeled": 0}, "datalist: no labeled cases")


def test_zero_unlabeled(data):
    root = data("msd_heart")
    _fails(root, {**HEART, "labeled": "la_000,la_001,la_002"}, "datalist: no unlabeled cases")


def test_test_case_also_in_training(data):
    root = data("uamt_h5")
    _fails(root, {**UAMT, "test_list": None, "test": "case001"}, "case case001", "across splits", "test[0]")


def test_duplicate_within_split(data):
    root = data("msd_heart")
    expected = "labeled: case id 'la_000' given twice: positions 1 and 3"
    _fails(root, {**HEART, "labeled": "la_000,la_001,la_000"}, expected)


def test_path_outside_data_folder(data):
    root = data("uamt_h5")
    _fails(root, {**UAMT, "train_list": None, "num_labeled": None, "labeled": "case000,../evil"}, "outside the data")


def test_bad_selection_arguments(data):
    root = data("uamt_h5")
    _fails(root, {**UAMT, "num_labeled": None}, "num_labeled", "train_list needs num_labeled")
    _fails(root, {**UAMT, "train_list": "nope.list"}, "nope.list", "cannot read the case list")
    _fails(root, {"format": "dicom"}, "unknown data format 'dicom'")
