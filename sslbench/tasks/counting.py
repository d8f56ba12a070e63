"""Object counting as classification of the count id from frozen pooled features."""

from __future__ import annotations

from sslbench.data.base import ImageSet
from sslbench.tasks.metrics import count_mae, top1
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, Task, linear_probe


class CountingTask(Task):
    """``linear``: a ``LinearHead`` picks one of ``num_classes["count"]`` count ids. Reports
    ``{"accuracy", "mae"}``, mae being the mean |predicted count id - true count id|."""

    name = "counting"
    protocols = ("linear",)
    target = "count"

    def score(
        self, train_features: CachedFeatures, train: ImageSet, test_features: CachedFeatures, test: ImageSet, protocol: str, config: ProbeConfig
    ) -> dict[str, float]:
        predicted = linear_probe(train_features, train.targets[self.target], test_features, self.num_classes(train), config)
        truth = test.targets[self.target]
        return {"accuracy": top1(predicted, truth), "mae": count_mae(predicted, truth)}
