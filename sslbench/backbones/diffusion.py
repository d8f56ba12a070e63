"""The diffusion noise formulations (DDPM and EDM) and the diffusion-U-Net encoder (DDAE readout).

Two formulations share one U-Net and one readout:

- ``DDPMSchedule`` (Ho et al. 2020): a discrete variance-preserving chain, integer timesteps.
- ``EDMSchedule`` (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative
  Models"): a continuous noise level ``sigma`` (their ``sigma(t) = t``) with input/output
  preconditioning; the U-Net is conditioned on the continuous ``c_noise(sigma)``.

Both offer ``readout_input(x, t, noise)``: the network input and conditioning that read an image at
readout level ``t``, where ``t = 0`` always means the clean image. Two DDPM timestep conventions meet
here; both follow their papers:

- **Training timesteps** (``DDPMSchedule``, ``ddpm_loss``, the U-Net's ``t`` input) are indices
  ``i`` in ``[0, num_steps)``: ``x_i = sqrt(abar[i]) x_0 + sqrt(1 - abar[i]) eps`` with
  ``abar[i] = prod_{s <= i} (1 - beta[s])`` (Ho et al. 2020, with 0-based indices as in their code).
- **Readout noise level** (``DiffusionEncoder(t=...)``) counts like DDAE (Xiang et al. 2023) and the DDPM
  paper's 1-based ``t``: ``t = 0`` reads the *clean* image (no noise, U-Net timestep 0) and ``t`` in
  ``[1, num_steps]`` noises with ``abar[t - 1]`` and tells the U-Net timestep ``t - 1``, exactly what it
  saw in training at that noise level. So DDAE's "t = 11" readout is ``t=11`` here.

For EDM the readout level is ``sigma`` itself (``t = sigma``, as in Karras et al.).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from sslbench.backbones.base import Encoder, Features, spec_kwargs
from sslbench.backbones.unet import UNet, unet_config_dict, unet_config_from_dict
from sslbench.errors import ConfigError


class DDPMSchedule(nn.Module):
    """Linear beta schedule (Ho et al. 2020): ``betas = linspace(beta_start, beta_end, num_steps)``.

    ``betas``, ``alphas = 1 - betas`` and ``alphas_cumprod`` (abar) are float32 buffers, computed in
    float64; they are derived from the three arguments, so they stay out of state dicts.
    """

    def __init__(self, num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        super().__init__()
        if num_steps < 1 or not 0.0 < beta_start <= beta_end < 1.0:
            raise ConfigError(f"DDPM schedule num_steps={num_steps}, betas=({beta_start}, {beta_end}) is invalid; "
                              "use num_steps >= 1 and 0 < beta_start <= beta_end < 1")
        self.num_steps, self.beta_start, self.beta_end = num_steps, beta_start, beta_end
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        # 1 - abar cancels badly in float32 at small t (abar[0] = 0.9999), so this stays float64 on the CPU.
        self._equivalent_sigmas = ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise`` for integer timesteps ``t`` (B,) in [0, num_steps)."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def equivalent_sigma(self, t: int) -> float:
        """The EDM/VE noise level of readout ``t``: ``x_t / sqrt(abar) = x0 + sqrt((1 - abar) / abar) eps``
        (Karras et al. 2022, section 2), 0 for the clean ``t = 0``. It maps DDPM readouts onto EDM ones."""
        self.check_level(t)
        return 0.0 if t == 0 else float(self._equivalent_sigmas[int(t) - 1])

    def check_level(self, t: float) -> None:
        if t != int(t) or not 0 <= t <= self.num_steps:
            raise ConfigError(f"diffusion readout t={t} is out of range; use an integer from 0 (clean) to {self.num_steps}")

    def readout_input(self, x: torch.Tensor, t: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """U-Net input and timesteps (B,) that read ``x`` (in [-1, 1]) at readout ``t`` (module docstring);
        ``noise`` is unused (may be None) at ``t = 0``."""
        timesteps = torch.full((x.shape[0],), max(int(t) - 1, 0), dtype=torch.long, device=x.device)
        if t > 0:
            x = self.add_noise(x, timesteps, noise)
        return x, timesteps

    def spec(self) -> dict[str, Any]:
        return {"formulation": "ddpm", "num_steps": self.num_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}


EDM_SIGMA_MIN = 0.002
"""EDM's smallest sampling noise level (Karras et al. 2022, table 1): the conditioning of a clean readout."""


class EDMSchedule(nn.Module):
    """EDM preconditioning (Karras et al. 2022, table 1 and eq. 7), with data standard deviation ``sigma_data``.

    The denoiser is ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)`` with ``F`` the U-Net and
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``. Noised images are ``x + sigma eps``
    (variance exploding). The training noise distribution and loss weight live with the method
    (``sslbench.methods.ddae_edm``); the readout only needs the preconditioning.
    """

    def __init__(self, sigma_data: float = 0.5):
        super().__init__()
        if not sigma_data > 0:
            raise ConfigError(f"EDM sigma_data={sigma_data} is invalid; use the data's standard deviation (> 0), 0.5 for images in [-1, 1]")
        self.sigma_data = sigma_data

    def c_skip(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def c_in(self, sigma: torch.Tensor) -> torch.Tensor:
        return 1.0 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma.log() / 4.0

    def denoise(self, unet: nn.Module, noised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``D(x; sigma)``, the estimate of the clean image from ``noised = x0 + sigma eps``; ``sigma`` (B,) > 0."""
        s = sigma.to(noised.dtype).view(-1, *([1] * (noised.ndim - 1)))
        return self.c_skip(s) * noised + self.c_out(s) * unet(self.c_in(s) * noised, self.c_noise(sigma))

    def check_level(self, t: float) -> None:
        if not (math.isfinite(t) and t >= 0):
            raise ConfigError(f"EDM readout sigma={t} is out of range; use 0 (clean) or a positive noise level such as 0.05")

    def readout_input(self, x: torch.Tensor, t: float, noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """U-Net input ``c_in(sigma) (x + sigma eps)`` and conditioning ``c_noise(sigma)`` (B,) at ``sigma = t``.

        ``t = 0`` reads the clean image, conditioned as the smallest noise level ``EDM_SIGMA_MIN`` because
        ``c_noise(0)`` is infinite (``c_in`` at the two differs by less than 1e-5)."""
        sigma = torch.tensor(float(t), device=x.device)
        if t > 0:
            x = x + sigma.to(x.dtype) * noise
        conditioning = self.c_noise(sigma.clamp(min=EDM_SIGMA_MIN)).expand(x.shape[0])
        return self.c_in(sigma).to(x.dtype) * x, conditioning

    def spec(self) -> dict[str, Any]:
        return {"formulation": "edm", "sigma_data": self.sigma_data}


DiffusionSchedule = DDPMSchedule | EDMSchedule

SCHEDULES: dict[str, type[DDPMSchedule] | type[EDMSchedule]] = {"ddpm": DDPMSchedule, "edm": EDMSchedule}


def schedule_from_spec(spec: dict[str, Any]) -> DiffusionSchedule:
    """The schedule written by ``spec()``; specs without ``formulation`` (older exports) are DDPM."""
    spec = dict(spec)
    formulation = spec.pop("formulation", "ddpm")
    if formulation not in SCHEDULES:
        raise ConfigError(f"unknown diffusion formulation {formulation!r}; use one of {', '.join(SCHEDULES)}")
    return SCHEDULES[formulation](**spec)


class DiffusionEncoder(Encoder):
    """A diffusion U-Net read as an encoder at a fixed noise level (DDAE, Xiang et al. 2023).

    Images in [0, 1] are scaled to [-1, 1], noised to readout level ``t`` (a DDPM timestep or an EDM
    sigma, see the module docstring; 0 = clean) with noise drawn from a generator seeded with
    ``noise_seed`` at every call, on the input's device, so the same images always give the same
    features. ``pooled`` is the global average of block ``block``; ``maps`` holds one block per stride
    from ``pyramid_blocks`` (default: the last ResBlock of every encoder level, and ``mid`` instead at
    the deepest level). Only the blocks up to the last one needed are run, so an encoder-side readout
    never runs the decoder. ``read_blocks`` gives any set of blocks (several at one stride too) from one pass.
    """

    def __init__(self, unet: UNet, t: float, block: str, pyramid_blocks: list[str] | None = None, noise_seed: int = 0,
                 schedule: DiffusionSchedule | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule or DDPMSchedule()
        self.schedule.check_level(t)
        if pyramid_blocks is None:
            pyramid_blocks = default_pyramid_blocks(unet)
        for name in [block, *pyramid_blocks]:
            unet.block_stride(name)  # raises ConfigError naming the valid blocks
        strides = [unet.block_stride(name) for name in pyramid_blocks]
        if len(set(strides)) != len(strides):
            raise ConfigError(f"pyramid_blocks {pyramid_blocks} have strides {strides}; give at most one block per stride")
        self.t, self.block, self.noise_seed = t, block, noise_seed
        self.pyramid_blocks = sorted(pyramid_blocks, key=unet.block_stride)
        self.pooled_dim = unet.block_channels(block)
        self.map_channels = {unet.block_stride(name): unet.block_channels(name) for name in self.pyramid_blocks}
        self.spec = {"backbone": "ddpm_unet", "unet": unet_config_dict(unet.config), "t": t, "block": block,
                     "pyramid_blocks": list(self.pyramid_blocks), "noise_seed": noise_seed, "schedule": self.schedule.spec()}

    def forward(self, images: torch.Tensor) -> Features:
        features = self.read_blocks(images, list(dict.fromkeys([self.block, *self.pyramid_blocks])))
        maps = {self.unet.block_stride(name): features[name] for name in self.pyramid_blocks}
        return Features(pooled=features[self.block].mean((2, 3)), maps=maps)

    def read_blocks(self, images: torch.Tensor, blocks: list[str]) -> dict[str, torch.Tensor]:
        """Feature maps of the named ``blocks`` for images in [0, 1], read at level ``self.t`` in one U-Net pass."""
        x = images * 2.0 - 1.0
        noise = None
        if self.t > 0:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.noise_seed)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x, conditioning = self.schedule.readout_input(x, self.t, noise)
        return self.unet.forward_features(x, conditioning, blocks)


def default_pyramid_blocks(unet: UNet) -> list[str]:
    """The last ResBlock of each encoder level, finest first, with ``mid`` at the deepest stride."""
    config = unet.config
    levels = len(config.channel_mults)
    return [f"down{level}.{config.num_res_blocks - 1}" for level in range(levels - 1)] + ["mid"]


def diffusion_encoder_from_spec(spec: dict) -> DiffusionEncoder:
    """Rebuild a (randomly initialised) ``DiffusionEncoder`` from its ``spec``; load weights after."""
    if spec.get("backbone") != "ddpm_unet":
        raise ConfigError(f"spec backbone {spec.get('backbone')!r} is not a diffusion U-Net; expected 'ddpm_unet'")
    if not isinstance(spec.get("unet"), dict):
        raise ConfigError("diffusion encoder spec lacks its 'unet' config; write it with DiffusionEncoder.spec")
    encoder_kwargs = spec_kwargs(DiffusionEncoder, spec, "diffusion encoder", supplied=("backbone", "unet", "schedule"))
    unet = UNet(unet_config_from_dict(spec["unet"]))
    return DiffusionEncoder(unet, **encoder_kwargs, schedule=schedule_from_spec(spec.get("schedule", {})))
