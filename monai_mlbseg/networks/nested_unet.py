"""Nested U-Net (UNet++) as used by MLB-Seg, for 2D and 3D."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Pool
from monai.networks.nets.basic_unet import TwoConv
from torch import nn

__all__ = ["NestedUNet"]


class NestedUNet(nn.Module):
    """
    Nested U-Net (Zhou et al., UNet++, 2018) in the configuration of the MLB-Seg reference: ``len(features)``
    resolution levels, every node two ``conv3x3 - BatchNorm - ReLU`` layers (MONAI's ``TwoConv``), 2x max-pooling
    down, bilinear (trilinear in 3D) upsampling with ``align_corners=True``, dense skip connections, a 1x1
    convolution out, no deep supervision. Node ``x[i][j]`` is ``nodes.conv{i}_{j}`` (the reference's names).
    The network can be scripted with TorchScript (``monai.bundle ckpt_export``) and exported with ``torch.export``.

    The 2D defaults (features 64/128/256/512/1024, 1 in and 1 out channel) have 36,628,481 parameters.
    Upsampled maps are resized to their skip connection, so any input size works (the reference needs multiples
    of 16).

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits; 1 for binary segmentation).
        features: channels of the resolution levels, finest first.
        act: activation (MONAI name or ``(name, args)``).
        norm: normalisation (MONAI name or ``(name, args)``).
        bias: convolution bias (the reference uses it).
        dropout: dropout ratio inside the nodes.

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3 or fewer than two levels are given.

    Example::

        net = NestedUNet(spatial_dims=2, in_channels=1, out_channels=1)
        logits = net(torch.rand(4, 1, 144, 144))      # [4, 1, 144, 144]
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (64, 128, 256, 512, 1024),
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = ("batch", {"affine": True}),
        bias: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if len(features) < 2:
            raise ValueError(f"features needs at least two levels, got {tuple(features)}.")
        self.spatial_dims = spatial_dims
        self.features = tuple(int(f) for f in features)
        self.levels = len(self.features)
        self.interp = "bilinear" if spatial_dims == 2 else "trilinear"
        self.pool = Pool["max", spatial_dims](kernel_size=2, stride=2)
        # nodes in execution order: column 0 of level i, then the diagonal x[i-j][j] it completes (TorchScript can
        # iterate a ModuleDict but not index modules dynamically)
        self.schedule = [(i - j, j) for i in range(self.levels) for j in range(i + 1)]
        nodes = {}
        for level, col in self.schedule:
            if col == 0:
                in_ch = in_channels if level == 0 else self.features[level - 1]
            else:
                in_ch = self.features[level] * col + self.features[level + 1]
            nodes[f"conv{level}_{col}"] = TwoConv(
                spatial_dims, in_ch, self.features[level], act=act, norm=norm, bias=bias, dropout=dropout
            )
        self.nodes = nn.ModuleDict(nodes)
        self.final = Conv["conv", spatial_dims](self.features[0], out_channels, kernel_size=1)

    def _up(self, x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=like.shape[2:], mode=self.interp, align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[N, in_channels, *S]``.

        Returns:
            ``[N, out_channels, *S]`` logits.
        """
        outputs: list[list[torch.Tensor]] = [[] for _ in range(self.levels)]
        step = 0
        for block in self.nodes.values():
            level, col = self.schedule[step]
            step += 1
            if col == 0:
                inp = x if level == 0 else self.pool(outputs[level - 1][0])
            else:
                inp = torch.cat(outputs[level] + [self._up(outputs[level + 1][col - 1], outputs[level][0])], dim=1)
            outputs[level].append(block(inp))
        return self.final(outputs[0][-1])
