"""Pieces shared by several methods, written once: projection MLPs, EMA/momentum updates, all-gather.

Methods import these instead of re-writing them, so a fix (say, to gathering under DDP) reaches all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from sslbench.augment import ViewConfig, host_to_device


class ScaleBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm with a learned scale and no shift: the output layer of the official SimCLRv2 head (its TF
    code's ``BatchNormalization(center=False)``: a learned gamma per feature, no beta)."""

    def __init__(self, num_features: int):
        super().__init__(num_features)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)


class MLPHead(nn.Sequential):
    """Linear-BN-ReLU layers then a final Linear (optionally followed by a scale-only BN).

    ``dims = [in, hidden, ..., out]``. SimCLR/MoCo v2 use 2 layers, SimCLRv2 and BYOL's projector
    3 or 2 with BN, DINO a 3-layer head without BN; ``last_bn`` is SimCLRv2's output BatchNorm.
    ``output_layer=False`` makes every step of ``dims`` a Linear-BN-ReLU layer, with no final Linear:
    the first layers of a head cut after a ReLU, which SimCLRv2 keeps with the encoder at export.
    """

    def __init__(self, dims: list[int], batch_norm: bool = True, last_bn: bool = False, activation: type[nn.Module] = nn.ReLU,
                 output_layer: bool = True):
        layers: list[nn.Module] = []
        for i in range(len(dims) - 2 if output_layer else len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(activation())
        if output_layer:
            layers.append(nn.Linear(dims[-2], dims[-1], bias=not last_bn))
            if last_bn:
                layers.append(ScaleBatchNorm1d(dims[-1]))
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


def split_batch_forward(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int,
                        permutation: torch.Tensor | None = None) -> torch.Tensor:
    """``fn`` applied to ``splits`` chunks of ``x`` (optionally in permuted order), outputs in ``x``'s order.

    BatchNorm inside ``fn`` then normalises each chunk by its own statistics: MoCo's shuffle BN on one
    device (the official CIFAR demo's ``bn_splits``). Without it the positive key is the only key computed
    with the query's batch statistics (the queue's keys come from earlier batches), and the network can
    find its positive by that signature instead of by content. Chunks are in order for the queries and
    in ``permutation`` order for the keys, so a query and its key are normalised over different images.
    """
    if splits <= 1:
        return fn(x)
    if permutation is None:
        return torch.cat([fn(chunk) for chunk in x.chunk(splits)])
    permutation = host_to_device(permutation, x.device)
    return torch.cat([fn(chunk) for chunk in x[permutation].chunk(splits)])[torch.argsort(permutation)]


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` at step 0 to ``end`` at ``total_steps`` (BYOL's momentum schedule)."""
    if total_steps <= 0:
        return end
    progress = min(step, total_steps) / total_steps
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


class Queue(nn.Module):
    """A FIFO memory of the last ``size`` embeddings of all processes (MoCo's negatives, SwAV's codes).

    Stored as buffers so that checkpoints (and hence resume) include it. ``enqueue`` gathers the
    keys of every process first, so all processes hold the same queue, in the order a single process
    would have written the concatenated batch; ``gather=False`` keeps a per-process queue (SwAV's).
    """

    def __init__(self, size: int, dim: int, random_init: bool = True, gather: bool = True):
        super().__init__()
        self.gather = gather
        # MoCo starts from random unit vectors (its negatives are used from step 0); SwAV starts
        # empty and is only used once ``is_full``.
        keys = nn.functional.normalize(torch.randn(size, dim), dim=1) if random_init else torch.zeros(size, dim)
        self.register_buffer("keys", keys)
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.tensor(size if random_init else 0, dtype=torch.long))

    @property
    def size(self) -> int:
        return len(self.keys)

    @property
    def is_full(self) -> bool:
        return int(self.count) >= self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach()
        if self.gather:
            keys = gather_no_grad(keys)
        keys = keys[-self.size:].to(self.keys.dtype)
        index = (self.pointer + torch.arange(len(keys), device=self.keys.device)) % self.size
        self.keys[index] = keys
        self.pointer.copy_((self.pointer + len(keys)) % self.size)
        self.count.clamp_(max=self.size - len(keys)).add_(len(keys))


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """Sinkhorn-Knopp codes (SwAV, Caron et al. 2020, Alg. 1): soft assignments of a batch to prototypes.

    ``scores`` (B, K) are sample-prototype similarities. Q = exp(scores / epsilon) is alternately
    normalised so that each prototype receives 1/K of the total mass (rows of Q^T, summed over the
    batch of *all* processes via all_reduce) and each sample 1/B; the result is multiplied by B so that
    every sample's code sums to 1. Runs in float32 whatever the autocast precision.
    """
    q = (scores.float() / epsilon)
    # Subtracting the global maximum (one scalar) changes nothing after normalisation but avoids overflow.
    top = q.max()
    if world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp(q - top).t()  # (K, B)
    batch = q.shape[1] * world_size()
    prototypes = q.shape[0]
    total = q.sum()
    if world_size() > 1:
        dist.all_reduce(total)
    q /= total
    for _ in range(iterations):
        per_prototype = q.sum(dim=1, keepdim=True)
        if world_size() > 1:
            dist.all_reduce(per_prototype)
        q /= per_prototype
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= batch
    q *= batch
    return q.t()


def multicrop_views(base: ViewConfig, global_size: int, local_size: int, num_local: int,
                    global_scale: tuple[float, float], local_scale: tuple[float, float]) -> list[ViewConfig]:
    """Multi-crop (SwAV, Caron et al. 2020): 2 large crops then ``num_local`` small low-resolution ones.

    ``base`` gives the colour recipe; the first two entries are the global views, the rest local.
    """
    globals_ = [dataclasses.replace(base, size=global_size, crop_scale=tuple(global_scale)) for _ in range(2)]
    locals_ = [dataclasses.replace(base, size=local_size, crop_scale=tuple(local_scale)) for _ in range(num_local)]
    return globals_ + locals_


def pooled_by_resolution(encoder: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pooled features of each view, one forward pass per run of equal-sized consecutive views.

    Multi-crop batches the global views together and the local views together (BatchNorm sees each
    resolution as one batch, as in SwAV's and DINO's code).
    """
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out.extend(encoder(torch.cat(views[start:end])).pooled.chunk(end - start))
        start = end
    return out


def masked_pool(feature_map: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean feature vector under each mask (DetCon, Hénaff et al. 2021, eq. 1): ``(B, K, C)``.

    ``feature_map`` is (B, C, h, w); ``masks`` (B, K, H, W) are binary (or soft) masks at image
    resolution. Each mask is first reduced to the map's resolution by area averaging, so a feature
    cell counts with the fraction of its pixels the mask covers: h_k = sum_ij m_kij f_ij / sum_ij m_kij.
    This equals the mean, over the mask's pixels, of the feature map upsampled by nearest neighbour
    (when H, W are multiples of h, w), and a mask smaller than a cell still pools something. An
    empty mask gives a zero vector; callers give such masks zero weight.
    """
    if masks.shape[-2:] != feature_map.shape[-2:]:
        masks = nn.functional.adaptive_avg_pool2d(masks, feature_map.shape[-2:])
    masks = masks.to(feature_map.dtype)
    area = masks.sum((2, 3)).unsqueeze(2)
    summed = torch.einsum("bkhw,bchw->bkc", masks, feature_map)
    return summed / area.clamp(min=torch.finfo(area.dtype).tiny)
