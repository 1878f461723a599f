"""Data-parallel stage 2 on CPU with gloo: 2 processes, replicas must stay identical."""

import os
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from monai_mlbseg.engines import MetaTrainer, stage2_method
from monai_mlbseg.networks import NestedUNet
from monai_mlbseg.utils import unwrap_network
from tests.bundle_utils import copy_bundle, make_data, run_folders
from tests.helpers import corrupt, disc_samples


def _worker(rank: int, world: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same initial weights on every rank
        net = NestedUNet(2, features=(4, 8))
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        unlabeled = corrupt(disc_samples(8, 16, seed=1))
        clean = disc_samples(8, 16, seed=2)
        trainer = MetaTrainer(
            "cpu",
            2,
            DataLoader(unlabeled, batch_size=1, sampler=DistributedSampler(unlabeled, shuffle=True)),
            DataLoader(clean, batch_size=2, sampler=DistributedSampler(clean, shuffle=True)),
            ddp,
            opt,
            **stage2_method("mlbseg"),
        )
        trainer.set_random_state(rank)  # different views on each rank
        trainer.run()
        # parameters only: DDP re-broadcasts the BatchNorm buffers from rank 0 at the start of every forward,
        # so after the last forward each rank still holds its own running statistics
        state = {
            "network": dict(unwrap_network(ddp).named_parameters()),
            "teacher": dict(trainer.teacher.named_parameters()),
            "iterations": trainer.state.iteration,
            "weights": trainer.state.weight_maps["weights"],
        }
        torch.save(state, os.path.join(folder, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears its gloo threads down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_replicas_stay_identical_after_stage2_iterations(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a["iterations"] == b["iterations"] == 8, "2 epochs of 4 unlabeled slices per rank"
    for key in ("network", "teacher"):
        for name, value in a[key].items():
            assert torch.equal(value, b[key][name]), f"{key} {name} differs between the replicas"
    assert not torch.equal(a["weights"], b["weights"]), "each rank computed weight maps for its own batch"
    torch.manual_seed(0)
    start = dict(NestedUNet(2, features=(4, 8)).named_parameters())
    assert any(not torch.equal(start[k], a["network"][k]) for k in start), "the replicas trained"


def test_bundle_multi_gpu_config_runs_under_torchrun_on_cpu(tmp_path):
    bundle = copy_bundle("mlbseg_la", tmp_path)
    data, split = make_data(tmp_path, "uamt_h5")
    configs = f"['{bundle}/configs/train.json','{bundle}/configs/multi_gpu_train.json']"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--meta_file",
        str(bundle / "configs" / "metadata.json"),
        "--bundle_root",
        str(bundle),
        "--dataset_dir",
        str(data),
        "--split",
        f"{split}",
        "--features",
        "[4,8]",
        "--image_size",
        "[32,32]",
        "--stage1#max_epochs",
        "1",
        "--train#trainer#max_epochs",
        "1",
        "--num_workers",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()
    run = run_folders(bundle)[0]
    assert (run / "stage1.pt").is_file() and list((run / "initial_labels").iterdir())
    torch.load(bundle / "models" / "model.pt", weights_only=True)
