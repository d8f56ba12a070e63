"""Downstream tasks: a head trained on an encoder's features (frozen, or fine-tuned with it),
returning named metrics.

``TASKS`` maps a task name to its class; every task has ``evaluate(encoder, train, test, protocol,
config) -> dict[str, float]`` (its metrics plus ``trainable_params``). A new task is one module with a
``Task`` subclass plus one line here.
"""

from sslbench.tasks.base import FINETUNE, TRAINABLE_PARAMS, Task
from sslbench.tasks.classification import ClassificationTask
from sslbench.tasks.counting import CountingTask
from sslbench.tasks.depth import DepthTask
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, default_device, extract_features
from sslbench.tasks.segmentation import SegmentationTask

TASKS: dict[str, type[Task]] = {
    task.name: task for task in (ClassificationTask, CountingTask, DepthTask, SegmentationTask)
}

__all__ = [
    "FINETUNE",
    "TASKS",
    "TRAINABLE_PARAMS",
    "CachedFeatures",
    "ClassificationTask",
    "CountingTask",
    "DepthTask",
    "ProbeConfig",
    "default_device",
    "SegmentationTask",
    "Task",
    "extract_features",
]
