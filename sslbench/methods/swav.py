"""SwAV (Caron et al. 2020, "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments").

Embeddings are scored against K learnable prototypes (unit vectors). For each global view, the
Sinkhorn-Knopp algorithm turns the batch's scores into balanced soft codes (every prototype gets an
equal share of the batch); every *other* view must predict those codes from its own scores
(swapped prediction, cross-entropy with temperature 0.1). Multi-crop adds small low-resolution views
that only predict, never provide codes.

Defaults, following solo-learn's CIFAR SwAV config and the paper: projection [D, 2048, 128] with BN,
K = 3000 prototypes, epsilon 0.05, 3 Sinkhorn iterations, temperature 0.1, 2 global crops (scale
0.14-1, full size) + 2 local crops (scale 0.05-0.14, half size), prototypes frozen during the first
epoch (the paper freezes them for the first epoch to avoid a degenerate start). The optional queue
(``queue_size > 0``, per process as in the official code, used from ``queue_start_epoch`` once full)
stores past embeddings to enlarge the batch Sinkhorn balances over; the paper needs it only for
batches below ~256.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.augment import ViewConfig
from sslbench.methods.base import PretrainMethod
from sslbench.methods.parts import MLPHead, Queue, multicrop_views, pooled_by_resolution, sinkhorn


def swav_loss(scores_by_view: list[torch.Tensor], codes_by_view: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """Swapped prediction (SwAV eq. 1-3) averaged over the code views and the views predicting them.

    ``codes_by_view[i]`` (B, K) are the Sinkhorn codes of view i (the first ``len(codes_by_view)``
    views, the global ones); every other view v contributes -sum_k q_i[k] log softmax(s_v / tau)[k].
    """
    total = scores_by_view[0].new_zeros((), dtype=torch.float32)
    for i, codes in enumerate(codes_by_view):
        terms = [-(codes * F.log_softmax(scores.float() / temperature, dim=1)).sum(1).mean()
                 for v, scores in enumerate(scores_by_view) if v != i]
        total = total + sum(terms) / len(terms)
    return total / len(codes_by_view)


@dataclass
class SwAVOptions:
    projection_hidden: int = 2048
    projection_dim: int = 128
    prototypes: int = 3000
    temperature: float = 0.1
    epsilon: float = 0.05
    sinkhorn_iterations: int = 3
    local_views: int = 2
    global_scale: tuple[float, float] = (0.14, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.14)
    freeze_prototypes_epochs: int = 1
    queue_size: int = 0
    queue_start_epoch: int = 0


class SwAV(PretrainMethod):
    name = "swav"
    Options = SwAVOptions

    def build(self) -> None:
        o = self.options
        self.projection = MLPHead([self.encoder.pooled_dim, o.projection_hidden, o.projection_dim])
        self.prototypes = nn.Linear(o.projection_dim, o.prototypes, bias=False)
        if o.queue_size > 0:
            self.queues = nn.ModuleList([Queue(o.queue_size, o.projection_dim, random_init=False, gather=False) for _ in range(2)])
        views = multicrop_views(ViewConfig(), self.image_size, self.image_size // 2, o.local_views, o.global_scale, o.local_scale)
        self.views = self.make_views(views)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        o = self.options
        with torch.no_grad():  # prototypes stay unit vectors (official code normalises before each step)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        pooled = pooled_by_resolution(self.encoder, self.views(images, generator))
        embeddings = [F.normalize(self.projection(p), dim=1) for p in pooled]
        scores = [self.prototypes(z) for z in embeddings]
        codes = []
        for i in range(2):
            batch_scores = scores[i].detach()
            if o.queue_size > 0 and self.current_epoch >= o.queue_start_epoch and self.queues[i].is_full:
                queued = self.prototypes(self.queues[i].keys).detach()
                batch_scores = torch.cat([batch_scores, queued])
            codes.append(sinkhorn(batch_scores, o.epsilon, o.sinkhorn_iterations)[:len(images)])
            if o.queue_size > 0:
                self.queues[i].enqueue(embeddings[i])
        return swav_loss(scores, codes, o.temperature), {}

    def on_after_backward(self) -> None:
        if self.current_epoch < self.options.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None
