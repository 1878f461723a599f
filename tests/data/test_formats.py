"""Formats: every writer's output reads back through load_volume_transforms; discovery of each layout."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_mlbseg.data import FORMATS, get_format, load_volume_transforms, synthetic_case, write_case
from monai_mlbseg.utils.io import TEMP_MARKER

# ITK (SWIG) warns on import under Python 3.11+
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")

SHAPE = (24, 20, 12)
SPACING = (0.7, 0.8, 2.5)


def _case(seed=0, kind="la"):
    return synthetic_case(np.random.default_rng(seed), shape=SHAPE, kind=kind)


def _abs(root, entry):
    return {k: (str(root / v) if k in ("image", "label", "gt") else v) for k, v in entry.items()}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_write_and_load_round_trip(tmp_path, fmt):
    spec = get_format(fmt)
    image, label = _case(kind=spec.anatomy)
    entry = write_case(tmp_path, "c01", image, label, fmt, spacing=SPACING)
    assert entry["case_id"] == "c01" and entry["image"] == spec.image_path("c01", True)
    assert entry["label"] == spec.label_path("c01")
    out = load_volume_transforms(fmt)(_abs(tmp_path, entry))
    img, lab = out["image"], out["label"]
    assert isinstance(img, MetaTensor) and isinstance(lab, MetaTensor)
    assert img.dtype == torch.float32 and lab.dtype == torch.float32
    assert img.shape == (1, *SHAPE) and lab.shape == (1, *SHAPE)
    np.testing.assert_allclose(img[0].numpy(), image, rtol=1e-6, atol=1e-6)  # on-disk axis order kept
    np.testing.assert_array_equal(lab[0].numpy(), label.astype(np.float32))
    expected_spacing = [1.0, 1.0, 1.0] if fmt == "uamt_h5" else list(SPACING)  # HDF5 stores no geometry
    np.testing.assert_allclose(img.pixdim.numpy(), expected_spacing, rtol=1e-6)
    np.testing.assert_allclose(img.affine.numpy(), lab.affine.numpy())
    assert str(out["image"].meta["filename_or_obj"]).endswith(entry["image"])
    # nothing but the final files is left in the folder
    assert not [p for p in tmp_path.rglob("*") if TEMP_MARKER in p.name]
    found = spec.discover(tmp_path)
    assert found == {"c01": (entry["image"], entry["label"])}


def test_la_raw_labels_are_255_on_disk(tmp_path):
    image, label = _case()
    entry = write_case(tmp_path, "c", image, label, "la_raw")
    raw = load_volume_transforms("la_raw", binarize=False)(_abs(tmp_path, entry))["label"]
    assert set(torch.unique(raw).tolist()) == {0.0, 255.0}
    out = load_volume_transforms("la_raw")(_abs(tmp_path, entry))["label"]
    assert set(torch.unique(out).tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(out[0].numpy(), label)


def test_msd_prostate_channel_zero_and_whole_gland(tmp_path):
    image, label = _case(kind="prostate")
    entry = write_case(tmp_path, "prostate_00", image, label, "msd_prostate", spacing=SPACING)
    stored = nib.load(str(tmp_path / entry["image"]))
    assert stored.shape == (*SHAPE, 2)  # x, y, z, (T2, ADC)
    adc = np.asarray(stored.dataobj)[..., 1]
    assert not np.allclose(adc, image) and abs(np.corrcoef(adc.ravel(), image.ravel())[0, 1]) < 0.99
    zones = np.asarray(nib.load(str(tmp_path / entry["label"])).dataobj)
    assert set(np.unique(zones).tolist()) == {0, 1, 2}
    np.testing.assert_array_equal(zones > 0, label > 0)
    out = load_volume_transforms("msd_prostate")(_abs(tmp_path, entry))
    np.testing.assert_allclose(out["image"][0].numpy(), image, atol=1e-6)
    np.testing.assert_array_equal(out["label"][0].numpy(), (zones > 0).astype(np.float32))


def test_msd_prostate_t2_alone_loads_as_channel_zero_of_t2_and_adc(tmp_path):
    """A 3D T2-only image (PROMISE12-style) loads as the same [1, *S] T2 array as the 4D T2+ADC image."""
    image, label = _case(kind="prostate")
    both = _abs(tmp_path, write_case(tmp_path, "prostate_00", image, label, "msd_prostate", spacing=SPACING))
    stored = nib.load(both["image"])
    t2_only = str(tmp_path / "imagesTr" / "prostate_01.nii.gz")
    nib.save(nib.Nifti1Image(np.asarray(stored.dataobj)[..., 0], stored.affine), t2_only)
    assert nib.load(t2_only).shape == SHAPE
    load = load_volume_transforms("msd_prostate")
    from_both, from_t2 = load(both), load({**both, "image": t2_only})
    assert from_both["image"].shape == from_t2["image"].shape == (1, *SHAPE)
    np.testing.assert_array_equal(from_t2["image"].numpy(), from_both["image"].numpy())
    np.testing.assert_allclose(from_t2["image"][0].numpy(), image, atol=1e-6)
    np.testing.assert_allclose(from_t2["image"].affine.numpy(), from_both["image"].affine.numpy())


def test_promise12_mhd_raw_pair(tmp_path):
    image, label = _case(kind="prostate")
    write_case(tmp_path, "Case07", image, label, "promise12")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["Case07.mhd", "Case07.raw", "Case07_segmentation.mhd", "Case07_segmentation.raw"]
    header = (tmp_path / "Case07.mhd").read_text()
    assert "ElementDataFile = Case07.raw" in header


def test_unlabeled_items_and_extra_keys(tmp_path):
    image, label = _case(seed=3)
    unlabeled = write_case(tmp_path, "u1", image, None, "msd_heart")
    assert unlabeled == {"case_id": "u1", "image": "imagesTs/u1.nii.gz"}
    out = load_volume_transforms("msd_heart", keys=("image", "label", "gt"))(_abs(tmp_path, unlabeled))
    assert set(out) == {"case_id", "image"} and out["image"].shape == (1, *SHAPE)
    labeled = write_case(tmp_path, "l1", image, label, "msd_heart")
    item = {"image": labeled["image"], "gt": labeled["label"]}
    out = load_volume_transforms("msd_heart", keys=("image", "label", "gt"))(_abs(tmp_path, item))
    np.testing.assert_array_equal(out["gt"][0].numpy(), label)
    assert get_format("msd_heart").discover(tmp_path) == {
        "l1": ("imagesTr/l1.nii.gz", "labelsTr/l1.nii.gz"),
        "u1": ("imagesTs/u1.nii.gz", None),
    }


def test_uamt_unlabeled_file_and_spacing(tmp_path):
    image, label = _case()
    entry = write_case(tmp_path, "x", image, None, "uamt_h5")
    assert get_format("uamt_h5").discover(tmp_path) == {"x": ("x/mri_norm2.h5", None)}
    out = load_volume_transforms("uamt_h5", spacing=(0.625, 0.625, 0.625))(_abs(tmp_path, entry))
    np.testing.assert_allclose(out["image"].pixdim.numpy(), [0.625] * 3)


@pytest.mark.parametrize(
    "fmt, spacing, message",
    [
        ("promise12", (1.0, 1.0, 1.0), "'promise12' reads files that always store their spacing"),
        ("la_raw", (1.0, 1.0, 1.0), "'la_raw' reads files that always store their spacing"),
        ("msd_heart", (1.0, 1.0), "spacing must be 3 positive numbers"),
        ("uamt_h5", (1.0, 0.0, 1.0), "spacing must be positive numbers"),
        ("msd_heart", "1.25 1.25 1.5", "spacing must be 3 positive numbers"),
    ],
)
def test_a_spacing_the_files_cannot_take_is_refused(fmt, spacing, message):
    with pytest.raises(ValueError, match=message):
        load_volume_transforms(fmt, spacing=spacing)


def test_discovery_skips_hidden_and_partial_files(tmp_path):
    image, label = _case()
    write_case(tmp_path, "la_003", image, label, "msd_heart")
    (tmp_path / "imagesTr" / "._la_003.nii.gz").write_bytes(b"AppleDouble junk")
    (tmp_path / "imagesTr" / f".abc{TEMP_MARKER}la_009.nii.gz").write_bytes(b"half written")
    assert list(get_format("msd_heart").discover(tmp_path)) == ["la_003"]
    write_case(tmp_path / "p", "Case01", image, label, "promise12")
    assert get_format("promise12").discover(tmp_path / "p") == {"Case01": ("Case01.mhd", "Case01_segmentation.mhd")}
    write_case(tmp_path / "r", "a", image, None, "la_raw")
    assert get_format("la_raw").discover(tmp_path / "r") == {"a": ("a/lgemri.nrrd", None)}


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data format 'nope'.*uamt_h5"):
        get_format("nope")
    with pytest.raises(ValueError, match="keys"):
        load_volume_transforms("uamt_h5", keys=())
    with pytest.raises(FileNotFoundError, match="missing"):
        get_format("uamt_h5").discover(tmp_path / "missing")
    image, label = _case()
    with pytest.raises(ValueError, match="3D"):
        write_case(tmp_path, "a", image[..., 0], None, "uamt_h5")
    with pytest.raises(ValueError, match="label shape"):
        write_case(tmp_path, "a", image, label[:-1], "uamt_h5")
    with pytest.raises(ValueError, match="spacing"):
        write_case(tmp_path, "a", image, label, "msd_heart", spacing=(1.0, -1.0, 1.0))


def test_a_new_layout_is_one_volume_format(tmp_path):
    """Reading, discovering and writing a layout all come from its VolumeFormat: no branch on the format name."""
    import dataclasses

    from monai_mlbseg.data import make_synthetic_dataset

    written = []

    def write_fn(case):
        written.append((case.image_path.relative_to(tmp_path).as_posix(), case.case_id, case.image.shape, case.spacing))
        FORMATS["msd_heart"].write_fn(case)

    custom = dataclasses.replace(
        FORMATS["msd_heart"], name="my_heart", write_fn=write_fn, default_case_id=lambda i: f"h{i}", case_lists=True
    )
    ids = make_synthetic_dataset(tmp_path, custom, num_cases=2, shape=SHAPE, spacing=SPACING)
    assert ids == ["h0", "h1"]
    assert written == [(f"imagesTr/h{i}.nii.gz", f"h{i}", SHAPE, SPACING) for i in range(2)]
    assert (tmp_path / "train.list").read_text() == "h0\nh1\n" and (tmp_path / "test.list").is_file()
    assert list(custom.discover(tmp_path)) == ids
    assert {name for name, spec in FORMATS.items() if spec.case_lists} == {"uamt_h5", "la_raw"}
