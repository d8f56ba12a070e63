"""Fine-tuning: a copy of the encoder trained jointly with a task head on augmented images.

The caller's encoder is deep-copied, so evaluating a checkpoint never changes it. The copy is
unfrozen and trained in train mode (BatchNorm statistics adapt to the task) with its own learning
rate (``ProbeConfig.encoder_learning_rate``), the head with ``ProbeConfig.lr``, in the same loop and
for the same epochs as a probe, so every encoder gets the same budget. Views come from a generator
seeded with (seed, step), so a fine-tune is as reproducible as a probe.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from sslbench.augment import ViewConfig, augment, host_to_device, step_generator
from sslbench.backbones.base import Encoder
from sslbench.data.base import ImageSet
from sslbench.tasks.heads import TaskHead
from sslbench.tasks.probe import Loss, ProbeConfig, train_loop

Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
"""``(uint8 images (B, 3, H, W), targets, CPU generator) -> (float images in [0, 1], targets)``."""

CLASSIFICATION_CROP_SCALE = (0.5, 1.0)
"""Light random-resized-crop for fine-tuning a classifier: the pretraining crops (down to 8% of the
image) are made to learn invariances, not to fit labels on small images."""


def flip_augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Horizontal flip of half the images; per-pixel targets (N, H, W) (masks, depth) are flipped with
    their image, per-image targets (classes, counts) are unchanged by a flip."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(host_to_device(flip, images.device).view(-1, 1, 1, 1), images.flip(-1), images)
    if targets.ndim == 3:
        targets = torch.where(host_to_device(flip, targets.device).view(-1, 1, 1), targets.flip(-1), targets)
    return images.float().div(255), targets


def crop_flip_augment(images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random resized crop (``CLASSIFICATION_CROP_SCALE``) + horizontal flip, no colour changes, back to
    the images' (shorter) side, for per-image labels that a crop keeps (classes)."""
    view = ViewConfig(size=min(images.shape[-2:]), crop_scale=CLASSIFICATION_CROP_SCALE, jitter_p=0.0, grayscale_p=0.0)
    return augment(images, view, generator), targets


def finetune(head: TaskHead, encoder: Encoder, train: ImageSet, targets: torch.Tensor, loss_fn: Loss, augmentation: Augment,
             config: ProbeConfig) -> Encoder:
    """Train a deep copy of ``encoder`` and ``head`` (in place) jointly on augmented ``train`` images;
    return the fine-tuned copy in eval mode. ``encoder`` itself is left untouched."""
    tuned = copy.deepcopy(encoder).to(config.device).train().requires_grad_(True)
    head.module.to(config.device).train()

    def batch_loss(indices: torch.Tensor, step: int) -> torch.Tensor:
        images = host_to_device(train.images[indices], config.device)
        images, batch_targets = augmentation(images, targets[indices], step_generator(config.seed, step))
        output = head(tuned(images), tuple(images.shape[-2:]))
        return loss_fn(output, host_to_device(batch_targets, config.device))

    groups = [
        {"params": list(tuned.parameters()), "lr": config.encoder_learning_rate},
        {"params": list(head.module.parameters()), "lr": config.lr},
    ]
    train_loop(groups, batch_loss, len(train), config.batch_size_for(head), config)
    head.module.eval()
    return tuned.eval()
