"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Two augmented views per image, an MLP projection head, and the NT-Xent loss: each view must pick its
partner among all 2N-1 other views of the (global, all-process) batch by cosine similarity / tau.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.methods.base import PretrainMethod, simclr_view
from sslbench.methods.parts import MLPHead, gather_with_grad, rank


def ntxent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over a batch of positive pairs (z1[i], z2[i]); negatives gathered from all processes.

    With q = the 2B local embeddings and k = the 2BW gathered ones (all L2-normalised),
    loss = mean_i -log( exp(q_i.k_pos(i)/tau) / sum_{j != self(i)} exp(q_i.k_j/tau) ).
    Under DDP each process averages over its own 2B queries, and DDP averages the gradients, which
    equals the single-process loss on the concatenated batch.
    """
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    batch = len(z1)
    k1, k2 = gather_with_grad(z1), gather_with_grad(z2)
    total = len(k1)
    queries = torch.cat([z1, z2])
    keys = torch.cat([k1, k2])
    logits = queries @ keys.t() / temperature
    local = torch.arange(batch, device=z1.device) + rank() * batch
    self_index = torch.cat([local, local + total])
    positive = torch.cat([local + total, local])
    rows = torch.arange(2 * batch, device=z1.device)
    logits = logits.float()
    logits[rows, self_index] = float("-inf")
    return F.cross_entropy(logits, positive)


@dataclass
class SimCLROptions:
    temperature: float = 0.5
    projection_hidden: int = 512
    projection_dim: int = 128
    projection_layers: int = 2
    blur_p: float = 0.0


class SimCLR(PretrainMethod):
    name = "simclr"
    Options = SimCLROptions

    def build(self) -> None:
        self.projection = self.projection_head()
        view = simclr_view(self.image_size)
        view.blur_p = self.options.blur_p
        self.views = self.make_views([view, view])

    def projection_head(self) -> nn.Module:
        """The MLP from the pooled vector to the embedding the loss compares (SimCLRv2 deepens it)."""
        o = self.options
        return MLPHead([self.encoder.pooled_dim] + [o.projection_hidden] * (o.projection_layers - 1) + [o.projection_dim])

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        v1, v2 = self.views(images, generator)
        z = self.projection(self.encoder(torch.cat([v1, v2])).pooled)
        z1, z2 = z.chunk(2)
        return ntxent_loss(z1, z2, self.options.temperature), {}
