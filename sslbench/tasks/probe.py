"""What every protocol shares: the budget, feature caching, the one training loop, and probes.

A probe runs a frozen encoder once over the train and test images (eval mode, no grad, no
augmentation); the pooled vectors (float32) or the maps the head reads (float16, half the memory)
are cached on the CPU, and the head is then trained on the cache for many epochs at the cost of the
head alone. Fine-tuning (``sslbench.tasks.finetune``) trains through the encoder with the same loop.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sslbench.backbones.base import Encoder, Features
from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError, TrainingError
from sslbench.tasks.heads import TaskHead

PROBE_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}

ENCODER_LR_SCALE = 0.1
"""Default fine-tuning learning rate of the encoder relative to the head's: the head starts from
scratch, while the pretrained weights should move gently or their pretraining is forgotten."""


def default_device(requested: str | None = None) -> str:
    """``requested``, or ``cuda`` when a GPU is present and ``cpu`` otherwise: every probe's default device."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class ProbeConfig:
    """The budget every encoder gets on every task and protocol, so that scores are comparable.

    ``batch_size`` is used for heads on the pooled vector; heads on feature maps train and extract
    with ``dense_batch_size`` because their activations are per pixel (a stride-1 map of a 128x128
    image at width 64 is 4 MiB per image and layer). ``lr`` is the head's learning rate;
    fine-tuning trains the encoder with ``encoder_lr`` (default ``ENCODER_LR_SCALE * lr``).
    ``decoder_width`` is the channel width of the dense and conv heads; dense heads read no map finer
    than ``finest_stride``. ``optimizer`` is ``adamw`` (decoupled weight decay) or ``adam`` (L2 penalty),
    an ablation of the DDAE study.
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    encoder_lr: float | None = None
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    knn_k: int = 200
    knn_temperature: float = 0.1
    dense_batch_size: int = 32
    decoder_width: int = 64
    finest_stride: int = 1
    optimizer: str = "adamw"

    def __post_init__(self) -> None:
        if self.optimizer not in PROBE_OPTIMIZERS:
            raise ConfigError(f"probe optimizer {self.optimizer!r} is not allowed; use one of {', '.join(PROBE_OPTIMIZERS)}")
        for name in ("epochs", "batch_size", "knn_k", "dense_batch_size", "decoder_width", "finest_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ProbeConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "knn_temperature", "encoder_lr"):
            value = getattr(self, name)
            if name == "encoder_lr" and value is None:
                continue
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"ProbeConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"ProbeConfig.weight_decay must be >= 0, got {self.weight_decay!r}")

    @property
    def encoder_learning_rate(self) -> float:
        return self.encoder_lr if self.encoder_lr is not None else ENCODER_LR_SCALE * self.lr

    def batch_size_for(self, head: TaskHead) -> int:
        return self.dense_batch_size if head.strides else self.batch_size


@dataclass
class CachedFeatures:
    """An encoder's features of a whole image set, on the CPU.

    ``pooled``: (N, D) float32, or None when not extracted. ``maps``: stride -> (N, C, h, w) float16
    (empty when not extracted). ``image_size``: (H, W) of the images, the size dense heads predict at.
    """

    pooled: torch.Tensor | None
    maps: dict[int, torch.Tensor]
    image_size: tuple[int, int]

    def __len__(self) -> int:
        return len(self.pooled) if self.pooled is not None else len(next(iter(self.maps.values())))

    @property
    def map_channels(self) -> dict[int, int]:
        return {stride: int(m.shape[1]) for stride, m in self.maps.items()}

    def batch(self, indices: torch.Tensor, device: str | torch.device) -> Features:
        """Rows ``indices`` as float32 ``Features`` on ``device``."""
        pooled = self.pooled[indices].to(device) if self.pooled is not None else None
        maps = {stride: m[indices].to(device, torch.float32) for stride, m in self.maps.items()}
        return Features(pooled=pooled, maps=maps)


@contextlib.contextmanager
def frozen(encoder: Encoder, device: str | torch.device) -> Iterator[Encoder]:
    """``encoder`` in eval mode on ``device`` inside the block; its mode and device are restored afterwards,
    so extraction can be called in the middle of pretraining."""
    parameter = next(iter(encoder.parameters()), None)
    home = parameter.device if parameter is not None else None
    was_training = encoder.training
    encoder.eval().to(device)
    try:
        yield encoder
    finally:
        encoder.train(was_training)
        if home is not None:
            encoder.to(home)


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    images: ImageSet,
    *,
    batch_size: int,
    device: str | torch.device,
    pooled: bool = True,
    maps: bool = False,
    strides: Collection[int] | None = None,
) -> CachedFeatures:
    """Run a frozen ``encoder`` once over ``images`` (eval mode, no grad, batched on ``device``),
    keeping the pooled vector and/or the maps (only those at ``strides`` when given).

    The encoder's train/eval mode and device are restored afterwards, so extraction can be called
    in the middle of pretraining.
    """
    pooled_parts: list[torch.Tensor] = []
    map_parts: dict[int, list[torch.Tensor]] = {}
    with frozen(encoder, device):
        for batch in images.images.split(batch_size):
            features = encoder(batch.to(device).float().div_(255))
            if pooled:
                pooled_parts.append(features.pooled.float().cpu())
            if maps:
                if not features.maps:
                    raise ConfigError(f"{type(encoder).__name__} returned no feature maps; dense tasks need an encoder with maps")
                for stride, feature_map in features.maps.items():
                    if strides is None or stride in strides:
                        map_parts.setdefault(stride, []).append(feature_map.to("cpu", torch.float16))
    return CachedFeatures(
        pooled=torch.cat(pooled_parts) if pooled else None,
        maps={stride: torch.cat(parts) for stride, parts in sorted(map_parts.items())},
        image_size=images.image_size,
    )


def extract_for(head: TaskHead, encoder: Encoder, images: ImageSet, config: ProbeConfig) -> CachedFeatures:
    """The features ``head`` reads (pooled vector or its maps) of every image."""
    return extract_features(encoder, images, batch_size=config.batch_size_for(head), device=config.device,
                            pooled=not head.strides, maps=bool(head.strides), strides=head.strides)


@contextlib.contextmanager
def seeded(seed: int, device: str | torch.device = "cpu") -> Iterator[None]:
    """Seed torch's generators inside the block only (the CPU one, and ``device``'s when it is a GPU),
    leaving the caller's random state as it was."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def _batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    batches = list(torch.randperm(num_samples, generator=generator).split(batch_size))
    if _drops_last(num_samples, batch_size):
        batches.pop()
    return batches


def _drops_last(num_samples: int, batch_size: int) -> bool:
    # A lone last sample would make BatchNorm fail in training mode; it is reshuffled next epoch.
    return num_samples > batch_size and num_samples % batch_size == 1


BatchLoss = Callable[[torch.Tensor, int], torch.Tensor]
"""The loss of one mini-batch given its sample indices and the global step number."""


def train_loop(parameter_groups: list[dict[str, Any]], batch_loss: BatchLoss, num_samples: int, batch_size: int, config: ProbeConfig) -> float:
    """The one training loop of every protocol: AdamW or ``config.optimizer`` (each group with its own ``lr``), cosine
    learning rate over all steps, shuffled mini-batches from a ``torch.Generator`` seeded with
    ``config.seed``. Returns the mean loss of the last epoch.
    """
    if num_samples < 2:
        raise DataError(f"training a head needs at least 2 training images, got {num_samples}")
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(num_samples / batch_size) - _drops_last(num_samples, batch_size)
    optimizer = PROBE_OPTIMIZERS[config.optimizer](parameter_groups, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    epoch_loss, step = math.nan, 0
    for epoch in range(config.epochs):
        # The loss is summed where it is computed and read once an epoch: reading it at every step would make the
        # host wait for the device at every step. A non-finite loss is caught at the epoch's end (only the head,
        # in memory, has trained on it).
        total, seen = 0.0, 0
        for indices in _batches(num_samples, batch_size, generator):
            loss = batch_loss(indices, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total = total + loss.detach().float() * len(indices)
            seen += len(indices)
            step += 1
        epoch_loss = float(total) / seen
        if not math.isfinite(epoch_loss):
            raise TrainingError(f"training loss became {epoch_loss} in epoch {epoch} (features may overflow float16 or lr={config.lr} is too high)")
    return epoch_loss


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def train_probe(head: TaskHead, encoder: Encoder, train: ImageSet, targets: torch.Tensor, loss_fn: Loss, config: ProbeConfig) -> float:
    """Train ``head`` in place on the cached features of the frozen ``encoder``; return the last
    epoch's mean loss. Only the head's parameters are in the optimizer."""
    return fit_cached(head, extract_for(head, encoder, train, config), targets, loss_fn, config)


def fit_cached(head: TaskHead, features: CachedFeatures, targets: torch.Tensor, loss_fn: Loss, config: ProbeConfig) -> float:
    """Train ``head`` in place on already cached ``features`` (one row per target); return the last
    epoch's mean loss. Studies that read several heads from one extraction call this directly."""
    head.module.to(config.device).train()

    def batch_loss(indices: torch.Tensor, step: int) -> torch.Tensor:
        output = head(features.batch(indices, config.device), features.image_size)
        return loss_fn(output, targets[indices].to(config.device))

    groups = [{"params": list(head.module.parameters()), "lr": config.lr}]
    loss = train_loop(groups, batch_loss, len(features), config.batch_size_for(head), config)
    head.module.eval()
    return loss


def predict(head: TaskHead, encoder: Encoder, images: ImageSet, config: ProbeConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices, head output)`` over ``images`` in order (encoder and head in eval mode, outputs at
    the images' size); tasks reduce each batch to metric statistics so dense outputs are never all
    held at once."""
    return predict_cached(head, extract_for(head, encoder, images, config), config)


@torch.no_grad()
def predict_cached(head: TaskHead, features: CachedFeatures, config: ProbeConfig) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``predict`` on already cached ``features``: ``(indices, head output)`` batches in row order."""
    head.module.to(config.device).eval()
    for indices in torch.arange(len(features)).split(config.batch_size_for(head)):
        yield indices, head(features.batch(indices, config.device), features.image_size)
