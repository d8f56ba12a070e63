"""The ``Task`` base: one flow for every task and protocol.

A task says which head a protocol trains, its loss, its fine-tuning augmentation and how test outputs
become metrics; the base trains the head on a frozen encoder's cached features (a probe) or jointly
with a copy of the encoder (``finetune``), predicts the test set and adds ``trainable_params``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch

from sslbench.backbones.base import Encoder, count_parameters
from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError
from sslbench.tasks.finetune import finetune, flip_augment
from sslbench.tasks.heads import TaskHead
from sslbench.tasks.probe import ProbeConfig, predict, seeded, train_probe

FINETUNE = "finetune"
"""The protocol that trains the encoder with the head; every other protocol keeps it frozen."""

TRAINABLE_PARAMS = "trainable_params"
"""The entry of every evaluation's result that counts the parameters its protocol trained."""

Outputs = Iterator[tuple[torch.Tensor, torch.Tensor]]
"""``(test indices, head output)`` batches, in test-set order."""


class Task:
    """Base of every downstream task.

    Subclasses set ``name``, ``protocols`` and ``target`` (the ``ImageSet`` target they need) and
    implement ``head``, ``loss`` and ``metrics``; ``augment`` (fine-tuning views) defaults to a
    horizontal flip applied to per-pixel targets too. ``evaluate`` returns the task's metrics plus
    ``trainable_params``: the head's parameters for a probe, the head's and the encoder's for
    ``finetune``.
    """

    name: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]]
    target: ClassVar[str]

    def evaluate(self, encoder: Encoder, train: ImageSet, test: ImageSet, protocol: str, config: ProbeConfig) -> dict[str, float]:
        self.check(train, test, protocol)
        with seeded(config.seed, config.device):
            head = self.head(protocol, encoder, train, config)
            targets = train.targets[self.target]
            if protocol == FINETUNE:
                encoder = finetune(head, encoder, train, targets, self.loss, self.augment, config)
                trainable = count_parameters(head.module, encoder, trainable_only=True)
            else:
                train_probe(head, encoder, train, targets, self.loss, config)
                trainable = count_parameters(head.module, trainable_only=True)
        return {**self.metrics(predict(head, encoder, test, config), train, test), TRAINABLE_PARAMS: float(trainable)}

    def check(self, train: ImageSet, test: ImageSet, protocol: str) -> None:
        """Fail early, with the fix, on an unknown protocol or a dataset without this task's target."""
        if protocol not in self.protocols:
            raise ConfigError(f"task {self.name!r} has no protocol {protocol!r}; choose one of {', '.join(self.protocols)}")
        for split in (train, test):
            if self.target not in split.targets:
                have = ", ".join(split.targets) or "none"
                raise DataError(f"dataset {split.name!r} has no {self.target!r} target needed by task {self.name!r} (it has: {have})")

    def num_classes(self, train: ImageSet) -> int:
        if self.target not in train.num_classes:
            raise DataError(f"dataset {train.name!r} does not give num_classes[{self.target!r}], needed by task {self.name!r}")
        return train.num_classes[self.target]

    def augment(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Fine-tuning views: ``sslbench.tasks.finetune.flip_augment`` unless a task needs another."""
        return flip_augment(images, targets, generator)

    def head(self, protocol: str, encoder: Encoder, train: ImageSet, config: ProbeConfig) -> TaskHead:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def metrics(self, outputs: Outputs, train: ImageSet, test: ImageSet) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError
