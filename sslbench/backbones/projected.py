"""An encoder followed by the first layers of its pretraining projection head: SimCLRv2's export.

SimCLRv2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners",
section 2) does not throw its projection head away after pretraining: it fine-tunes "from a middle
layer" of the 3-layer head, i.e. the network that is fine-tuned is the encoder plus the head's first
Linear-BN-ReLU layer. Wrapping those layers into an ``Encoder`` keeps every contract unchanged: the
export writes one state dict, ``load_encoder`` rebuilds it from its spec, and every task uses it like
any other encoder (fine-tuning deep-copies and trains the head layers with the backbone).

What each task reads: ``pooled`` is the head layers' output, so kNN, linear probes, fine-tuning and the
few-label and distillation protocols all start from the paper's fine-tuning layer; ``maps`` are the
wrapped encoder's own maps, so dense heads (depth, segmentation, conv counting) read the backbone
exactly as they do for every other method.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sslbench.backbones.base import Encoder, Features
from sslbench.errors import ConfigError

PROJECTED = "projected"
"""The ``backbone`` name of a projected encoder's spec."""


class ProjectedEncoder(Encoder):
    """``encoder`` whose pooled vector continues through ``layers`` (Linear-BN-ReLU blocks, such as
    ``MLPHead(..., output_layer=False)``); the maps are ``encoder``'s.

    The modules are used, not copied: wrapping a training method's encoder and head layers exports the
    weights they have now. The spec records the wrapped encoder's spec and the widths of ``layers``.
    """

    def __init__(self, encoder: Encoder, layers: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.layers = layers
        widths = [m.out_features for m in layers.modules() if isinstance(m, nn.Linear)]
        self.pooled_dim = widths[-1] if widths else encoder.pooled_dim
        self.map_channels = dict(encoder.map_channels)
        self.spec = {"backbone": PROJECTED, "encoder": encoder.spec, "head_dims": widths}
        # build_encoder(spec, pretrained=False) clears a top-level "pretrained"; mirroring the wrapped
        # spec's flag here lets it reach a wrapped timm model, so loading never downloads weights.
        if "pretrained" in encoder.spec:
            self.spec["pretrained"] = encoder.spec["pretrained"]

    def forward(self, images: torch.Tensor) -> Features:
        features = self.encoder(images)
        return Features(pooled=self.layers(features.pooled), maps=features.maps)


def projected_encoder_from_spec(spec: dict[str, Any]) -> ProjectedEncoder:
    """Rebuild a ``ProjectedEncoder`` (fresh weights) from its spec."""
    from sslbench.backbones import build_encoder
    from sslbench.methods.parts import MLPHead

    if missing := [key for key in ("encoder", "head_dims") if key not in spec]:
        raise ConfigError(f"projected encoder spec lacks {', '.join(map(repr, missing))}; write it with ProjectedEncoder.spec")
    encoder = build_encoder(spec["encoder"], pretrained=bool(spec.get("pretrained", False)))
    return ProjectedEncoder(encoder, MLPHead([encoder.pooled_dim, *spec["head_dims"]], output_layer=False))
