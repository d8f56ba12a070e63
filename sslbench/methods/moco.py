"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

A query encoder (backbone + 2-layer MLP head) is trained to pick, among the key of its other view and
a queue of past keys, its positive by InfoNCE. Keys come from a momentum (EMA) copy of the query
encoder, so the queue's keys stay consistent as the query encoder moves.

CIFAR recipe (defaults), from the official MoCo CIFAR-10 demo (He et al.'s colab) and solo-learn's
``mocov2plus`` CIFAR config: head [D, 2048, 128] with BN, queue 4096, key momentum 0.99, temperature
0.2, symmetric loss over both views (both keys enter the queue), MoCo v2 views (crop 0.2-1, jitter
0.4/0.4/0.4/0.1 p 0.8, grey 0.2, no blur at 32 px). ImageNet uses queue 65536 and momentum 0.999.

Under DDP the keys of all processes enter the queue (``Queue.enqueue`` gathers them). MoCo's
shuffle-BN (which stops BatchNorm leaking batch statistics between query and key) is not done here:
synchronised BatchNorm (the engine's ``sync_batchnorm``) serves the same purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sslbench.augment import ViewConfig
from sslbench.methods.base import PretrainMethod
from sslbench.methods.parts import MLPHead, Queue, ema_update, frozen_copy


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

    def _keys(self, views: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return F.normalize(self.key_projection(self.key_encoder(views).pooled).float(), dim=1)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        v1, v2 = self.views(images, generator)
        q1, q2 = self.projection(self.encoder(torch.cat([v1, v2])).pooled).chunk(2)
        k1, k2 = self._keys(torch.cat([v1, v2])).chunk(2)
        negatives = self.queue.keys.clone()
        t = self.options.temperature
        loss = (infonce_loss(q1, k2, negatives, t) + infonce_loss(q2, k1, negatives, t)) / 2
        self.queue.enqueue(k1)
        self.queue.enqueue(k2)
        return loss, {}

    def after_optimizer_step(self) -> None:
        ema_update(self.key_encoder, self.encoder, self.options.key_momentum)
        ema_update(self.key_projection, self.projection, self.options.key_momentum)
