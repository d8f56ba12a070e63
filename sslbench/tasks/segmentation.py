"""Semantic segmentation from frozen multi-scale feature maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.data.base import IGNORE_INDEX, ImageSet
from sslbench.tasks.metrics import confusion_matrix, mean_iou_from_confusion, pixel_accuracy_from_confusion
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, Task, dense_probe


def _segmentation_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, mask, ignore_index=IGNORE_INDEX)


class SegmentationTask(Task):
    """``probe``: a ``DenseDecoder`` with ``num_classes["mask"]`` outputs trained with cross-entropy
    that ignores ``IGNORE_INDEX`` pixels. Reports ``{"miou", "pixel_acc"}`` on the test set at full
    image resolution; mIoU averages the classes present in target or prediction."""

    name = "segmentation"
    protocols = ("probe",)
    target = "mask"
    uses_maps = True

    def score(
        self, train_features: CachedFeatures, train: ImageSet, test_features: CachedFeatures, test: ImageSet, protocol: str, config: ProbeConfig
    ) -> dict[str, float]:
        num_classes = self.num_classes(train)
        truth = test.targets[self.target]
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
        for indices, logits in dense_probe(train_features, train.targets[self.target], test_features, num_classes, _segmentation_loss, config):
            confusion += confusion_matrix(logits.argmax(1).cpu(), truth[indices], num_classes, IGNORE_INDEX)
        return {"miou": mean_iou_from_confusion(confusion), "pixel_acc": pixel_accuracy_from_confusion(confusion)}
