import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized, ScaleIntensityd

from monai_mlbseg.data.slices import SliceDataset
from monai_mlbseg.engines import bootstrap_labels, initial_label_items
from monai_mlbseg.inferers import SliceResizeInferer, minmax_slices
from monai_mlbseg.utils import digest_problem, recorded_source


def volume_items(n=2, shape=(10, 12, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    vols = {}
    items = []
    for i in range(n):
        image = torch.randn(1, *shape, generator=g) * 3 + 5
        label = (torch.rand(1, *shape, generator=g) > 0.7).float()
        vols[f"v{i}"] = {"image": image, "label": label}
        items.append({"case_id": f"v{i}", "image": i})  # in memory: not a file path
    return items, vols


def make_loader(vols):
    calls = {"n": 0}

    def load(item):
        calls["n"] += 1
        return {k: v.clone() for k, v in vols[item["case_id"]].items()}

    return load, calls


def test_slices_are_the_volume_slices_and_are_cached():
    items, vols = volume_items()
    load, calls = make_loader(vols)
    ds = SliceDataset(items, load, progress=False)
    assert len(ds) == 12 and calls["n"] == 2
    sample = ds[8]
    assert sample["case_id"] == "v1" and sample["slice_index"] == 2
    assert torch.equal(sample["image"], vols["v1"]["image"][..., 2])
    assert torch.equal(sample["label"], vols["v1"]["label"][..., 2]) and sample["label"].dtype == torch.float32
    assert ds.cache_bytes == 2 * 6 * 10 * 12 * (4 + 1), "images as float32, labels as uint8"
    for i in range(len(ds)):
        ds[i]
    assert calls["n"] == 2, "cached slices never reload a volume"


def test_slice_transform_is_cached_and_matches_the_inferer_preprocessing():
    items, vols = volume_items()
    load, _ = make_loader(vols)
    prep = Compose(
        [
            ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
            Resized(keys=["image", "label"], spatial_size=(16, 16), mode=("bilinear", "nearest")),
        ]
    )
    ds = SliceDataset(items, load, slice_transform=prep, progress=False)
    sample = ds[3]
    assert sample["image"].shape == (1, 16, 16) and set(sample["label"].unique().tolist()) <= {0.0, 1.0}
    assert sample["image"].min() >= 0 and sample["image"].max() <= 1  # min-max, then bilinear resizing

    seen = {}

    def spy(x):
        seen["x"] = x.clone()
        return torch.zeros(x.shape[0], 1, *x.shape[2:])

    SliceResizeInferer(roi_size=(16, 16), sw_batch_size=100)(vols["v0"]["image"][None], spy)
    assert torch.allclose(seen["x"][3], sample["image"], atol=1e-6), "training slices and inference slices agree"


def test_axis_and_random_transform():
    items, vols = volume_items(n=1)
    load, _ = make_loader(vols)
    flips = {"n": 0}

    def transform(sample):
        flips["n"] += 1
        return {**sample, "image": sample["image"].flip(-1)}

    ds = SliceDataset(items, load, transform=transform, axis=0, progress=False)
    assert len(ds) == 10
    assert torch.equal(ds[4]["image"], vols["v0"]["image"][:, 4].flip(-1))
    assert flips["n"] == 1


def test_cache_limit_falls_back_to_on_demand_loading(caplog):
    items, vols = volume_items(n=3)
    load, calls = make_loader(vols)
    cached = SliceDataset(items, load, progress=False)
    with caplog.at_level(logging.WARNING):
        bounded = SliceDataset(items, load, max_cache_bytes=800, progress=False)
        assert len(bounded) == len(cached)
    assert "falling back to loading volumes on demand" in caplog.text
    assert not bounded.cached and bounded.cache_bytes == 0 and len(bounded) == len(cached)
    before = calls["n"]
    for i in range(len(bounded)):
        a, b = bounded[i], cached[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert calls["n"] - before == 3, "on demand, each volume is loaded once per pass (slices visited in order)"


def test_inconsistent_volumes_are_reported_with_their_case():
    def load(item):
        return {"image": torch.zeros(1, 4, 4, 3), "label": torch.zeros(1, 4, 4, 2)}

    with pytest.raises(ValueError, match="case bad: 'label' has shape"):
        len(SliceDataset([{"case_id": "bad", "image": 0}], load, progress=False))

    def load2d(item):
        return {"image": torch.zeros(1, 4, 4)}

    with pytest.raises(ValueError, match="case flat: expected a channel-first 3D volume"):
        len(SliceDataset([{"case_id": "flat", "image": 0}], load2d, progress=False))


def test_labels_written_after_construction_and_indexing_are_picked_up(tmp_path):
    """A trainer is built (len) before the bootstrap writes the initial labels; the first item must see them."""
    affine = np.eye(4)
    items = []
    for i in range(2):
        nib.save(
            nib.Nifti1Image(np.random.default_rng(i).normal(size=(6, 5, 3)).astype(np.float32), affine),
            tmp_path / f"img{i}.nii.gz",
        )
        items.append(
            {"case_id": f"c{i}", "image": str(tmp_path / f"img{i}.nii.gz"), "label": str(tmp_path / f"lab{i}.nii.gz")}
        )
    keys = ["image", "label"]
    load = Compose(
        [
            LoadImaged(keys, image_only=True, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
        ]
    )
    ds = SliceDataset(items, load, progress=False)
    assert len(ds) == 6, "slices counted from the images alone"
    for i in range(2):
        nib.save(nib.Nifti1Image(np.full((6, 5, 3), i, dtype=np.uint8), affine), tmp_path / f"lab{i}.nii.gz")
    assert torch.all(ds[4]["label"] == 1) and ds[4]["case_id"] == "c1"
    assert ds.cache_bytes > 0


def test_inferer_matches_slice_by_slice_prediction():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 1, 3, padding=1)
    vol = torch.randn(2, 1, 20, 18, 5)
    out = SliceResizeInferer(roi_size=(12, 12), sw_batch_size=3)(vol, net)
    assert out.shape == (2, 1, 20, 18, 5)
    b, z = 1, 3
    x = minmax_slices(vol[b : b + 1, :, :, :, z])
    x = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    p = torch.nn.functional.interpolate(torch.sigmoid(net(x)), size=(20, 18), mode="bilinear", align_corners=False)
    assert torch.allclose(torch.sigmoid(out[b, :, :, :, z]), p[0], atol=1e-5)
    same_size = SliceResizeInferer(roi_size=(20, 18), normalize=False)(vol, net)
    assert torch.allclose(same_size[..., 1], net(vol[..., 1]), atol=1e-6)
    with pytest.raises(ValueError, match="X, Y, Z"):
        SliceResizeInferer()(torch.zeros(1, 1, 8, 8), net)


def test_minmax_slices_handles_constant_slices():
    x = torch.stack([torch.full((1, 4, 4), 7.0), torch.arange(16.0).view(1, 4, 4)])
    y = minmax_slices(x)
    assert torch.all(y[0] == 0) and y[1].min() == 0 and y[1].max() == 1


def test_bootstrap_writes_new_label_files_with_the_image_affine(tmp_path):
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [10, -5, 3]
    data = tmp_path / "data"
    data.mkdir()
    items = []
    for i in range(2):
        img = np.random.default_rng(i).normal(size=(12, 10, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, affine), data / f"img{i}.nii.gz")
        items.append({"case_id": f"case{i}", "image": str(data / f"img{i}.nii.gz")})
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    targets = initial_label_items(items, tmp_path / "initial")
    assert targets[0]["label"] == str(tmp_path / "initial" / "case0.nii.gz")
    load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])

    class Positive(torch.nn.Module):
        def forward(self, x):
            return x  # logit = normalised intensity: foreground where the slice is above its minimum

    out = bootstrap_labels(Positive(), SliceResizeInferer(roi_size=(8, 8)), targets, load, progress=False)
    assert out == targets
    written = nib.load(targets[0]["label"])
    assert written.shape == (12, 10, 4) and np.allclose(written.affine, affine)
    mask = np.asarray(written.dataobj)
    assert set(np.unique(mask)) <= {0, 1} and mask.mean() > 0.5
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before, "the input data are untouched"
    stamp = (tmp_path / "initial" / "case1.nii.gz").stat().st_mtime_ns
    bootstrap_labels(Positive(), SliceResizeInferer(roi_size=(8, 8)), targets, load, progress=False)
    assert (tmp_path / "initial" / "case1.nii.gz").stat().st_mtime_ns == stamp, "existing labels are kept"
    names = sorted(p.name for p in (tmp_path / "initial").iterdir())
    assert names == ["case0.nii.gz", "case0.nii.gz.sha256", "case1.nii.gz", "case1.nii.gz.sha256"]
    assert digest_problem(targets[0]["label"]) is None, "each label's digest is recorded next to it"


def test_bootstrap_writes_again_a_damaged_label_and_one_made_from_another_image(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    items = []
    for i in range(3):
        img = np.random.default_rng(i).normal(size=(12, 10, 4)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.eye(4)), data / f"img{i}.nii.gz")
        items.append({"case_id": f"case{i}", "image": str(data / f"img{i}.nii.gz")})
    targets = initial_label_items(items, tmp_path / "initial")
    load = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image")])
    versions = {item["image"]: "v1" for item in items}
    network, inferer = torch.nn.Identity(), SliceResizeInferer(roi_size=(8, 8))
    bootstrap_labels(network, inferer, targets, load, progress=False, source_digest=versions.get)
    assert all(recorded_source(t["label"]) == "v1" for t in targets)
    stamps = [Path(t["label"]).stat().st_mtime_ns for t in targets]

    damaged = Path(targets[0]["label"])
    damaged.write_bytes(damaged.read_bytes()[:40])  # truncated
    versions[items[1]["image"]] = "v2"  # the image was replaced since its label was made
    with caplog.at_level(logging.WARNING):
        bootstrap_labels(network, inferer, targets, load, progress=False, source_digest=versions.get)
    assert f"initial label {targets[0]['label']}: its content does not match" in caplog.text
    assert (
        f"initial label {targets[1]['label']}: it was made from another version of {items[1]['image']}" in caplog.text
    )
    assert targets[2]["label"] not in caplog.text
    assert nib.load(damaged).shape == (12, 10, 4) and digest_problem(damaged) is None
    assert recorded_source(targets[1]["label"]) == "v2"
    assert Path(targets[2]["label"]).stat().st_mtime_ns == stamps[2], "an intact, current label is kept"


def test_initial_label_items_moves_ground_truth_and_rejects_duplicates(tmp_path):
    items = [{"case_id": "a", "image": "a.h5", "label": "a.h5"}]
    out = initial_label_items(items, tmp_path)
    assert out[0]["gt"] == "a.h5" and out[0]["label"].endswith("a.nii.gz") and items[0]["label"] == "a.h5"
    with pytest.raises(ValueError, match="duplicate case_id"):
        initial_label_items(items * 2, tmp_path)
    with pytest.raises(ValueError, match="without a case_id"):
        initial_label_items([{"image": "x"}], tmp_path)


def test_bootstrap_keeps_metatensor_affine_for_in_memory_loaders(tmp_path):
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0], dtype=torch.float64))

    def load(item):
        return {"image": MetaTensor(torch.rand(1, 8, 8, 3), affine=affine)}

    items = initial_label_items([{"case_id": "m", "image": "m"}], tmp_path)
    bootstrap_labels(torch.nn.Identity(), SliceResizeInferer(roi_size=(8, 8)), items, load, progress=False)
    assert np.allclose(nib.load(items[0]["label"]).affine, affine.numpy())


def test_bootstrap_postprocess_keeps_the_largest_component(tmp_path):
    """``postprocess`` acts on the thresholded mask before it is written; the raw labels stay the default."""
    from monai.transforms import KeepLargestConnectedComponent

    image = torch.full((1, 12, 12, 4), -1.0)
    image[:, 1:7, 1:7, :] = 1.0  # a 6x6x4 body
    image[:, 9:11, 9:11, 1:3] = 1.0  # a detached 2x2x2 blob

    def load(item):
        return {"image": MetaTensor(image.clone())}

    class Sign(torch.nn.Module):
        def forward(self, x):
            return 10 * (x - 0.5)  # SliceResizeInferer min-max scales each slice to [0, 1]

    inferer = SliceResizeInferer(roi_size=(12, 12))
    raw = initial_label_items([{"case_id": "r", "image": "r"}], tmp_path / "raw")
    bootstrap_labels(Sign(), inferer, raw, load, progress=False)
    lcc = initial_label_items([{"case_id": "r", "image": "r"}], tmp_path / "lcc")
    bootstrap_labels(Sign(), inferer, lcc, load, progress=False, postprocess=KeepLargestConnectedComponent())
    mask_raw = np.asarray(nib.load(raw[0]["label"]).dataobj)
    mask_lcc = np.asarray(nib.load(lcc[0]["label"]).dataobj)
    assert mask_raw.sum() == 6 * 6 * 4 + 2 * 2 * 2 and mask_raw[9:11, 9:11, 1:3].all()
    assert mask_lcc.sum() == 6 * 6 * 4 and mask_lcc[1:7, 1:7].all() and mask_lcc.dtype == np.uint8


class _Constant(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x[:, :1])


class _Position(torch.nn.Module):
    """A prediction tied to the absolute column: a zoom or a flip moves the image, not the prediction."""

    def forward(self, x):
        return torch.linspace(-3, 3, x.shape[-1]).expand_as(x[:, :1]).clone()


def test_ple_disagreement_is_zero_when_the_views_agree_and_grows_when_they_do_not():
    from monai_mlbseg.inferers import ple_disagreement
    from monai_mlbseg.transforms import PLEViews

    volume = torch.rand(1, 40, 36, 8, generator=torch.Generator().manual_seed(0))
    inferer = SliceResizeInferer(roi_size=(32, 32))
    assert ple_disagreement(_Constant(), volume, inferer) < 1e-6, "identical views (the cropped border not counted)"
    moved = ple_disagreement(_Position(), volume, inferer)
    assert moved > 0.1
    # independent computation: with zooms of about 1, only the flip view (of the columns) differs, and the std of
    # 4 equal values a and one b is |a - b| / sqrt(5); the zoom-in still crops the outermost column on either side,
    # which is not counted
    views = PLEViews(2, zoom_in_range=(1.0001, 1.0002), zoom_out_range=(0.9998, 0.9999), flip_axes=[1])
    probs = torch.sigmoid(torch.linspace(-3, 3, 32))
    expected = float((probs - probs.flip(0)).abs()[1:-1].mean()) / 5**0.5
    assert ple_disagreement(_Position(), volume, inferer, views=views) == pytest.approx(expected, rel=1e-3)
    assert ple_disagreement(_Position(), volume, inferer) == moved, "seeded views: the score repeats"
