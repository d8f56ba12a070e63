"""Few-label subsets: the class-balanced, seeded label splits of semi-supervised evaluation."""

from __future__ import annotations

import torch

from sslbench.errors import ConfigError, DataError


def few_label_indices(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted int64 indices of a class-balanced subset with about ``fraction`` of ``labels``.

    Every class present gets the same share, ``round(fraction * N / classes)`` images and at least
    one, drawn without replacement by a generator seeded with ``seed`` (a class with fewer images
    gives all it has). Class-balanced like the 1% and 10% ImageNet subsets of SimCLR and SimCLRv2
    (Chen et al. 2020), which keep about 13 and 128 images per class.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"few-label fraction={fraction} is out of range; use a value in (0, 1], e.g. 0.01 or 0.1")
    if labels.ndim != 1 or len(labels) == 0:
        raise DataError(f"few-label subsets need one class label per image, got labels of shape {tuple(labels.shape)}")
    classes = labels.unique()
    per_class = max(1, round(fraction * len(labels) / len(classes)))
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for label in classes:
        members = (labels == label).nonzero().squeeze(1)
        chosen.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return torch.cat(chosen).sort().values
