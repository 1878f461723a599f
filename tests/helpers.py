"""Small synthetic 2D problems for the engine tests (the discs of :py:func:`monai_mlbseg.data.synthetic_discs`)."""

from __future__ import annotations

import torch

from monai_mlbseg.data import synthetic_discs
from monai_mlbseg.evaluation import dice_score


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
