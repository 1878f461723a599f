"""The bundles inside MONAI Label (monailabel 0.8.5): inference and training tasks as MONAI Label runs them."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from monai_mlbseg.networks import NestedUNet
from tests.bundle_utils import copy_bundle, run_folders

if os.environ.get("MLBSEG_REQUIRE_MONAILABEL") != "1":
    pytest.importorskip("monailabel", reason="monailabel is not installed (.ci/run installs it)")


def bundle_infer_task():
    """monailabel's BundleInferTask class (imported with a torchvision stand-in where none works with this torch)."""
    from monai_mlbseg.monailabel import import_without_torchvision

    return import_without_torchvision("monailabel.tasks.infer.bundle", "BundleInferTask")


def write_pairs(folder, n=3, shape=(40, 36, 8)):
    rng = np.random.default_rng(0)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    pairs = []
    for i in range(n):
        label = np.zeros(shape, np.uint8)
        label[10 + i : 26, 8:24, 2:6] = 1
        image = rng.normal(size=shape).astype(np.float32) + 2.0 * label
        nib.save(nib.Nifti1Image(image, affine), folder / f"img{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"lab{i}.nii.gz")
        pairs.append({"image": str(folder / f"img{i}.nii.gz"), "label": str(folder / f"lab{i}.nii.gz")})
    return pairs


@pytest.mark.parametrize("name", ["mlbseg_la", "mlbseg_prostate"])
def test_bundle_infer_task_writes_a_mask(name, tmp_path, restore_sys_path):
    bundle = copy_bundle(name, tmp_path)
    (bundle / "models").mkdir()
    torch.manual_seed(0)
    torch.save(NestedUNet(2).state_dict(), bundle / "models" / "model.pt")  # the bundle's reference network
    pairs = write_pairs(tmp_path, n=1)
    task = bundle_infer_task()(str(bundle), conf={}, load_strict=True)
    assert task.is_valid()
    label_file, result = task({"image": pairs[0]["image"], "device": "cpu", "result_dtype": "uint8"})
    try:
        mask = nib.load(label_file)
        assert mask.shape == (40, 36, 8)
        assert np.allclose(mask.affine, nib.load(pairs[0]["image"]).affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
        expected = json.loads((bundle / "configs" / "metadata.json").read_text())
        label_name = expected["network_data_format"]["outputs"]["pred"]["channel_def"]["1"]
        assert result["label_names"] == {label_name: 1}
    finally:
        os.remove(label_file)


def test_bundle_train_task_trains_from_labeled_pairs_only(tmp_path, restore_sys_path):
    from monailabel.tasks.train.bundle import BundleTrainTask

    bundle = copy_bundle("mlbseg_prostate", tmp_path)
    config = json.loads((bundle / "configs" / "train.json").read_text())
    config.update(features=[4, 8], image_size=[32, 32])  # a CPU-sized network for the test
    (bundle / "configs" / "train.json").write_text(json.dumps(config, indent=4))
    pairs = write_pairs(tmp_path, n=3)

    class Datastore:
        def datalist(self):
            return pairs

    (bundle / "models").mkdir()
    torch.save(NestedUNet(2, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    before = torch.load(bundle / "models" / "model.pt", weights_only=True)
    task = BundleTrainTask(str(bundle), conf={})
    assert task.is_valid()
    task({"model": "mlbseg_prostate", "max_epochs": 1, "val_split": -1, "device": "cpu"}, Datastore())
    after = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert after.keys() == before.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before), "training updated the weights"
    run = run_folders(bundle)[0]
    final = [p.name for p in (run / "stage2").glob("*final*.pt")]
    assert final, "the trainer ran to completion and saved its final checkpoint"
    checkpoint = torch.load(run / "stage2" / final[0], weights_only=True)
    # one epoch over the clean slices: 3 volumes x 8 slices in batches of 2 (supervised, no unlabeled data)
    assert checkpoint["trainer"]["iteration"] == 12 and checkpoint["trainer"]["epoch_length"] == 12


def test_bundle_infer_task_with_the_3d_configuration(tmp_path, restore_sys_path):
    """MONAI Label reads one inference config: a copy of the LA bundle gets inference.json merged with
    inference_3d.json (the recipe of the bundle's README), and infers with the 3D network in sliding windows."""
    from monai.bundle import ConfigParser

    bundle = copy_bundle("mlbseg_la", tmp_path)
    configs = bundle / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "inference_3d.json")])
    merged = {k: v for k, v in parser.get().items() if k != "_meta_"}
    merged.update(features=[4, 8], patch_size=[16, 16, 8])  # a CPU-sized network for the test
    ConfigParser.export_config_file(merged, str(configs / "inference.json"), indent=4)
    (bundle / "models").mkdir()
    torch.save(NestedUNet(3, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    pairs = write_pairs(tmp_path, n=1, shape=(40, 36, 12))
    task = bundle_infer_task()(str(bundle), conf={}, load_strict=True)
    assert task.is_valid()
    label_file, _ = task({"image": pairs[0]["image"], "device": "cpu", "result_dtype": "uint8"})
    try:
        mask = nib.load(label_file)
        assert mask.shape == (40, 36, 12)
        assert np.allclose(mask.affine, nib.load(pairs[0]["image"]).affine, atol=1e-4)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    finally:
        os.remove(label_file)
