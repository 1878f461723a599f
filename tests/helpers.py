"""Small synthetic 2D problems for the engine tests."""

from __future__ import annotations

import torch


def disc_samples(
    n: int, size: int = 32, seed: int = 0, noise: float = 0.3, contrast: float = 0.8, jitter: bool = False
) -> list[dict]:
    """``n`` images of one bright disc of random centre and radius in noise: ``image``, ``label`` and ``gt``.
    With ``jitter`` every image also gets a random gain (0.4-1.2) and offset (0-0.3)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for i in range(n):
        c = torch.rand(2, generator=g) * 0.8 - 0.4
        r = 0.25 + 0.25 * torch.rand(1, generator=g)
        mask = (((xx - c[0]) ** 2 + (yy - c[1]) ** 2) < r**2).float()
        image = contrast * mask + noise * torch.randn(size, size, generator=g)
        if jitter:
            image = image * (0.4 + 0.8 * torch.rand(1, generator=g)) + 0.3 * torch.rand(1, generator=g)
        out.append(
            {"image": image[None], "label": mask[None].clone(), "gt": mask[None].clone(), "case_id": f"c{seed}_{i}"}
        )
    return out


def corrupt(samples: list[dict], seed: int = 0, shift: int = 3, flip_fraction: float = 0.05) -> list[dict]:
    """Initial labels = ground truth shifted by ``shift`` pixels with a fraction of random pixel flips."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in samples:
        label = torch.roll(s["gt"], shifts=(shift, -shift), dims=(1, 2))
        flips = torch.rand(label.shape, generator=g) < flip_fraction
        out.append({**s, "label": torch.where(flips, 1 - label, label)})
    return out


def dice(pred: torch.Tensor, target: torch.Tensor) -> float:
    inter = (pred * target).sum()
    return float(2 * inter / (pred.sum() + target.sum()).clamp_min(1e-8))


@torch.no_grad()
def mean_dice(net: torch.nn.Module, samples: list[dict]) -> float:
    net.eval()
    images = torch.stack([s["image"] for s in samples])
    preds = (torch.sigmoid(net(images)) > 0.5).float()
    net.train()
    return sum(dice(p, s["gt"]) for p, s in zip(preds, samples)) / len(samples)
