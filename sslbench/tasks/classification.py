"""Image classification: weighted kNN, a linear probe or fine-tuning, on all labels or 1% / 10%, and
SimCLRv2's distillation of a few-label fine-tuned teacher into a student on all images without labels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sslbench.backbones.base import Encoder, count_parameters
from sslbench.data.base import ImageSet
from sslbench.data.subsets import few_label_indices
from sslbench.tasks.base import FINETUNE, TRAINABLE_PARAMS, Outputs, Task
from sslbench.tasks.distill import distill
from sslbench.tasks.finetune import crop_flip_augment, finetune
from sslbench.tasks.heads import TaskHead, linear_task_head
from sslbench.tasks.metrics import knn_predict, top1
from sslbench.tasks.probe import ProbeConfig, extract_features, predict, seeded

FEW_LABEL_FRACTIONS = {"1pct": 0.01, "10pct": 0.10}
"""Semi-supervised splits of SimCLR/SimCLRv2 (Chen et al. 2020): 1% and 10% of the training labels."""

DISTILL = "distill"
"""The protocol base that distils a fine-tuned teacher into a student (``distill-1pct``, ``distill-10pct``)."""


class ClassificationTask(Task):
    """``knn``: weighted kNN vote (k = ``config.knn_k``, T = ``config.knn_temperature``, cosine) of
    the test images among the training images. ``linear``: a ``LinearHead`` on the frozen pooled
    vector, trained with cross-entropy. ``finetune``: the same head trained with the encoder on random
    crops and flips. ``linear-1pct`` ... ``finetune-10pct``: the same on a class-balanced seeded
    subset of the training labels (``few_label_indices``). All report ``{"top1", "trainable_params"}``.
    ``distill-1pct`` / ``distill-10pct``: SimCLRv2's three stages after pretraining (``distill_top1``).
    """

    name = "classification"
    protocols = ("knn", "linear", FINETUNE,
                 *(f"{base}-{share}" for base in ("linear", FINETUNE, DISTILL) for share in FEW_LABEL_FRACTIONS))
    target = "class"

    def evaluate(self, encoder: Encoder, train: ImageSet, test: ImageSet, protocol: str, config: ProbeConfig) -> dict[str, float]:
        self.check(train, test, protocol)
        protocol, _, share = protocol.partition("-")
        labelled = train
        if share:
            labelled = train.subset(few_label_indices(train.targets[self.target], FEW_LABEL_FRACTIONS[share], config.seed))
        if protocol == "knn":
            return {"top1": self.knn_top1(encoder, labelled, test, config), TRAINABLE_PARAMS: 0.0}
        if protocol == DISTILL:
            return self.distill_top1(encoder, labelled, train, test, config)
        return super().evaluate(encoder, labelled, test, protocol, config)

    def distill_top1(self, encoder: Encoder, labelled: ImageSet, unlabelled: ImageSet, test: ImageSet,
                     config: ProbeConfig) -> dict[str, float]:
        """SimCLRv2 (Chen et al. 2020) after pretraining: fine-tune a teacher (a copy of ``encoder`` + a
        linear head) on ``labelled`` as ``finetune`` does, then distil it (``sslbench.tasks.distill``) on
        every ``unlabelled`` image, labels unused, into a student of the same architecture initialised
        from the same pretrained ``encoder`` (self-distillation; not from the teacher, so the student
        learns the task only through the teacher's soft labels) with a fresh head.

        Returns the student's ``top1``, the teacher's as ``teacher_top1`` (so the gain of distillation can
        be read off) and the student's ``trainable_params``.
        """
        images_only = ImageSet(name=unlabelled.name, images=unlabelled.images)  # the labels are dropped, not just unread
        with seeded(config.seed, config.device):
            teacher_head = self.head(FINETUNE, encoder, labelled, config)
            teacher = finetune(teacher_head, encoder, labelled, labelled.targets[self.target], self.loss, self.augment, config)
            student_head = self.head(FINETUNE, encoder, labelled, config)
            student = distill(student_head, encoder, teacher_head, teacher, images_only, self.augment, config)
        teacher_top1 = self.metrics(predict(teacher_head, teacher, test, config), labelled, test)["top1"]
        return {**self.metrics(predict(student_head, student, test, config), unlabelled, test), "teacher_top1": teacher_top1,
                TRAINABLE_PARAMS: float(count_parameters(student_head.module, student, trainable_only=True))}

    def knn_top1(self, encoder: Encoder, train: ImageSet, test: ImageSet, config: ProbeConfig) -> float:
        bank, queries = (extract_features(encoder, split, batch_size=config.batch_size, device=config.device).pooled for split in (train, test))
        predicted = knn_predict(bank.to(config.device), train.targets[self.target].to(config.device), queries.to(config.device),
                                self.num_classes(train), k=config.knn_k, temperature=config.knn_temperature).cpu()
        return top1(predicted, test.targets[self.target])

    def head(self, protocol: str, encoder: Encoder, train: ImageSet, config: ProbeConfig) -> TaskHead:
        return linear_task_head(encoder.pooled_dim, self.num_classes(train))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def augment(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return crop_flip_augment(images, targets, generator)

    def metrics(self, outputs: Outputs, train: ImageSet, test: ImageSet) -> dict[str, float]:
        predicted = torch.cat([logits.argmax(1).cpu() for _, logits in outputs])
        return {"top1": top1(predicted, test.targets[self.target])}
