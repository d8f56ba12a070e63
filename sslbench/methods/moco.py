"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

A query encoder (backbone + 2-layer MLP head) is trained to pick, among the key of its other view and
a queue of past keys, its positive by InfoNCE. Keys come from a momentum (EMA) copy of the query
encoder, so the queue's keys stay consistent as the query encoder moves.

CIFAR recipe (defaults), from the official MoCo CIFAR-10 demo (He et al.'s colab) and solo-learn's
``mocov2plus`` CIFAR config: head [D, 2048, 128] with BN, queue 4096, key momentum 0.99, temperature
0.2, symmetric loss over both views (both keys enter the queue), MoCo v2 views (crop 0.2-1, jitter
0.4/0.4/0.4/0.1 p 0.8, grey 0.2, no blur at 32 px). ImageNet uses queue 65536 and momentum 0.999.

Shuffle BN: BatchNorm must not let a query recognise its positive key by shared batch statistics (the
queue's keys all come from earlier batches). As in the official CIFAR demo's ``bn_splits``, each process
runs its batch through both encoders in ``bn_splits`` chunks, the keys' chunks in a random order
(``split_batch_forward``), so a query and its key are normalised over different images. Under DDP each
process does this over its own batch, with its own BatchNorm statistics (the engine does not synchronise
them); the keys of all processes enter the queue (``Queue.enqueue`` gathers them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslbench.augment import ViewConfig
from sslbench.config import check_range
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod
from sslbench.methods.parts import MLPHead, Queue, ema_update, frozen_copy, split_batch_forward


def infonce_loss(query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE (MoCo, He et al. 2020, eq. 1) with the positive ``key[i]`` and the ``queue`` as negatives.

    loss = mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_j exp(q_i.queue_j/tau)) ),
    with q and k L2-normalised here and the queue's entries already normalised.
    Each process averages over its own queries; with a shared queue DDP's gradient average equals
    the single-process loss on the concatenated batch.
    """
    query = F.normalize(query.float(), dim=1)
    key = F.normalize(key.float(), dim=1)
    positive = (query * key).sum(1, keepdim=True)
    negative = query @ queue.float().t()
    logits = torch.cat([positive, negative], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


@dataclass
class MoCoOptions:
    temperature: float = 0.2
    queue_size: int = 4096
    key_momentum: float = 0.99
    projection_hidden: int = 2048
    projection_dim: int = 128
    crop_scale: tuple[float, float] = (0.2, 1.0)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    """Colour jitter strengths (brightness, contrast, saturation, hue), applied with p 0.8: MoCo v2's by default;
    (0.8, 0.8, 0.8, 0.2) with crop_scale (0.08, 1) gives SimCLR's CIFAR views, for comparing the two methods on
    equal views."""
    bn_splits: int = 8
    """BatchNorm statistics per chunk of the batch (shuffle BN on one device; 1 turns it off). The demo's 8."""

    def __post_init__(self) -> None:
        check_range("bn_splits", self.bn_splits, 1)


class MoCo(PretrainMethod):
    name = "moco"
    Options = MoCoOptions

    def build(self) -> None:
        o = self.options
        self.projection = MLPHead([self.encoder.pooled_dim, o.projection_hidden, o.projection_dim])
        self.key_encoder = frozen_copy(self.encoder)
        self.key_projection = frozen_copy(self.projection)
        self.queue = Queue(o.queue_size, o.projection_dim)
        brightness, contrast, saturation, hue = o.jitter
        view = ViewConfig(size=self.image_size, crop_scale=tuple(o.crop_scale), brightness=brightness, contrast=contrast,
                          saturation=saturation, hue=hue)
        self.views = self.make_views([view, view])
        if self.train_config.batch_size < 2 * o.bn_splits:
            raise ConfigError(f"option bn_splits={o.bn_splits} leaves chunks of under 4 views at batch_size={self.train_config.batch_size}; "
                              f"use --set bn_splits={max(1, self.train_config.batch_size // 2)} or less")

    def _queries(self, views: torch.Tensor) -> torch.Tensor:
        return split_batch_forward(lambda x: self.projection(self.encoder(x).pooled), views, self.options.bn_splits)

    def _keys(self, views: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        shuffle = torch.randperm(len(views), generator=generator) if self.options.bn_splits > 1 else None
        with torch.no_grad():
            keys = split_batch_forward(lambda x: self.key_projection(self.key_encoder(x).pooled), views, self.options.bn_splits, shuffle)
        return F.normalize(keys.float(), dim=1)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        v1, v2 = self.views(images, generator)
        q1, q2 = self._queries(torch.cat([v1, v2])).chunk(2)
        k1, k2 = self._keys(torch.cat([v1, v2]), generator).chunk(2)
        negatives = self.queue.keys.clone()
        t = self.options.temperature
        loss = (infonce_loss(q1, k2, negatives, t) + infonce_loss(q2, k1, negatives, t)) / 2
        self.queue.enqueue(k1)
        self.queue.enqueue(k2)
        return loss, {}

    def after_optimizer_step(self) -> None:
        ema_update(self.key_encoder, self.encoder, self.options.key_momentum)
        ema_update(self.key_projection, self.projection, self.options.key_momentum)
