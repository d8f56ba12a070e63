"""Object counting as classification of the count id: a linear probe, a conv head or fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.backbones.base import Encoder
from sslbench.data.base import ImageSet
from sslbench.tasks.base import FINETUNE, Outputs, Task
from sslbench.tasks.heads import TaskHead, counting_conv_task_head, linear_task_head
from sslbench.tasks.metrics import count_mae, top1
from sslbench.tasks.probe import ProbeConfig


class CountingTask(Task):
    """``linear``: a ``LinearHead`` on the frozen pooled vector picks one of ``num_classes["count"]``
    count ids. ``conv``: a ``CountingConvHead`` on the frozen deepest map. ``finetune``: the linear head
    trained with the encoder on flipped images (a crop would change the count). Reports
    ``{"accuracy", "mae", "trainable_params"}``, mae being the mean |predicted - true count id|."""

    name = "counting"
    protocols = ("linear", "conv", FINETUNE)
    target = "count"

    def head(self, protocol: str, encoder: Encoder, train: ImageSet, config: ProbeConfig) -> TaskHead:
        if protocol == "conv":
            return counting_conv_task_head(encoder.map_channels, self.num_classes(train), config.decoder_width)
        return linear_task_head(encoder.pooled_dim, self.num_classes(train))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def metrics(self, outputs: Outputs, train: ImageSet, test: ImageSet) -> dict[str, float]:
        predicted = torch.cat([logits.argmax(1).cpu() for _, logits in outputs])
        truth = test.targets[self.target]
        return {"accuracy": top1(predicted, truth), "mae": count_mae(predicted, truth)}
