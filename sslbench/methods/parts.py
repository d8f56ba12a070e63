"""Pieces shared by several methods, written once: projection MLPs, EMA/momentum updates, all-gather.

Methods import these instead of re-writing them, so a fix (say, to gathering under DDP) reaches all.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn


class MLPHead(nn.Sequential):
    """Linear-BN-ReLU layers then a final Linear (optionally followed by BN without affine).

    ``dims = [in, hidden, ..., out]``. SimCLR/MoCo v2 use 2 layers, SimCLRv2 and BYOL's projector
    3 or 2 with BN, DINO a 3-layer head without BN; ``last_bn`` is SimCLRv2's/solo-learn's choice.
    """

    def __init__(self, dims: list[int], batch_norm: bool = True, last_bn: bool = False, activation: type[nn.Module] = nn.ReLU):
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(activation())
        layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(dims[-1], affine=False))
        super().__init__(*layers)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping gradients to the local part.

    Contrastive losses need every process's negatives (SimCLR's global batch); the autograd-aware
    ``torch.distributed.nn.functional.all_gather`` sends gradients back to the rank that made them.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), 0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every process (no gradient), e.g. keys entering a MoCo queue."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, 0)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that takes no gradient: the start of a momentum/EMA target network."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, for parameters and float buffers.

    Buffers (BatchNorm statistics) follow the same average so the target's normalisation matches
    its weights; integer buffers (``num_batches_tracked``) are copied.
    """
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o.detach(), 1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        if t.dtype.is_floating_point:
            t.lerp_(o, 1.0 - momentum)
        else:
            t.copy_(o)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps`` (BYOL's momentum schedule)."""
    if total_steps <= 0:
        return end
    progress = min(step, total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
