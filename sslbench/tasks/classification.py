"""Image classification on frozen pooled features: weighted kNN or a linear probe."""

from __future__ import annotations

from sslbench.data.base import ImageSet
from sslbench.tasks.metrics import knn_predict, top1
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, Task, linear_probe


class ClassificationTask(Task):
    """``knn``: weighted kNN vote (k = ``config.knn_k``, T = ``config.knn_temperature``, cosine) of
    the test images among the training images. ``linear``: a ``LinearHead`` trained with
    cross-entropy. Both report ``{"top1"}``."""

    name = "classification"
    protocols = ("knn", "linear")
    target = "class"

    def score(
        self, train_features: CachedFeatures, train: ImageSet, test_features: CachedFeatures, test: ImageSet, protocol: str, config: ProbeConfig
    ) -> dict[str, float]:
        num_classes = self.num_classes(train)
        labels = train.targets[self.target]
        if protocol == "knn":
            predicted = knn_predict(
                train_features.pooled.to(config.device),
                labels.to(config.device),
                test_features.pooled.to(config.device),
                num_classes,
                k=config.knn_k,
                temperature=config.knn_temperature,
            ).cpu()
        else:
            predicted = linear_probe(train_features, labels, test_features, num_classes, config)
        return {"top1": top1(predicted, test.targets[self.target])}
