"""The thin engine-facing base of every pretraining method.

A method subclasses ``PretrainMethod``, declares its hyper-parameters as an ``Options`` dataclass,
and implements ``training_loss`` (views + loss on a uint8 batch). Everything else (optimiser, LR
schedule, per-step seeding that makes resume exact, NaN checks, logging) lives here once. Methods
never see the device count: Lightning's strategy runs them on CPU, one GPU or many nodes.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from sslbench.augment import ViewConfig, ViewMaker, step_generator
from sslbench.backbones import Encoder, build_encoder
from sslbench.config import check_range
from sslbench.engine import split_batch
from sslbench.errors import ConfigError, TrainingError
from sslbench.optim import LARS


@dataclass
class TrainConfig:
    """Optimisation settings shared by all methods; each method may change the defaults."""

    epochs: int = 15
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 0.0
    final_lr_scale: float = 0.0
    """The cosine schedule ends at ``lr * final_lr_scale`` (0: the usual decay to 0; 1: a constant lr after warm-up).
    Methods without negatives learn from a moving target, and on short schedules they lose most while the lr decays
    (BYOL on C10-mini, methods_c10_mini.md), so a schedule may stop short of 0."""
    seed: int = 0
    legacy: ClassVar[dict[str, Any]] = {"final_lr_scale": 0.0}
    """What checkpoints from before a setting existed trained with (``engine.check_resume_settings``)."""

    @classmethod
    def keys(cls) -> frozenset[str]:
        """The names a run may set: the dataclass fields (the ClassVar ``legacy`` is not a setting). ``--set KEY=VALUE``
        and bench configs route a key here when it is one of these, else to the method's options."""
        return frozenset(field.name for field in dataclasses.fields(cls))

    def validate(self) -> None:
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 2)
        check_range("lr", self.lr, 0.0)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("warmup_epochs", self.warmup_epochs, 0.0)
        check_range("final_lr_scale", self.final_lr_scale, 0.0, 1.0)
        if not all(0.0 <= beta < 1.0 for beta in self.betas):
            raise ConfigError(f"option betas={self.betas} is out of range; use two values in [0, 1), e.g. betas=0.9,0.95")
        if self.optimizer not in ("sgd", "lars", "adamw", "adam"):
            raise ConfigError(f"option optimizer={self.optimizer!r} is not allowed; use one of sgd, lars, adamw, adam")


def simclr_view(size: int) -> ViewConfig:
    """The SimCLR CIFAR recipe (crop 0.08-1, flip, jitter 0.8/0.8/0.8/0.2 p 0.8, grey 0.2, no blur)."""
    return ViewConfig(size=size)


class PretrainMethod(L.LightningModule):
    """Base LightningModule: an encoder plus whatever heads the method adds.

    Subclasses set ``name``, ``Options`` and optionally ``train_defaults`` / ``default_backbone``
    (or ``derived_train_defaults`` for defaults that depend on the backbone or the batch size),
    build their heads in ``build`` and return ``(loss, logs)`` from ``training_loss``.
    """

    name: ClassVar[str]
    Options: ClassVar[type]
    train_defaults: ClassVar[dict[str, Any]] = {}
    default_backbone: ClassVar[dict[str, Any]] = {"backbone": "resnet18", "width": 1.0}
    channels_last: ClassVar[bool] = True
    """Whether the engine puts the model in channels_last, on CPU and GPU alike (fast for BatchNorm convnets, slow for GroupNorm)."""
    needs_masks: ClassVar[bool] = False
    """Whether batches carry per-image segment masks (DetCon): the engine then gets them once from
    ``dataset_masks``, batches ``(images, masks)`` together and calls ``masked_training_loss``."""

    def __init__(self, backbone: dict[str, Any], options: Any, train: TrainConfig, image_size: int, steps_per_epoch: int):
        super().__init__()
        self.backbone_spec = dict(backbone)
        self.options = options
        self.train_config = train
        self.image_size = image_size
        self.steps_per_epoch = steps_per_epoch
        self.save_hyperparameters({
            "method": self.name, "backbone": self.backbone_spec, "options": dataclasses.asdict(options),
            "train": dataclasses.asdict(train), "image_size": image_size, "steps_per_epoch": steps_per_epoch,
        })
        self.encoder = self.build_encoder()
        self.build()
        self._unchecked_loss: tuple[torch.Tensor, int, int] | None = None

    # --- for subclasses -------------------------------------------------------------------------
    @classmethod
    def derived_train_defaults(cls, backbone: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
        """Defaults computed from the backbone spec and the other settings (``train``: class defaults plus
        the user's values), e.g. AdamW for a ViT or a learning rate scaled with the batch size. The engine
        applies them to every key the user did not set."""
        return {}

    def build_encoder(self) -> Encoder:
        return build_encoder(self.backbone_spec)

    def build(self) -> None:
        """Create heads, target networks, queues."""

    def initialise_from_data(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Compute data-dependent state (iGPT's colour palette) from the uint8 training images (N, 3, H, W).

        The engine calls it once, before the first step of a new run, and not on resume: whatever it
        computes must be kept in buffers, so that checkpoints restore it instead of recomputing it.
        """

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        raise NotImplementedError

    @classmethod
    def dataset_masks(cls, options: Any, images: torch.Tensor, given: torch.Tensor | None, cache_dir: Path) -> torch.Tensor:
        """For ``needs_masks`` methods: uint8 segment ids (N, H, W) of every training image, computed once.

        ``given`` is the dataset's ground-truth ``mask`` target when it has one; ``cache_dir`` is where
        masks that are costly to compute may be cached between runs.
        """
        raise NotImplementedError

    def masked_training_loss(self, images: torch.Tensor, masks: torch.Tensor,
                             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """``training_loss`` of a ``needs_masks`` method: the batch's images and their masks (B, H, W)."""
        raise NotImplementedError

    def export_meta(self) -> dict[str, Any]:
        """Entries the exported encoder's ``encoder.json`` records beyond method and options, e.g. a
        ``label`` under which evaluation rows list the encoder (DetCon's ``detcon_s[fh]``)."""
        return {}

    def after_optimizer_step(self) -> None:
        """Momentum/EMA updates; called after every optimiser step."""

    def export_encoder(self) -> Encoder:
        """The encoder that downstream tasks should evaluate (e.g. an EMA copy)."""
        return self.encoder

    def compiled_modules(self) -> list[nn.Module]:
        """What ``--compile`` compiles: the modules whose ``forward`` the training step calls. A method that
        calls a part of its encoder directly (DDAE: the U-Net) names that part, since compiling the encoder
        compiles only its own ``forward``."""
        return [self.encoder]

    def make_views(self, configs: list[ViewConfig]) -> ViewMaker:
        return ViewMaker(configs)

    # --- shared machinery -----------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.train_config.epochs * self.steps_per_epoch

    def training_step(self, batch: torch.Tensor | tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        step = self.global_step
        # Every random choice of a step depends only on (seed, step, rank): resuming from a checkpoint
        # replays exactly the same views, noise and dropout as an uninterrupted run.
        seed = self.train_config.seed * 1_000 + self.global_rank
        torch.manual_seed(seed * 1_000_003 + step)
        images, masks = split_batch(batch)
        generator = step_generator(seed, step)
        if masks is None:
            loss, logs = self.training_loss(images, generator)
        else:
            loss, logs = self.masked_training_loss(images, masks, generator)
        # Reading the loss on the host waits for the device. The previous step's loss has long been computed when
        # this step starts, so checking it leaves that step's backward and update queued on the GPU; the epoch's last
        # loss is checked in on_train_batch_end, before the epoch-end callbacks export the encoder and checkpoint.
        self.raise_if_loss_not_finite()
        self._unchecked_loss = (loss.detach(), step, self.current_epoch)
        self.log("loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images))
        for key, value in logs.items():
            self.log(key, value, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.after_optimizer_step()
        if self.trainer.is_last_batch:
            self.raise_if_loss_not_finite()

    def raise_if_loss_not_finite(self) -> None:
        """The NaN/inf-loss error for the last loss not yet checked: one step late, so that the check does not make
        the host wait for the step it is enqueueing (a GPU's queue then never drains)."""
        if self._unchecked_loss is None:
            return
        loss, step, epoch = self._unchecked_loss
        self._unchecked_loss = None
        if not bool(torch.isfinite(loss)):
            raise TrainingError(
                f"{self.name} loss became {loss.item()} at step {step} (epoch {epoch}); "
                f"lower the learning rate (now --set lr={self.train_config.lr}) or check the input data"
            )

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate factors for named top-level submodules (BYOL's predictor); the schedule applies on top."""
        return {}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Weight decay on weights only: biases and normalisation parameters are excluded (standard), and LARS does
        not adapt their step either (BYOL, SimCLR, solo-learn's ``exclude_bias_n_norm``). A submodule named in
        ``lr_scales`` gets its own pair of groups at ``lr x factor``, after the two unscaled ones."""
        scales = self.lr_scales()
        unknown = set(scales) - {name for name, _ in self.named_children()}
        if unknown:
            raise ConfigError(f"{self.name}: lr_scales names {sorted(unknown)}, which are not submodules of the method")
        buckets: dict[tuple[float, bool], list[torch.nn.Parameter]] = {(1.0, False): [], (1.0, True): []}
        for name, param in self.named_parameters():
            if param.requires_grad:
                buckets.setdefault((scales.get(name.split(".")[0], 1.0), param.ndim <= 1), []).append(param)
        groups = []
        for (scale, no_decay), params in buckets.items():
            group: dict[str, Any] = {"params": params}
            if no_decay:
                group.update(weight_decay=0.0, lars_adapt=False)
            if scale != 1.0:
                group["lr"] = self.train_config.lr * scale
            groups.append(group)
        return groups

    def configure_optimizers(self) -> Any:
        cfg = self.train_config
        groups = self.parameter_groups()
        if cfg.optimizer == "sgd":
            optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "lars":
            optimizer = LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        elif cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_epochs * self.steps_per_epoch)
        total = max(1, self.total_steps)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
            return cfg.final_lr_scale + (1 - cfg.final_lr_scale) * cosine

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
