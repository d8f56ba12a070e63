"""What every task shares: the probe budget, the ``Task`` base, feature caching and the one
head-training loop.

A frozen encoder is run once over the train and test images (eval mode, no grad, no augmentation);
its pooled vectors (float32) and feature maps (float16, half the memory) are cached on the CPU, and
heads are then trained on the cache for many epochs at the cost of the head alone.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from sslbench.backbones.base import Encoder, Features
from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError, TrainingError
from sslbench.tasks.heads import DenseDecoder, LinearHead


@dataclass
class ProbeConfig:
    """The budget every encoder gets on every task, so that scores are comparable.

    ``batch_size`` is used for pooled-feature heads; dense heads train and extract with
    ``dense_batch_size`` because their activations are per pixel (a stride-1 map of a 128x128 image
    at width 64 is 4 MiB per image and layer).
    """

    epochs: int = 30
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    device: str = "cpu"
    knn_k: int = 200
    knn_temperature: float = 0.1
    dense_batch_size: int = 32
    decoder_width: int = 64
    finest_stride: int = 1

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "knn_k", "dense_batch_size", "decoder_width", "finest_stride"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ProbeConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "knn_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"ProbeConfig.{name} must be a positive number, got {value!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ConfigError(f"ProbeConfig.weight_decay must be >= 0, got {self.weight_decay!r}")


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


@torch.no_grad()
def extract_features(
    encoder: Encoder,
    images: ImageSet,
    *,
    batch_size: int,
    device: str | torch.device,
    pooled: bool = True,
    maps: bool = False,
) -> CachedFeatures:
    """Run a frozen ``encoder`` once over ``images`` (eval mode, no grad, batched on ``device``).

    The encoder's train/eval mode and device are restored afterwards, so extraction can be called
    in the middle of pretraining.
    """
    parameter = next(iter(encoder.parameters()), None)
    home = parameter.device if parameter is not None else None
    was_training = encoder.training
    encoder.eval().to(device)
    pooled_parts: list[torch.Tensor] = []
    map_parts: dict[int, list[torch.Tensor]] = {}
    try:
        for batch in images.images.split(batch_size):
            features = encoder(batch.to(device).float().div_(255))
            if pooled:
                pooled_parts.append(features.pooled.float().cpu())
            if maps:
                if not features.maps:
                    raise ConfigError(f"{type(encoder).__name__} returned no feature maps; dense tasks need an encoder with maps")
                for stride, feature_map in features.maps.items():
                    map_parts.setdefault(stride, []).append(feature_map.to("cpu", torch.float16))
    finally:
        encoder.train(was_training)
        if home is not None:
            encoder.to(home)
    return CachedFeatures(
        pooled=torch.cat(pooled_parts) if pooled else None,
        maps={stride: torch.cat(parts) for stride, parts in sorted(map_parts.items())},
        image_size=images.image_size,
    )


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside the block only, leaving the caller's random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


HeadApply = Callable[[nn.Module, Features], torch.Tensor]
"""How a head consumes a feature batch, e.g. ``lambda head, f: head(f.pooled)``."""


def _batches(num_samples: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    batches = list(torch.randperm(num_samples, generator=generator).split(batch_size))
    if _drops_last(num_samples, batch_size):
        batches.pop()
    return batches


def _drops_last(num_samples: int, batch_size: int) -> bool:
    # A lone last sample would make BatchNorm fail in training mode; it is reshuffled next epoch.
    return num_samples > batch_size and num_samples % batch_size == 1


def train_head(
    head: nn.Module,
    apply: HeadApply,
    features: CachedFeatures,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: ProbeConfig,
    batch_size: int,
) -> float:
    """The one head-training loop: AdamW, cosine learning rate over all steps, shuffled mini-batches
    from a ``torch.Generator`` seeded with ``config.seed``. Trains ``head`` in place on
    ``config.device`` and returns the mean loss of the last epoch.
    """
    if len(features) < 2:
        raise DataError(f"a probe needs at least 2 training images, got {len(features)}")
    head.to(config.device).train()
    generator = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(features) / batch_size) - _drops_last(len(features), batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    epoch_loss = math.nan
    for _ in range(config.epochs):
        total, seen = 0.0, 0
        for indices in _batches(len(features), batch_size, generator):
            output = apply(head, features.batch(indices, config.device))
            loss = loss_fn(output, targets[indices].to(config.device))
            if not torch.isfinite(loss):
                raise TrainingError(f"probe loss became {loss.item()} (features may overflow float16 or lr={config.lr} is too high)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(indices)
            seen += len(indices)
        epoch_loss = total / seen
    head.eval()
    return epoch_loss


@torch.no_grad()
def predict_batches(
    head: nn.Module, apply: HeadApply, features: CachedFeatures, config: ProbeConfig, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(indices, head output)`` over ``features`` in order, head in eval mode on ``config.device``;
    tasks reduce each batch to metric statistics so dense outputs are never all held at once."""
    head.to(config.device).eval()
    for indices in torch.arange(len(features)).split(batch_size):
        yield indices, apply(head, features.batch(indices, config.device))


def _apply_linear(head: nn.Module, features: Features) -> torch.Tensor:
    return head(features.pooled)


def linear_probe(
    train: CachedFeatures, train_labels: torch.Tensor, test: CachedFeatures, num_classes: int, config: ProbeConfig
) -> torch.Tensor:
    """Train a ``LinearHead`` with cross-entropy on pooled training features; return the predicted
    class id of every test row, (N_test,) int64 on the CPU."""
    with seeded(config.seed):
        head = LinearHead(train.pooled.shape[1], num_classes)
    train_head(head, _apply_linear, train, train_labels, nn.functional.cross_entropy, config, config.batch_size)
    return torch.cat([out.argmax(1).cpu() for _, out in predict_batches(head, _apply_linear, test, config, config.batch_size)])


def dense_probe(
    train: CachedFeatures,
    train_targets: torch.Tensor,
    test: CachedFeatures,
    out_channels: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: ProbeConfig,
    output_bias: float | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Train a ``DenseDecoder`` on the training maps, then yield ``(indices, output)`` over the
    test set, outputs at the test images' full resolution. ``output_bias`` starts the last layer's
    bias at a sensible value (e.g. the mean log-depth) so training does not spend its budget there.
    """
    # Maps finer than ``finest_stride`` are left out (the decoder's cost grows with its finest
    # resolution); an encoder with no map that coarse keeps its coarsest one.
    strides = [s for s in train.map_channels if s >= config.finest_stride] or [max(train.map_channels)]
    with seeded(config.seed):
        decoder = DenseDecoder({s: train.map_channels[s] for s in strides}, out_channels, width=config.decoder_width)
        if output_bias is not None:
            nn.init.constant_(decoder.out.bias, output_bias)

    def apply_train(head: nn.Module, features: Features) -> torch.Tensor:
        return head({s: features.maps[s] for s in strides}, train.image_size)

    def apply_test(head: nn.Module, features: Features) -> torch.Tensor:
        return head({s: features.maps[s] for s in strides}, test.image_size)

    train_head(decoder, apply_train, train, train_targets, loss_fn, config, config.dense_batch_size)
    yield from predict_batches(decoder, apply_test, test, config, config.dense_batch_size)


class Task:
    """Base of every downstream task: ``evaluate`` = extract frozen features + ``score``.

    Subclasses set ``name``, ``protocols`` and ``target`` (the ``ImageSet`` target they need) and
    implement ``score``. ``uses_maps`` says whether the head reads the feature maps (dense tasks)
    or the pooled vector. Call ``extract`` and ``score`` separately to score several protocols on
    one extraction.
    """

    name: ClassVar[str]
    protocols: ClassVar[tuple[str, ...]]
    target: ClassVar[str]
    uses_maps: ClassVar[bool] = False

    def evaluate(self, encoder: Encoder, train: ImageSet, test: ImageSet, protocol: str, config: ProbeConfig) -> dict[str, float]:
        self.check(train, test, protocol)
        train_features, test_features = self.extract(encoder, train, test, config)
        return self.score(train_features, train, test_features, test, protocol, config)

    def extract(self, encoder: Encoder, train: ImageSet, test: ImageSet, config: ProbeConfig) -> tuple[CachedFeatures, CachedFeatures]:
        batch_size = config.dense_batch_size if self.uses_maps else config.batch_size
        options = dict(batch_size=batch_size, device=config.device, pooled=not self.uses_maps, maps=self.uses_maps)
        return extract_features(encoder, train, **options), extract_features(encoder, test, **options)

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

    def score(
        self, train_features: CachedFeatures, train: ImageSet, test_features: CachedFeatures, test: ImageSet, protocol: str, config: ProbeConfig
    ) -> dict[str, float]:  # pragma: no cover - abstract
        raise NotImplementedError
