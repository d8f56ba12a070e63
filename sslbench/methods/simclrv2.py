"""SimCLRv2 (Chen et al. 2020, "Big Self-Supervised Models are Strong Semi-Supervised Learners").

SimCLR's two views and NT-Xent loss (inherited, not copied) with the paper's deeper projection head:
3 layers ``[D, D, D, 128]`` (hidden width = the encoder's pooled width ``D``, as the paper's 2048 for a
ResNet-50), BatchNorm on every layer, ReLU on the hidden ones, and an output BatchNorm with a learned
scale and no shift (``MLPHead(last_bn=True)``, as the official code). The
output BatchNorm removes what all images share, so the loss starts above chance and needs more steps
to fall than SimCLR's on tiny runs. The head's first Linear-BN-ReLU layer is not thrown away: the paper
fine-tunes "from the middle layer" of the head, so the exported encoder is a ``ProjectedEncoder``
(backbone + that layer, ``export_head_layers=1``) whose pooled vector every classification protocol
reads; dense tasks read the backbone's maps. ``export_head_layers=0`` exports the backbone alone, as SimCLR.

Temperature 0.2 for CIFAR-sized data (SimCLR's CIFAR runs use 0.5, SimCLRv2's ImageNet runs 0.1).
Left out: the MoCo-style memory of negatives the paper adds (about +1% in its ablation), and the
wide/selective-kernel ResNets, which are a backbone choice rather than part of the method.

The semi-supervised stages are evaluation protocols of any encoder: ``finetune-1pct``/``-10pct``
(``sslbench.tasks.classification``) and ``distill-1pct``/``-10pct`` (``sslbench.tasks.distill``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from sslbench.backbones.base import Encoder
from sslbench.backbones.projected import ProjectedEncoder
from sslbench.config import check_range
from sslbench.methods.parts import MLPHead
from sslbench.methods.simclr import SimCLR, SimCLROptions


@dataclass
class SimCLRv2Options(SimCLROptions):
    temperature: float = 0.2
    projection_hidden: int | None = None
    """Hidden width of the head; None: the encoder's pooled width, as in the paper."""
    projection_layers: int = 3
    export_head_layers: int = 1
    """Hidden head layers exported with the encoder: 1 is the paper's "fine-tune from the middle layer"."""

    def __post_init__(self) -> None:
        check_range("projection_hidden", self.projection_hidden, 1)
        check_range("projection_layers", self.projection_layers, 1)
        check_range("export_head_layers", self.export_head_layers, 0, self.projection_layers - 1)


class SimCLRv2(SimCLR):
    name = "simclrv2"
    Options = SimCLRv2Options

    def projection_head(self) -> nn.Module:
        """``[D, hidden, ..., projection_dim]`` as two MLPs in sequence: the first ``export_head_layers``
        Linear-BN-ReLU layers (exported with the encoder), then the rest of the head. Together they are
        exactly ``MLPHead(dims, last_bn=True)``; the split only names the part the export keeps."""
        o = self.options
        width = self.encoder.pooled_dim
        hidden = o.projection_hidden if o.projection_hidden is not None else width
        dims = [width] + [hidden] * (o.projection_layers - 1) + [o.projection_dim]
        kept = o.export_head_layers
        return nn.Sequential(MLPHead(dims[:kept + 1], output_layer=False), MLPHead(dims[kept:], last_bn=True))

    def export_encoder(self) -> Encoder:
        if self.options.export_head_layers == 0:
            return self.encoder
        return ProjectedEncoder(self.encoder, self.projection[0])
