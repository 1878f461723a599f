"""The 3D left-atrium configuration (configs/3d.json, configs/inference_3d.json) through MONAI's bundle machinery."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser, verify_net_in_out

from monai_mlbseg.data import build_datalist, make_synthetic_dataset
from monai_mlbseg.inferers import MinMaxSlidingWindowInferer
from monai_mlbseg.networks import NestedUNet
from tests.bundle_utils import BUNDLES, REPO, TINY, copy_bundle, make_data, run_folders, workflow

LA = BUNDLES["mlbseg_la"]
TRAIN_3D = ["train.json", "3d.json"]
INFER_3D = ["inference.json", "inference_3d.json"]
#: CPU sizes of the 3D variant: a tiny 3D network on 16x16x8 patches, two iterations per stage
TINY_3D = {**TINY, "features": [4, 8], "patch_size": [16, 16, 8], "sw_batch_size": 2}
TINY_3D_TRAIN = {
    "stage1#max_epochs": 1,
    "stage1#trainer#epoch_length": 2,
    "train#trainer#max_epochs": 1,
    "train#trainer#epoch_length": 2,
}


def parsed(configs, *ids, **override):
    parser = ConfigParser()
    parser.read_config([str(LA / "configs" / c) for c in configs])
    for key, value in override.items():
        parser[key] = value
    return [parser.get_parsed_content(i) for i in ids]


def test_training_and_inference_share_the_3d_network_and_inferer():
    train = json.loads((LA / "configs" / "3d.json").read_text())
    infer = json.loads((LA / "configs" / "inference_3d.json").read_text())
    assert infer == {k: train[k] for k in infer}, "inference_3d.json repeats 3d.json's network and inferer"
    network_def, inferer, views = parsed(TRAIN_3D, "network_def", "inferer", "train#trainer#views")
    assert network_def.spatial_dims == 3 and network_def.features == (16, 32, 64, 128, 256) and views.spatial_dims == 3
    assert isinstance(inferer, MinMaxSlidingWindowInferer)
    assert tuple(inferer.roi_size) == (112, 112, 80) and inferer.overlap == 0.5 and inferer.mode == "gaussian"
    batch, clean, unlabeled = parsed(
        TRAIN_3D, "stage1#batch_size", "train#dataloader#batch_size", "train#unlabeled#dataloader#batch_size"
    )
    assert (batch, clean, unlabeled) == (2, 2, 2), "2 labeled + 2 unlabeled patches per iteration"


def test_check_properties_and_verify_net_in_out_of_the_3d_configuration(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    over = {"bundle_root": str(bundle), "dataset_dir": str(data), "split": split, **TINY_3D}
    assert workflow(bundle, TRAIN_3D, "train", **over).check_properties() == []
    (bundle / "models").mkdir(exist_ok=True)
    torch.save(NestedUNet(3, features=(4, 8)).state_dict(), bundle / "models" / "model.pt")
    assert workflow(bundle, INFER_3D, "infer", **over).check_properties() == []
    evaluate = ["inference.json", "evaluate.json", "inference_3d.json"]
    assert workflow(bundle, evaluate, "infer", **over).check_properties() == []
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(LA / "configs" / "metadata.json"),
        config_file=[str(LA / "configs" / c) for c in INFER_3D],
        device="cpu",
        n=1,
        bundle_root=str(LA),
        **{"_meta_#network_data_format#inputs#image#spatial_shape": ["16*n", "16*n", "16*n"]},
    )


def test_3d_bundle_trains_end_to_end_and_infers_with_the_sliding_window(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data = tmp_path / "heart"
    ids = [f"la_{i:03d}" for i in range(3, 9)]
    make_synthetic_dataset(data, "msd_heart", num_cases=len(ids), shape=(40, 36, 12), seed=1, case_ids=ids)
    split = {"labeled": ids[:2], "test": ids[-1:]}  # three unlabeled volumes: batches of 2 and 1
    over = {"bundle_root": bundle, "dataset_dir": data, "data_format": "msd_heart", "split": split, **TINY_3D}
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training"]
    cmd += ["--config_file", str([str(bundle / "configs" / c) for c in TRAIN_3D])]
    cmd += ["--meta_file", str(bundle / "configs" / "metadata.json")]
    for key, value in {**over, **TINY_3D_TRAIN}.items():
        cmd += [f"--{key}", str(value)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    NestedUNet(3, features=(4, 8)).load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    run = run_folders(bundle)[0]
    assert (run / "stage1.pt").is_file(), "stage 1 ran on 3D patches"
    initial = sorted(p.name for p in (run / "initial_labels").glob("*.nii.gz"))
    assert len(initial) == 3, "one initial label per unlabeled case"
    final = [p.name for p in (run / "stage2").iterdir()]
    assert any("final_iteration=2" in p for p in final), final
    label = nib.load(run / "initial_labels" / initial[0])
    assert label.ndim == 3, "the bootstrap wrote whole 3D volumes"

    wf = workflow(bundle, INFER_3D, "infer", **{k: str(v) if k == "bundle_root" else v for k, v in over.items()})
    assert isinstance(wf.parser.get_parsed_content("inferer"), MinMaxSlidingWindowInferer)
    wf.run()
    masks = sorted((bundle / "eval").rglob("*_seg.nii.gz"))
    assert len(masks) == len(split["test"])
    item = build_datalist(data, "msd_heart", **split)["test"][0]
    image, mask = nib.load(data / item["image"]), nib.load(masks[0])
    assert mask.shape == image.shape[:3] and np.allclose(mask.affine, image.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
