"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners"), with UM-MAE's uniform masking.

75% of the patches of each image are masked at random; the ViT encoder runs on the visible 25% only
(no mask tokens in the encoder, which is what makes MAE cheap); a light decoder gets the encoded
visible tokens back at their positions, a shared learnable mask token at every masked position, its
own fixed sin-cos position embedding, and predicts the pixels of every patch. The loss is the mean
squared error over the *masked* patches, against pixels normalised per patch (``norm_pix_loss``,
the paper's better target). The exported encoder is the ViT, pooling the mean of its patch tokens
(``pool="mean"``, the official fine-tuning's ``global_pool``): MAE's loss is on the patch tokens only (the CLS token
learns only through attention), and on C10-mini the CLS readout scored 5 points below the patch mean of the same
network (``benchmarks/vit_layers.py``, generative_c10_mini.md).

``masking="uniform"`` is UM-MAE's sampling (Li et al. 2022, "Uniform Masking: Enabling MAE
Pre-training for Pyramid-based Vision Transformers with Locality"): exactly one patch is kept in
every 2x2 block (75% masked, spread evenly over the image), the kept corner drawn from a shuffled
pool that holds the four corners equally often; then *secondary masking* replaces a further 25%
(``secondary_mask_ratio``) of the kept patches by a learnable token (plus their position) at the
encoder's input, so the encoder cannot solve the task by copying a neighbour. The loss stays on the
uniformly masked patches, as in the official code.

Defaults follow the paper at CIFAR scale: ViT-Tiny, patch 4, sin-cos positions; decoder dim 128,
depth 2, 4 heads (the paper's 512-d, 8-block decoder scaled to a 192-d encoder); views are a random
resized crop (scale 0.2-1) and a horizontal flip, no colour changes; AdamW with betas (0.9, 0.95),
weight decay 0.05, lr 1.5e-4 x batch / 256, warm-up over the first 5% of training (40 of 800 epochs).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from sslbench.augment import ViewConfig, host_to_device
from sslbench.backbones import Encoder
from sslbench.backbones.vit import VIT_PRESETS, VisionTransformer, sincos_position_embedding
from sslbench.config import check_range
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.masking import (masked_image_vit, patchify, random_keep_indices, standardise_patches,
                                      uniform_keep_indices)

MASKINGS = ("random", "uniform")
UNIFORM_MASK_RATIO = 0.75
"""Keeping one patch of each 2x2 block masks exactly 3/4."""
UNIFORM_SECONDARY_MASK_RATIO = 0.25
"""UM-MAE's secondary masking ratio (its ``vis_mask_ratio``, configs ``vmr025``)."""


def mae_loss(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """MAE's reconstruction loss (He et al. 2022, sec. 3): mean over masked patches of the per-patch MSE.

    ``prediction``, ``target``: (B, N, D) patches; ``mask``: (B, N), 1 where masked. With ``norm_pix``
    each target patch is normalised by its own mean and (unbiased) variance: (t - mean) / sqrt(var + 1e-6).
    """
    target = target.float()
    if norm_pix:
        target = standardise_patches(target, 1e-6)
    per_patch = (prediction.float() - target).pow(2).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """Encoded visible tokens + mask tokens at the masked positions -> pixels of every patch."""

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, grid: tuple[int, int], patch_pixels: int):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        table = torch.cat([torch.zeros(1, dim), sincos_position_embedding(dim, *grid)])
        self.register_buffer("position", table.unsqueeze(0), persistent=False)
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.predict = nn.Linear(dim, patch_pixels)

    def forward(self, latent: torch.Tensor, keep_indices: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, 1 + K, encoder_dim), CLS first; returns (B, N, patch_pixels) in raster order."""
        x = self.embed(latent)
        batch, _, dim = x.shape
        num_patches = self.position.shape[1] - 1
        tokens = self.mask_token.to(x.dtype).expand(batch, num_patches, dim)  # x is bf16 under autocast
        tokens = tokens.scatter(1, keep_indices.unsqueeze(-1).expand(-1, -1, dim), x[:, 1:])
        x = torch.cat([x[:, :1], tokens], 1) + self.position
        for block in self.blocks:
            x = block(x)
        return self.predict(self.norm(x))[:, 1:]


@dataclass
class MAEOptions:
    mask_ratio: float = 0.75
    masking: str = "random"
    secondary_mask_ratio: float | None = None
    """None: UM-MAE's 0.25 with uniform masking, 0 with random masking."""
    norm_pix_loss: bool = True
    decoder_dim: int = 128
    decoder_depth: int = 2
    decoder_heads: int = 4
    crop_scale: tuple[float, float] = (0.2, 1.0)


class MAE(PretrainMethod):
    name = "mae"
    Options = MAEOptions
    train_defaults = {"optimizer": "adamw", "weight_decay": 0.05, "betas": (0.9, 0.95)}
    default_backbone = {"backbone": "vit", **VIT_PRESETS["tiny"], "patch_size": 4, "position_embedding": "sincos"}

    @classmethod
    def derived_train_defaults(cls, backbone: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
        return {"lr": 1.5e-4 * train.batch_size / 256, "warmup_epochs": 0.05 * train.epochs}

    def build_encoder(self) -> Encoder:
        # The patch-mean readout unless the spec chooses one, so --backbone vit-tiny gets it too.
        return masked_image_vit(self.name, {"pool": "mean", **self.backbone_spec}, self.image_size)

    def build(self) -> None:
        o = self.options
        encoder: VisionTransformer = self.encoder
        if o.masking not in MASKINGS:
            raise ConfigError(f"option masking={o.masking!r} is not allowed; use one of {', '.join(MASKINGS)}")
        check_range("mask_ratio", o.mask_ratio, 0.0, 1.0)
        self.grid = (self.image_size // encoder.patch_size,) * 2
        num_patches = self.grid[0] * self.grid[1]
        if o.masking == "uniform":
            if o.mask_ratio != UNIFORM_MASK_RATIO:
                raise ConfigError(f"option mask_ratio={o.mask_ratio} cannot be used with masking=uniform, which keeps one patch "
                                  f"per 2x2 block; use mask_ratio={UNIFORM_MASK_RATIO} or masking=random")
            if self.grid[0] % 2:
                raise ConfigError(f"masking=uniform needs an even number of patches per side, got {self.grid[0]}; "
                                  "change --image-size or the patch size")
        self.num_keep = round(num_patches * (1 - o.mask_ratio))
        if not 1 <= self.num_keep < num_patches:
            raise ConfigError(f"option mask_ratio={o.mask_ratio} leaves {self.num_keep} of {num_patches} patches visible; "
                              "use a ratio that keeps at least one patch visible and masks at least one")
        self.secondary_mask_ratio = o.secondary_mask_ratio
        if self.secondary_mask_ratio is None:
            self.secondary_mask_ratio = UNIFORM_SECONDARY_MASK_RATIO if o.masking == "uniform" else 0.0
        if not 0.0 <= self.secondary_mask_ratio < 1.0:
            raise ConfigError(f"option secondary_mask_ratio={self.secondary_mask_ratio} is out of range; use a value in [0, 1)")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            check_range(name, getattr(o, name), 1)
        if o.decoder_dim % o.decoder_heads or o.decoder_dim % 4:
            raise ConfigError(f"option decoder_dim={o.decoder_dim} must be a multiple of 4 and of decoder_heads={o.decoder_heads}")
        if self.secondary_mask_ratio > 0:
            self.visible_mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
            nn.init.trunc_normal_(self.visible_mask_token, std=0.02)
        self.decoder = MAEDecoder(encoder.dim, o.decoder_dim, o.decoder_depth, o.decoder_heads, self.grid,
                                  encoder.patch_size ** 2 * 3)
        view = ViewConfig(size=self.image_size, crop_scale=tuple(o.crop_scale), jitter_p=0.0, grayscale_p=0.0)
        self.views = self.make_views([view])

    def sample_masks(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kept patch indices (B, K) and, with secondary masking, which kept patches are replaced (B, K) bool."""
        if self.options.masking == "uniform":
            keep = uniform_keep_indices(batch, *self.grid, generator)
        else:
            keep = random_keep_indices(batch, self.grid[0] * self.grid[1], self.num_keep, generator)
        if self.secondary_mask_ratio == 0:
            return keep, None
        visible = keep.shape[1]
        replaced_count = visible - round(visible * (1 - self.secondary_mask_ratio))
        order = torch.rand(batch, visible, generator=generator).argsort(1)
        replaced = torch.zeros(batch, visible, dtype=torch.bool).scatter(1, order[:, :replaced_count], True)
        return keep, replaced

    def encode_visible(self, images: torch.Tensor, keep: torch.Tensor, replaced: torch.Tensor | None) -> torch.Tensor:
        """The encoder's tokens (B, 1 + K, dim) computed from the kept patches only."""
        encoder: VisionTransformer = self.encoder
        if replaced is None:
            return encoder.forward_tokens(images, keep)
        # The replaced kept patches, marked on the whole grid: the ViT swaps in the token before positions.
        masked = torch.zeros(len(images), self.grid[0] * self.grid[1], dtype=torch.bool, device=keep.device)
        return encoder.forward_tokens(images, keep, masked.scatter(1, keep, replaced), self.visible_mask_token)

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        (view,) = self.views(images, generator)
        keep, replaced = self.sample_masks(len(view), generator)
        keep = host_to_device(keep, view.device)
        replaced = host_to_device(replaced, view.device) if replaced is not None else None
        prediction = self.decoder(self.encode_visible(view, keep, replaced), keep)
        # The target is the image as the encoder sees it (normalised), as in the official code.
        target = patchify(self.encoder.normalize(view), self.encoder.patch_size)
        mask = torch.ones(keep.shape[0], target.shape[1], device=view.device).scatter(1, keep, 0.0)
        return mae_loss(prediction, target, mask, self.options.norm_pix_loss), {}

    def compiled_modules(self) -> list[nn.Module]:
        # The loss runs the ViT through forward_tokens (kept patches only), not its forward: compile its blocks.
        return [*self.encoder.blocks, self.decoder]
