"""Heads that tasks train on top of an encoder's features."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearHead(nn.Module):
    """A linear layer on pooled features, after a BatchNorm without affine parameters.

    The parameter-free BatchNorm only rescales each feature dimension, so the head stays linear, but
    it makes one learning rate work for encoders whose features differ in scale by orders of
    magnitude (MAE's linear probe, He et al. 2022, does the same).
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DenseDecoder(nn.Module):
    """A light FPN-style decoder (after Kirillov et al. 2019, "Panoptic Feature Pyramid Networks").

    Each map gets a 1x1 conv to ``width`` channels, is upsampled bilinearly to the finest map's size
    and summed; two 3x3 conv + BN + ReLU blocks and a 1x1 conv give ``out_channels``, upsampled
    bilinearly to the requested output size. Any set of strides works: one stride-16 ViT map, a
    ResNet's 1/2/4/8 or a U-Net's many.
    """

    def __init__(self, map_channels: dict[int, int], out_channels: int, width: int = 64) -> None:
        super().__init__()
        if not map_channels:
            raise ValueError("DenseDecoder needs at least one feature map; the encoder reports no map_channels")
        self.strides = sorted(map_channels)
        self.lateral = nn.ModuleDict({str(s): nn.Conv2d(map_channels[s], width, 1) for s in self.strides})
        self.fuse = nn.Sequential(_conv_bn_relu(width, width), _conv_bn_relu(width, width))
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, maps: dict[int, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        finest = maps[self.strides[0]]
        size = finest.shape[-2:]
        fused = self.lateral[str(self.strides[0])](finest)
        for stride in self.strides[1:]:
            lateral = self.lateral[str(stride)](maps[stride])
            fused = fused + F.interpolate(lateral, size=size, mode="bilinear", align_corners=False)
        out = self.out(self.fuse(fused))
        if tuple(out.shape[-2:]) != tuple(output_size):
            out = F.interpolate(out, size=tuple(output_size), mode="bilinear", align_corners=False)
        return out
