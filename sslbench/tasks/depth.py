"""Monocular depth: a U-Net decoder on the frozen feature maps, or fine-tuned with the encoder."""

from __future__ import annotations

import torch
from torch import nn

from sslbench.backbones.base import Encoder
from sslbench.data.base import ImageSet
from sslbench.tasks.base import FINETUNE, Outputs, Task
from sslbench.tasks.heads import TaskHead, unet_task_head
from sslbench.tasks.metrics import depth_metrics_from_totals, depth_totals
from sslbench.tasks.probe import ProbeConfig

_MAX_LOG_DEPTH = 20.0
"""Clamp of the predicted log-depth before exp, so an untrained head cannot overflow."""


def log_depth_l1_loss(log_depth: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Mean |predicted log-depth - log true depth| over valid pixels (depth > 0).

    L1 in log space penalises relative error, like AbsRel and delta1, so near and far pixels count
    alike, and it does not depend on the unit of the depth maps (metres or arbitrary renderer units).
    """
    log_depth = log_depth.squeeze(1)
    valid = depth > 0
    if not valid.any():
        return log_depth.sum() * 0.0
    return (log_depth[valid] - depth[valid].log()).abs().mean()


class DepthTask(Task):
    """``probe``: a ``UNetDecoder`` with one output channel read as log-depth, trained with
    ``log_depth_l1_loss`` on the frozen maps; ``finetune``: the same with the encoder, on flipped
    images and depth maps. Reports ``{"rmse", "abs_rel", "delta1", "trainable_params"}`` pooled over
    the valid pixels (depth > 0) of the test set at full image resolution, in the dataset's unit."""

    name = "depth"
    protocols = ("probe", FINETUNE)
    target = "depth"

    def head(self, protocol: str, encoder: Encoder, train: ImageSet, config: ProbeConfig) -> TaskHead:
        head = unet_task_head(encoder.map_channels, 1, config.decoder_width, config.finest_stride)
        # Start at the mean training log-depth so the budget is not spent learning the scene's scale.
        depth = train.targets[self.target]
        valid = depth > 0
        nn.init.constant_(head.module.out.bias, depth[valid].log().mean().item() if valid.any() else 0.0)
        return head

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return log_depth_l1_loss(output, target)

    def metrics(self, outputs: Outputs, train: ImageSet, test: ImageSet) -> dict[str, float]:
        truth = test.targets[self.target]
        totals = torch.zeros(4, dtype=torch.float64)
        for indices, log_depth in outputs:
            predicted = log_depth.squeeze(1).clamp(-_MAX_LOG_DEPTH, _MAX_LOG_DEPTH).exp().cpu()
            totals += depth_totals(predicted, truth[indices])
        return depth_metrics_from_totals(totals)
