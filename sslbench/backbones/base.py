"""The Encoder contract: what every backbone gives every task.

Tasks never know which method or architecture made an encoder. They call ``encoder(images)`` with
float images in [0, 1] (the encoder applies its own normalisation, so a ResNet, a ViT and a diffusion
U-Net that wants [-1, 1] all take the same input) and get a ``Features``: one pooled vector per image
for global tasks and a dict of feature maps keyed by stride for dense tasks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Features:
    """``pooled``: (B, pooled_dim). ``maps``: stride -> (B, C_s, H/stride, W/stride), finest first."""

    pooled: torch.Tensor
    maps: dict[int, torch.Tensor]


class Encoder(nn.Module):
    """Base class of every backbone.

    Subclasses set ``pooled_dim`` and ``map_channels`` (stride -> channels) in ``__init__`` and
    implement ``forward``. ``spec`` is the JSON-able recipe that rebuilds the module from the
    registry (see ``sslbench.backbones.build_encoder``), stored next to exported weights.
    """

    pooled_dim: int
    map_channels: dict[int, int]
    spec: dict

    def forward(self, images: torch.Tensor) -> Features:  # pragma: no cover - abstract
        raise NotImplementedError


def count_parameters(*modules: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``modules``, each counted once even when modules share it; with
    ``trainable_only`` only those that receive gradients (what a protocol trains)."""
    unique = {id(p): p for module in modules for p in module.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in unique.values())


class Normalize(nn.Module):
    """Per-channel (x - mean) / std on [0, 1] images; kept inside the encoder so its input is uniform."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
