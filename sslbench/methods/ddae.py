"""DDAE: a denoising diffusion model as a self-supervised encoder (Xiang et al. 2023, "Denoising Diffusion
Autoencoders are Unified Self-supervised Learners"). Pretraining is plain DDPM training; the features are
read by ``sslbench.backbones.diffusion.DiffusionEncoder``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.augment import host_to_device
from sslbench.backbones.base import Encoder
from sslbench.backbones.diffusion import DDPMSchedule, DiffusionEncoder, DiffusionSchedule
from sslbench.backbones.unet import UNET_PRESETS, UNet, unet_config_from_dict
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod
from sslbench.methods.parts import ema_update, frozen_copy


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2 (DDPM's and DDAE's only data augmentation); the
    draw comes from the CPU ``generator``, so it is the same on every device."""
    flip = host_to_device(torch.rand(len(x), generator=generator) < 0.5, x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def ddpm_loss(unet: nn.Module, schedule: DDPMSchedule, x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The DDPM "simple" loss (Ho et al. 2020, eq. 14): ``E_{t, eps} || eps - eps_theta(x_t, t) ||^2``.

    ``x0``: clean images scaled to [-1, 1], (B, C, H, W). One timestep per image is drawn uniformly from
    ``[0, num_steps)``, ``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` with ``eps ~ N(0, I)``, and the
    mean squared error over all elements is returned. ``generator`` (on ``x0``'s device) makes the draw
    reproducible.
    """
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), device=x0.device, generator=generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return F.mse_loss(unet(schedule.add_noise(x0, t, noise), t), noise)


@dataclass
class DDAEOptions:
    """DDPM training (Ho et al. 2020) plus the readout that the exported encoder uses."""

    unet: str = "small"
    ema_decay: float = 0.9999
    hflip: bool = True
    readout_t: int = 11
    readout_block: str = "mid"


class DDAE(PretrainMethod):
    """Train a DDPM U-Net; export its EMA weights as a ``DiffusionEncoder`` at (readout_t, readout_block).

    ``last.ckpt`` keeps both weight sets (``encoder.unet.*`` raw, ``ema_unet.*`` EMA), so a study can read
    either (``sslbench.diffusion_study.load_diffusion_encoder``). Subclasses change the noise formulation
    through ``make_schedule``, ``readout_level`` and ``diffusion_loss`` (``ddae_edm``).
    """

    name = "ddae"
    Options = DDAEOptions
    # DDPM's CIFAR recipe uses Adam 2e-4 without weight decay; the study found AdamW better (0.913 vs 0.907).
    train_defaults = {"optimizer": "adamw", "lr": 2e-4, "weight_decay": 0.0, "batch_size": 128, "warmup_epochs": 0.0}
    default_backbone = {"backbone": "ddpm_unet"}
    # GroupNorm is slow in channels_last: the U-Net trained faster contiguous on CPU and on an H100.
    channels_last = False

    def make_schedule(self) -> DiffusionSchedule:
        return DDPMSchedule()

    @property
    def readout_level(self) -> float:
        return self.options.readout_t

    def diffusion_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The training loss on clean images ``x`` in [-1, 1]; ``generator`` lives on ``x``'s device."""
        return ddpm_loss(self.encoder.unet, self.encoder.schedule, x, generator)

    def build_encoder(self) -> Encoder:
        o = self.options
        config = unet_config_from_dict(self.backbone_spec["unet"]) if "unet" in self.backbone_spec else UNET_PRESETS.get(o.unet)
        if config is None:
            raise ConfigError(f"unknown U-Net preset unet={o.unet!r}; use one of {', '.join(UNET_PRESETS)}")
        return DiffusionEncoder(UNet(config), t=self.readout_level, block=o.readout_block, schedule=self.make_schedule())

    def build(self) -> None:
        self.ema_unet = frozen_copy(self.encoder.unet)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        x = images.float() / 127.5 - 1.0
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if self.options.hflip:
            x = random_hflip(x, generator)
        device_generator = torch.Generator(device=x.device).manual_seed(seed)
        return self.diffusion_loss(x, device_generator), {}

    def compiled_modules(self) -> list[nn.Module]:
        return [self.encoder.unet]  # the loss calls the U-Net, never the encoder's readout forward

    def after_optimizer_step(self) -> None:
        # Warm-up of the EMA decay (as in TF's ExponentialMovingAverage with num_updates): short runs
        # would otherwise export weights still close to the random initialisation.
        step = self.global_step
        decay = min(self.options.ema_decay, (1 + step) / (10 + step))
        ema_update(self.ema_unet, self.encoder.unet, decay)

    def export_encoder(self) -> Encoder:
        return DiffusionEncoder(self.ema_unet, t=self.readout_level, block=self.options.readout_block,
                                schedule=self.encoder.schedule)
