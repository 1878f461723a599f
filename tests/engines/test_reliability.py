"""Determinism on CPU and numerical safety of both stages."""

import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.transforms import RandFlipd
from monai.utils import set_determinism

from monai_mlbseg.engines import (
    AtomicCheckpointSaver,
    MetaTrainer,
    NonFiniteLossGuard,
    latest_checkpoint,
    stage2_method,
)
from monai_mlbseg.engines.stage2 import STAGE2_TERMS
from monai_mlbseg.inferers import SliceResizeInferer, minmax_slices
from monai_mlbseg.networks import NestedUNet
from tests.helpers import corrupt, disc_samples


def loaders(unlabeled, clean):
    flip = RandFlipd(["image", "label", "gt"], prob=0.5, spatial_axis=1, allow_missing_keys=True)
    return (
        DataLoader(Dataset(unlabeled, flip), batch_size=1, shuffle=True),
        DataLoader(Dataset(clean, flip), batch_size=2, shuffle=True),
    )


def both_stages(seed, iterations=4):
    set_determinism(seed=seed)
    unlabeled_loader, clean_loader = loaders(corrupt(disc_samples(6, 16, seed=1)), disc_samples(4, 16, seed=2))
    net = NestedUNet(2, features=(4, 8))
    stage1 = SupervisedTrainer(
        "cpu", 1, clean_loader, net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9),
        torch.nn.BCEWithLogitsLoss(), epoch_length=iterations,
    )  # fmt: skip
    losses1 = []
    stage1.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses1.append(e.state.output[0]["loss"]))
    stage1.run()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    stage2 = MetaTrainer(
        "cpu", 1, unlabeled_loader, clean_loader, net, opt, epoch_length=iterations, **stage2_method("mlbseg")
    )
    terms, weights = [], []
    stage2.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: terms.append([e.state.output[k] for k in STAGE2_TERMS])
    )
    stage2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: weights.append(e.state.weight_maps["weights"]))
    stage2.run()
    set_determinism(seed=None)
    return losses1, terms, weights, net.state_dict()


def test_same_seed_same_losses_weight_maps_and_parameters_on_cpu():
    a, b, c = both_stages(7), both_stages(7), both_stages(8)
    assert a[0] == b[0] and len(a[0]) == 4, "stage-1 losses"
    assert a[1] == b[1] and len(a[1]) == 4, "stage-2 loss terms and weight statistics"
    assert all(torch.equal(x, y) for x, y in zip(a[2], b[2])), "stage-2 weight maps"
    assert all(torch.equal(a[3][k], b[3][k]) for k in a[3]), "final parameters and buffers"
    assert a[1] != c[1], "another seed gives another run"


def stage2_outputs(unlabeled, clean, iterations=2, **kwargs):
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    opt = torch.optim.SGD(net.parameters(), lr=kwargs.pop("lr", 0.05), momentum=0.9, weight_decay=5e-4)
    trainer = MetaTrainer(
        "cpu", 1, DataLoader(unlabeled, batch_size=1), DataLoader(clean, batch_size=2), net, opt,
        epoch_length=iterations, **{**stage2_method("mlbseg"), **kwargs},
    )  # fmt: skip
    outputs = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    trainer.run()
    return trainer, outputs


def assert_finite(trainer, outputs):
    for out in outputs:
        for k in STAGE2_TERMS:
            assert k in ("loss_meta", "loss_clean") or math.isfinite(out[k]), f"{k} = {out[k]}"
    w = trainer.state.weight_maps["weights"]
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert w.sum().item() == pytest.approx(1.0, abs=1e-4) or w.sum().item() == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.network.parameters())


@pytest.mark.parametrize("value", [0.0, 1.0], ids=["all_background", "all_foreground"])
def test_uniform_label_batches_stay_finite(value):
    samples = [{**s, "label": torch.full_like(s["label"], value), "gt": torch.full_like(s["gt"], value)}
               for s in disc_samples(4, 16, seed=3)]  # fmt: skip
    trainer, outputs = stage2_outputs(samples, samples)
    assert_finite(trainer, outputs)


def test_no_positive_meta_gradient_gives_zero_weights_and_finite_losses():
    samples = corrupt(disc_samples(4, 16, seed=4))
    trainer, outputs = stage2_outputs(samples, disc_samples(4, 16, seed=5), lr=0.0)
    assert torch.all(trainer.state.weight_maps["weights"] == 0)
    assert outputs[-1]["loss_weighted"] == 0.0 and outputs[-1]["weight_positive_fraction"] == 0.0
    assert_finite(trainer, outputs)


@pytest.mark.parametrize("scale", [1e-8, 1e8])
def test_very_small_and_very_large_intensities_stay_finite(scale):
    samples = [{**s, "image": s["image"] * scale} for s in corrupt(disc_samples(4, 16, seed=6))]
    trainer, outputs = stage2_outputs(
        samples, [{**s, "image": s["image"] * scale} for s in disc_samples(4, 16, seed=7)]
    )
    assert_finite(trainer, outputs)
    volume = torch.stack([s["image"] for s in samples], dim=-1)[None]
    logits = SliceResizeInferer(roi_size=(8, 8))(volume, trainer.network.eval())
    assert torch.isfinite(logits).all()
    assert torch.allclose(minmax_slices(volume[..., 0]), minmax_slices(volume[..., 0] / scale), atol=1e-5)


def test_bf16_autocast_on_cpu_stays_finite():
    samples = corrupt(disc_samples(4, 16, seed=8))
    trainer, outputs = stage2_outputs(
        samples, disc_samples(4, 16, seed=9), amp=True, amp_kwargs={"dtype": torch.bfloat16}
    )
    assert_finite(trainer, outputs)


def test_non_finite_loss_stops_stage2_before_the_step_and_keeps_good_checkpoints(tmp_path):
    samples = corrupt(disc_samples(5, 16, seed=10))
    samples[3]["image"][0, 2, 2] = float("nan")
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    trainer = MetaTrainer("cpu", 1, DataLoader(samples, batch_size=1), DataLoader(disc_samples(4, 16), batch_size=2),
                          net, opt, **stage2_method("mlbseg"))  # fmt: skip
    AtomicCheckpointSaver(str(tmp_path), {"network": net}, save_interval=1, epoch_level=False, save_final=True).attach(
        trainer
    )
    with pytest.raises(FloatingPointError, match=r"non-finite .* at iteration 4, epoch 1: training stopped before"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in net.parameters()), "the weights never saw the NaN"
    saved = torch.load(latest_checkpoint(tmp_path), weights_only=True)
    assert all(torch.isfinite(v).all() for v in saved["network"].values() if v.is_floating_point())


def test_non_finite_loss_stops_stage1_with_the_guard():
    samples = disc_samples(4, 16, seed=11)
    samples[2]["image"][0, 0, 0] = float("inf")
    torch.manual_seed(0)
    net = NestedUNet(2, features=(4, 8))
    trainer = SupervisedTrainer(
        "cpu", 1, DataLoader(samples, batch_size=1), net, torch.optim.SGD(net.parameters(), lr=0.05),
        torch.nn.BCEWithLogitsLoss(), train_handlers=[NonFiniteLossGuard()],
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match="iteration 3"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in net.parameters())
