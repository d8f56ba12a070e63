"""DDAE with EDM training (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
Models"): the same U-Net, EMA and export as ``ddae``, with EDM's preconditioning, log-normal training noise
levels and loss weighting instead of DDPM's discrete chain. The DDAE paper (Xiang et al. 2023) reads EDM
models the same way as DDPM ones; the exported encoder reads at ``readout_sigma``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sslbench.backbones.diffusion import EDMSchedule
from sslbench.config import check_range
from sslbench.errors import ConfigError
from sslbench.methods.ddae import DDAE


def sample_training_sigmas(count: int, p_mean: float, p_std: float, device: torch.device | str = "cpu",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's training noise levels (Karras et al. 2022, table 1): ``ln(sigma) ~ N(p_mean, p_std^2)``, (count,)."""
    return (p_mean + p_std * torch.randn(count, device=device, generator=generator)).exp()


def edm_loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2`` (Karras et al. 2022, table 1), which is
    ``1 / c_out(sigma)^2``: it makes the network's effective target have unit variance at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(unet: nn.Module, schedule: EDMSchedule, x0: torch.Tensor, p_mean: float, p_std: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """EDM's training loss (Karras et al. 2022, eq. 8 with table 1):
    ``E_{sigma, n} lambda(sigma) || D(x0 + n; sigma) - x0 ||^2`` with ``n ~ N(0, sigma^2 I)``.

    ``x0``: clean images scaled to [-1, 1], (B, C, H, W); one ``sigma`` per image from
    ``sample_training_sigmas``. The mean over all elements is returned. ``generator`` (on ``x0``'s
    device) makes the draw reproducible.
    """
    sigma = sample_training_sigmas(x0.shape[0], p_mean, p_std, x0.device, generator)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    weight = edm_loss_weight(sigma, schedule.sigma_data).to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    noised = x0 + sigma.to(x0.dtype).view_as(weight) * noise
    return (weight * (schedule.denoise(unet, noised, sigma) - x0) ** 2).mean()


@dataclass
class DDAEEDMOptions:
    """EDM training (Karras et al. 2022 defaults) plus the readout of the exported encoder.

    ``readout_sigma`` = 0.047 is the noise level of DDPM's t = 11 (``DDPMSchedule.equivalent_sigma``),
    DDAE's best CIFAR-10 readout.
    """

    unet: str = "small"
    ema_decay: float = 0.9999
    hflip: bool = True
    readout_sigma: float = 0.047
    readout_block: str = "mid"
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2

    def __post_init__(self) -> None:
        check_range("ema_decay", self.ema_decay, 0.0, 1.0)
        check_range("readout_sigma", self.readout_sigma, 0.0)
        if not self.sigma_data > 0 or not self.p_std > 0:
            raise ConfigError(f"options sigma_data={self.sigma_data}, p_std={self.p_std} must be positive; "
                              "EDM's defaults are sigma_data=0.5 (images in [-1, 1]) and p_std=1.2")


class DDAEEDM(DDAE):
    """DDAE trained with the EDM formulation; the exported EMA encoder reads at (readout_sigma, readout_block)."""

    name = "ddae_edm"
    Options = DDAEEDMOptions

    def make_schedule(self) -> EDMSchedule:
        return EDMSchedule(self.options.sigma_data)

    @property
    def readout_level(self) -> float:
        return self.options.readout_sigma

    def diffusion_loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return edm_loss(self.encoder.unet, self.encoder.schedule, x, self.options.p_mean, self.options.p_std, generator)
