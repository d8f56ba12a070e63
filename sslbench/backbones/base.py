"""The Encoder contract: what every backbone gives every task.

Tasks never know which method or architecture made an encoder. They call ``encoder(images)`` with
float images in [0, 1] (the encoder applies its own normalisation, so a ResNet, a ViT and a diffusion
U-Net that wants [-1, 1] all take the same input) and get a ``Features``: one pooled vector per image
for global tasks and a dict of feature maps keyed by stride for dense tasks.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from sslbench.errors import ConfigError


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


def spec_kwargs(constructor: Callable[..., Any], spec: dict[str, Any], what: str,
                supplied: tuple[str, ...] = ("backbone",)) -> dict[str, Any]:
    """The keyword arguments ``spec`` gives ``constructor`` (JSON lists back to tuples), checked against its signature;
    the keys in ``supplied`` are left out, and the caller passes those arguments itself.

    A spec key the constructor does not take (a typo, or a key from another version) and a required argument the
    spec lacks are ConfigErrors that name the key. Checking the signature first, rather than catching the
    TypeError of the call, keeps a TypeError raised inside a constructor (a bug) from reading as a bad spec.
    """
    kwargs = {key: tuple(value) if isinstance(value, list) else value for key, value in spec.items() if key not in supplied}
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    parameters = {name: p for name, p in inspect.signature(constructor).parameters.items() if p.kind in named}
    unknown = sorted(set(kwargs) - set(parameters))
    if unknown:
        raise ConfigError(f"{what} spec has {'keys' if len(unknown) > 1 else 'a key'} it does not take ({', '.join(map(repr, unknown))}); "
                          f"remove or correct {'them' if len(unknown) > 1 else 'it'} (it takes {', '.join(map(repr, parameters))})")
    missing = [name for name, p in parameters.items() if p.default is inspect.Parameter.empty and name not in kwargs and name not in supplied]
    if missing:
        raise ConfigError(f"{what} spec lacks {', '.join(map(repr, missing))}; write it with the encoder's .spec")
    return kwargs
