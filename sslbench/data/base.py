"""The in-memory dataset type every loader returns.

Small-image SSL datasets (CIFAR, the procedural scenes, the task subsets) fit in memory as one uint8
tensor, which lets the training loop gather a batch with one indexing op and move it to the device
as uint8 (4x less traffic than float) before the batched augmentation runs there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = 255
"""Mask value of pixels that no metric or loss counts (Pet trimap borders, outside a crop)."""


@dataclass
class ImageSet:
    """Images and whatever labels the dataset has.

    ``images`` is ``(N, 3, H, W)`` uint8 RGB. ``targets`` maps a label name to a tensor with N rows:
    ``"class"`` (N,) int64, ``"count"`` (N,) int64 (number of objects), ``"mask"`` (N, H, W) int64
    with ``IGNORE_INDEX`` for ignored pixels, ``"depth"`` (N, H, W) float32 with 0 where depth is
    unknown. ``num_classes`` gives the number of classes of each categorical target.
    """

    name: str
    images: torch.Tensor
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    num_classes: dict[str, int] = field(default_factory=dict)
    class_names: list[str] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"{self.name}: images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} {self.images.dtype}")
        for key, value in self.targets.items():
            if len(value) != len(self.images):
                raise ValueError(f"{self.name}: target {key!r} has {len(value)} rows for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[2]), int(self.images.shape[3])

    def subset(self, indices: torch.Tensor | slice) -> ImageSet:
        """The rows at ``indices``, sharing label metadata."""
        return ImageSet(
            name=self.name,
            images=self.images[indices],
            targets={k: v[indices] for k, v in self.targets.items()},
            num_classes=dict(self.num_classes),
            class_names=self.class_names,
        )

    def limit(self, n: int | None) -> ImageSet:
        """The first ``n`` rows (official order), or everything when ``n`` is None."""
        return self if n is None or n >= len(self) else self.subset(slice(0, n))
