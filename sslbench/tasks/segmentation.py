"""Semantic segmentation: DeepLabV3+ on the frozen feature maps, or fine-tuned with the encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.backbones.base import Encoder
from sslbench.data.base import IGNORE_INDEX, ImageSet
from sslbench.tasks.base import FINETUNE, Outputs, Task
from sslbench.tasks.heads import TaskHead, deeplab_task_head
from sslbench.tasks.metrics import confusion_matrix, mean_iou_from_confusion, pixel_accuracy_from_confusion
from sslbench.tasks.probe import ProbeConfig


class SegmentationTask(Task):
    """``probe``: a ``DeepLabV3Plus`` head with ``num_classes["mask"]`` outputs trained with
    cross-entropy that ignores ``IGNORE_INDEX`` pixels, on the frozen maps; ``finetune``: the same
    with the encoder, on flipped images and masks. Reports ``{"miou", "pixel_acc",
    "trainable_params"}`` on the test set at full image resolution; mIoU averages the classes present
    in target or prediction."""

    name = "segmentation"
    protocols = ("probe", FINETUNE)
    target = "mask"

    def head(self, protocol: str, encoder: Encoder, train: ImageSet, config: ProbeConfig) -> TaskHead:
        return deeplab_task_head(encoder.map_channels, self.num_classes(train), config.decoder_width, config.finest_stride, train.image_size)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target, ignore_index=IGNORE_INDEX)

    def metrics(self, outputs: Outputs, train: ImageSet, test: ImageSet) -> dict[str, float]:
        num_classes = self.num_classes(train)
        truth = test.targets[self.target]
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        for indices, logits in outputs:
            confusion += confusion_matrix(logits.argmax(1).cpu(), truth[indices], num_classes, IGNORE_INDEX)
        return {"miou": mean_iou_from_confusion(confusion), "pixel_acc": pixel_accuracy_from_confusion(confusion)}
