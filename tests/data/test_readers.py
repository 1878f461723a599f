"""H5ImageReader: round trips through LoadImaged, meta data, reader lists, errors; NiftiReader: a spacing for NIfTI
headers that give none."""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import is_no_channel
from monai.transforms import Compose, EnsureChannelFirstd, LoadImage, LoadImaged

from monai_mlbseg.data import H5ImageReader, NiftiReader, write_case
from monai_mlbseg.data.readers import nifti_header, unspaced_axes
from tests.nifti_headers import write_without_spacing

# ITK (SWIG) warns on import under Python 3.11+
pytestmark = pytest.mark.filterwarnings("ignore:builtin type [Ss]wig:DeprecationWarning")


def _h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return str(path)


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(10, 9, 6)).astype(np.float32)
    label = (rng.uniform(size=(10, 9, 6)) > 0.7).astype(np.uint8)
    return image, label


def test_loadimaged_round_trip_and_meta(tmp_path, arrays):
    image, label = arrays
    path = _h5(tmp_path / "mri_norm2.h5", image=image, label=label)
    load = Compose(
        [
            LoadImaged(keys="image", reader=H5ImageReader(dataset="image")),
            LoadImaged(keys="label", reader=H5ImageReader(dataset="label", spacing=(0.5, 0.6, 2.0))),
            EnsureChannelFirstd(keys=["image", "label"]),
        ]
    )
    out = load({"image": path, "label": path})
    img, lab = out["image"], out["label"]
    assert isinstance(img, MetaTensor) and isinstance(lab, MetaTensor)
    assert img.shape == (1, 10, 9, 6) and lab.shape == (1, 10, 9, 6)
    np.testing.assert_array_equal(img[0].numpy(), image)
    np.testing.assert_array_equal(lab[0].numpy(), label)
    assert img.dtype == torch.float32
    np.testing.assert_allclose(img.affine.numpy(), np.eye(4))
    np.testing.assert_allclose(lab.affine.numpy(), np.diag([0.5, 0.6, 2.0, 1.0]))
    np.testing.assert_allclose(lab.meta["original_affine"], np.diag([0.5, 0.6, 2.0, 1.0]))
    np.testing.assert_array_equal(np.asarray(img.meta["spatial_shape"]), [10, 9, 6])
    assert img.meta["filename_or_obj"] == path
    assert is_no_channel(img.meta["original_channel_dim"])  # MONAI's "no_channel" (nan, as its own readers)
    np.testing.assert_allclose(lab.pixdim.numpy(), [0.5, 0.6, 2.0])


def test_reader_list_picks_reader_by_file(tmp_path, arrays):
    image, label = arrays
    h5 = _h5(tmp_path / "a.h5", image=image, label=label)
    nii = tmp_path / "b.nii.gz"
    nib.save(nib.Nifti1Image(label * 3, np.diag([2.0, 2.0, 3.0, 1.0])), str(nii))
    entry = write_case(tmp_path / "raw", "c", image, label, "la_raw", spacing=(1.5, 1.5, 2.5))
    nrrd = tmp_path / "raw" / entry["label"]
    load = LoadImaged(keys="label", reader=[H5ImageReader(dataset="label"), "ITKReader", "NibabelReader"])
    from_h5 = load({"label": h5})["label"]
    np.testing.assert_array_equal(from_h5.numpy(), label)  # the label dataset, not the image
    np.testing.assert_allclose(from_h5.affine.numpy(), np.eye(4))
    from_nii = load({"label": str(nii)})["label"]
    np.testing.assert_array_equal(from_nii.numpy(), label * 3)
    np.testing.assert_allclose(from_nii.pixdim.numpy(), [2.0, 2.0, 3.0])
    from_nrrd = load({"label": str(nrrd)})["label"]
    np.testing.assert_array_equal(from_nrrd.numpy(), label * 255)  # ITK: x, y, z order as written
    np.testing.assert_allclose(from_nrrd.pixdim.numpy(), [1.5, 1.5, 2.5])
    # MONAI tries a user reader list from last to first; with the HDF5 reader tried first, the others still get
    # their files because H5ImageReader.read refuses non-HDF5 files
    reverse = LoadImaged(keys="label", reader=["NibabelReader", "ITKReader", H5ImageReader(dataset="label")])
    np.testing.assert_array_equal(reverse({"label": h5})["label"].numpy(), label)
    np.testing.assert_array_equal(reverse({"label": str(nii)})["label"].numpy(), label * 3)
    np.testing.assert_array_equal(reverse({"label": str(nrrd)})["label"].numpy(), label * 255)


def test_verify_suffix():
    r = H5ImageReader()
    assert r.verify_suffix("a/b/mri_norm2.h5") and r.verify_suffix("x.hdf5") and r.verify_suffix(["a.h5", "b.h5"])
    assert not r.verify_suffix("x.nii.gz") and not r.verify_suffix(["a.h5", "b.nrrd"])


def test_missing_dataset_names_file_and_key(tmp_path, arrays):
    path = _h5(tmp_path / "case1.h5", image=arrays[0])
    with pytest.raises(ValueError, match=r"case1\.h5.*no dataset 'label'.*found: image"):
        LoadImage(image_only=True)(path, reader=H5ImageReader(dataset="label"))
    # inside LoadImaged (which would fall back to its other readers) the message still names file and key
    with pytest.raises(ValueError, match=r"case1\.h5.*no dataset 'label'"):
        LoadImaged(keys="label", reader=H5ImageReader(dataset="label"))({"label": path})
    with pytest.raises(ValueError, match=r"case1\.h5.*no dataset 'label'"):
        LoadImaged(keys="label", reader=[H5ImageReader(dataset="label"), "ITKReader", "NibabelReader"])({"label": path})
    truncated = tmp_path / "trunc.h5"
    truncated.write_bytes((tmp_path / "case1.h5").read_bytes()[:2500])
    with pytest.raises(ValueError, match=r"trunc\.h5.*'image'"):
        LoadImage(image_only=True)(str(truncated), reader=H5ImageReader(dataset="image"))


def test_not_hdf5_and_missing_file(tmp_path):
    bad = tmp_path / "fake.h5"
    bad.write_bytes(b"not an hdf5 file at all")
    with pytest.raises(ValueError, match=r"fake\.h5: not an HDF5 file"):
        H5ImageReader().read(str(bad))
    with pytest.raises(FileNotFoundError, match=r"nope\.h5"):
        H5ImageReader().read(str(tmp_path / "nope.h5"))
    with pytest.raises(ValueError, match="spacing"):
        H5ImageReader(spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="dataset"):
        H5ImageReader(dataset="")


def test_channel_dim_and_stacking(tmp_path, arrays):
    image = arrays[0]
    p1 = _h5(tmp_path / "a.h5", image=image)
    p2 = _h5(tmp_path / "b.h5", image=image * 2)
    stacked = LoadImage(image_only=True, reader=H5ImageReader())([p1, p2])
    assert stacked.shape == (2, 10, 9, 6)
    np.testing.assert_array_equal(stacked[1].numpy(), image * 2)
    multi = _h5(tmp_path / "m.h5", image=np.stack([image, -image], axis=-1))
    out = LoadImage(image_only=True, ensure_channel_first=True, reader=H5ImageReader(channel_dim=-1))(multi)
    assert out.shape == (2, 10, 9, 6)
    np.testing.assert_array_equal(out[1].numpy(), -image)
    with pytest.raises(ValueError, match="spacing"):
        H5ImageReader(spacing=(1.0, 1.0)).get_data(image)


def test_nifti_reader_gives_a_header_without_spacing_the_given_spacing(tmp_path, arrays):
    image, _ = arrays
    path = tmp_path / "no_spacing.nii.gz"
    write_without_spacing(path, image)
    assert unspaced_axes(nifti_header(path)) == (0, 1, 2)
    guessed = LoadImage(image_only=True)(str(path), reader=NiftiReader())
    np.testing.assert_allclose(guessed.pixdim.numpy(), [1.0, 1.0, 1.0])  # nibabel's guess, as MONAI's own reader
    spaced = LoadImage(image_only=True)(str(path), reader=NiftiReader(spacing=(0.5, 0.6, 2.0)))
    np.testing.assert_allclose(spaced.pixdim.numpy(), [0.5, 0.6, 2.0])
    np.testing.assert_allclose(np.abs(np.diag(spaced.affine.numpy())), [0.5, 0.6, 2.0, 1.0])
    np.testing.assert_array_equal(spaced.numpy(), image)
    with pytest.raises(ValueError, match="spacing must be positive numbers"):
        NiftiReader(spacing=(1.0, -1.0, 1.0))


def test_nifti_reader_keeps_the_spacing_a_header_gives(tmp_path, arrays):
    image, _ = arrays
    path = tmp_path / "spaced.nii"
    nib.save(nib.Nifti1Image(image, np.diag([0.7, 0.8, 2.5, 1.0])), str(path))
    assert unspaced_axes(nifti_header(path)) == ()
    img = LoadImage(image_only=True)(str(path), reader=NiftiReader(spacing=(0.5, 0.6, 2.0)))
    np.testing.assert_allclose(img.affine.numpy(), np.diag([0.7, 0.8, 2.5, 1.0]), rtol=1e-6)
