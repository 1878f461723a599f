"""
Small synthetic 2D problems for the engine tests (the discs of :py:func:`monai_mlbseg.data.synthetic_discs`) and a
tiny stage-2 trainer on them.
"""

from __future__ import annotations

import torch
from monai.data import DataLoader

from monai_mlbseg.data import synthetic_discs
from monai_mlbseg.engines import GroundTruthMonitor, MetaTrainer, stage2_method
from monai_mlbseg.engines.stage2 import TwoSteps
from monai_mlbseg.evaluation import dice_score
from monai_mlbseg.networks import NestedUNet


def disc_samples(
    n: int, size: int = 32, seed: int = 0, noise: float = 0.3, contrast: float = 0.8, jitter: bool = False
) -> list[dict]:
    """:py:func:`~monai_mlbseg.data.synthetic_discs` with the ground truth also under ``gt`` (for monitoring)."""
    return [
        {**s, "label": s["label"].clone(), "gt": s["label"].clone()}
        for s in synthetic_discs(n, size, seed, noise, contrast, jitter)
    ]


def corrupt(samples: list[dict], seed: int = 0, shift: int = 3, flip_fraction: float = 0.05) -> list[dict]:
    """Initial labels = ground truth shifted by ``shift`` pixels with a fraction of random pixel flips."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        label = torch.roll(s["gt"], shifts=(shift, -shift), dims=(1, 2))
        flips = torch.rand(label.shape, generator=g) < flip_fraction
        out.append({**s, "label": torch.where(flips, 1 - label, label)})
    return out


@torch.no_grad()
def mean_dice(net: torch.nn.Module, samples: list[dict]) -> float:
    net.eval()
    images = torch.stack([s["image"] for s in samples])
    preds = (torch.sigmoid(net(images)) > 0.5).float()
    net.train()
    return sum(dice_score(p, s["gt"]) for p, s in zip(preds, samples)) / len(samples)


class CountingLoader:
    """An iterable loader that counts how often it is iterated (a rebuilt-per-step loader would show up here)."""

    def __init__(self, loader):
        self.loader = loader
        self.iterations = 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.iterations += 1
        return iter(self.loader)


def make_trainer(
    iterations=2,
    unlabeled=None,
    clean=None,
    seed=0,
    size=16,
    unlabeled_batch_size=1,
    cls=MetaTrainer,
    method="mlbseg",
    monitor=True,
    net=None,
    **kwargs,
):
    """
    A tiny trainer of the named stage-2 ``method`` (``None``: no method's parts, only ``kwargs``); ``kwargs`` replace
    the method's parts or set other ``MetaTrainer`` arguments; ``monitor`` attaches the ground-truth monitor.
    """
    torch.manual_seed(seed)
    unlabeled = corrupt(disc_samples(4, size, seed=1)) if unlabeled is None else unlabeled
    clean = disc_samples(4, size, seed=2) if clean is None else clean
    net = NestedUNet(2, features=(4, 8)) if net is None else net
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    parts = {} if method is None else stage2_method(method)
    if "grad_clip" in kwargs:  # the schedule owns the clip
        schedule = kwargs.get("schedule", parts.get("schedule", TwoSteps()))
        kwargs["schedule"] = schedule.with_grad_clip(kwargs.pop("grad_clip"))
    trainer = cls(
        "cpu",
        max_epochs=1,
        train_data_loader=DataLoader(unlabeled, batch_size=unlabeled_batch_size, shuffle=False),
        clean_data_loader=DataLoader(clean, batch_size=2, shuffle=False),
        network=net,
        optimizer=opt,
        epoch_length=iterations,
        **{**parts, **kwargs},
    )
    if monitor:
        GroundTruthMonitor().attach(trainer)
    trainer.set_random_state(seed)
    return trainer


def count_steps(trainer):
    calls = {"n": 0}
    step = trainer.optimizer.step

    def counted(*args, **kwargs):
        calls["n"] += 1
        return step(*args, **kwargs)

    trainer.optimizer.step = counted
    return calls
