"""Fixtures of the MONAI Label tests: an app folder with the left-atrium bundle at CPU sizes, and a studies folder."""

import json

import nibabel as nib
import numpy as np
import pytest

#: a CPU-sized run: tiny network and slices (training and inference alike)
TINY_BUNDLE = {"features": [4, 8], "image_size": [32, 32], "progress": False, "num_workers": 0}


def study(folder, name, seed, labeled):
    """A synthetic study ``folder/<name>.nii.gz`` (and its final label under ``labels/final`` when ``labeled``); the
    label is always returned, as the ground truth of the study."""
    rng = np.random.default_rng(seed)
    shape, affine = (40, 36, 8), np.diag([0.8, 0.8, 2.5, 1.0])
    label = np.zeros(shape, np.uint8)
    label[10 + seed : 26, 8:24, 2:6] = 1
    image = rng.normal(size=shape).astype(np.float32) + 2.0 * label
    nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
    truth = nib.Nifti1Image(label, affine)
    if labeled:
        (folder / "labels" / "final").mkdir(parents=True, exist_ok=True)
        nib.save(truth, folder / "labels" / "final" / f"{name}.nii.gz")
    return truth


@pytest.fixture
def app(tmp_path, restore_sys_path):
    """An app folder with the LA bundle at test sizes, and a studies folder of 2 labeled and 3 unlabeled studies."""
    from monai_mlbseg.monailabel import write_app

    folder = write_app(tmp_path / "app")
    for config in ("train.json", "inference.json"):
        path = folder / "model" / "mlbseg_la" / "configs" / config
        path.write_text(json.dumps({**json.loads(path.read_text()), **TINY_BUNDLE}, indent=4))
    studies = tmp_path / "studies"
    studies.mkdir()
    truths = {f"s{i}": study(studies, f"s{i}", i, labeled=i < 2) for i in range(5)}
    return folder, studies, truths
