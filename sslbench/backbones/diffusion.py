"""The DDPM noise schedule and the diffusion-U-Net encoder (DDAE readout).

Two timestep conventions meet here; both follow their papers:

- **Training timesteps** (``DDPMSchedule``, ``ddpm_loss``, the U-Net's ``t`` input) are indices
  ``i`` in ``[0, num_steps)``: ``x_i = sqrt(abar[i]) x_0 + sqrt(1 - abar[i]) eps`` with
  ``abar[i] = prod_{s <= i} (1 - beta[s])`` (Ho et al. 2020, with 0-based indices as in their code).
- **Readout noise level** (``DiffusionEncoder(t=...)``) counts like DDAE (Xiang et al. 2023) and the DDPM
  paper's 1-based ``t``: ``t = 0`` reads the *clean* image (no noise, U-Net timestep 0) and ``t`` in
  ``[1, num_steps]`` noises with ``abar[t - 1]`` and tells the U-Net timestep ``t - 1``, exactly what it
  saw in training at that noise level. So DDAE's "t = 11" readout is ``t=11`` here.
"""

from __future__ import annotations

import torch
from torch import nn

from sslbench.backbones.base import Encoder, Features
from sslbench.backbones.unet import UNet, UNetConfig, unet_config_dict
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
        self.register_buffer("betas", betas.float(), persistent=False)
        self.register_buffer("alphas", alphas.float(), persistent=False)
        self.register_buffer("alphas_cumprod", torch.cumprod(alphas, 0).float(), persistent=False)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``sqrt(abar[t]) x0 + sqrt(1 - abar[t]) noise`` for integer timesteps ``t`` (B,) in [0, num_steps)."""
        abar = self.alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return abar.sqrt() * x0 + (1.0 - abar).sqrt() * noise

    def spec(self) -> dict:
        return {"num_steps": self.num_steps, "beta_start": self.beta_start, "beta_end": self.beta_end}


class DiffusionEncoder(Encoder):
    """A DDPM U-Net read as an encoder at a fixed noise level (DDAE, Xiang et al. 2023).

    Images in [0, 1] are scaled to [-1, 1], noised to readout level ``t`` (see the module docstring;
    0 = clean) with noise drawn from a generator seeded with ``noise_seed`` at every call, on the
    input's device, so the same images always give the same features. ``pooled`` is the global average
    of block ``block``; ``maps`` holds one block per stride from ``pyramid_blocks`` (default: the last
    ResBlock of every encoder level, and ``mid`` instead at the deepest level). Only the blocks up to
    the last one needed are run, so an encoder-side readout never runs the decoder.
    """

    def __init__(self, unet: UNet, t: int, block: str, pyramid_blocks: list[str] | None = None, noise_seed: int = 0,
                 schedule: DDPMSchedule | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule or DDPMSchedule()
        if not 0 <= t <= self.schedule.num_steps:
            raise ConfigError(f"diffusion readout t={t} is out of range; use 0 (clean) to {self.schedule.num_steps}")
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
        x = images * 2.0 - 1.0
        timestep = max(self.t - 1, 0)
        timesteps = torch.full((x.shape[0],), timestep, dtype=torch.long, device=x.device)
        if self.t > 0:
            generator = torch.Generator(device=x.device)
            generator.manual_seed(self.noise_seed)
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = self.schedule.add_noise(x, timesteps, noise)
        features = self.unet.forward_features(x, timesteps, list(dict.fromkeys([self.block, *self.pyramid_blocks])))
        maps = {self.unet.block_stride(name): features[name] for name in self.pyramid_blocks}
        return Features(pooled=features[self.block].mean((2, 3)), maps=maps)


def default_pyramid_blocks(unet: UNet) -> list[str]:
    """The last ResBlock of each encoder level, finest first, with ``mid`` at the deepest stride."""
    config = unet.config
    levels = len(config.channel_mults)
    return [f"down{level}.{config.num_res_blocks - 1}" for level in range(levels - 1)] + ["mid"]


def diffusion_encoder_from_spec(spec: dict) -> DiffusionEncoder:
    """Rebuild a (randomly initialised) ``DiffusionEncoder`` from its ``spec``; load weights after."""
    if spec.get("backbone") != "ddpm_unet":
        raise ConfigError(f"spec backbone {spec.get('backbone')!r} is not a diffusion U-Net; expected 'ddpm_unet'")
    try:
        unet = UNet(UNetConfig(**spec["unet"]))
        schedule = DDPMSchedule(**spec.get("schedule", {}))
        return DiffusionEncoder(unet, t=spec["t"], block=spec["block"], pyramid_blocks=spec.get("pyramid_blocks"),
                                noise_seed=spec.get("noise_seed", 0), schedule=schedule)
    except (KeyError, TypeError) as error:
        raise ConfigError(f"diffusion encoder spec is malformed ({error}); it needs 'unet', 't' and 'block' as written by DiffusionEncoder.spec") from error
