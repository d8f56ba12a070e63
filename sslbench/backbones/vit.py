"""A plain Vision Transformer (Dosovitskiy et al. 2021) behind the Encoder contract.

Images are cut into ``patch_size`` squares, linearly embedded, given a position embedding and
prefixed with a CLS token; pre-norm transformer blocks (timm's ``Block``, which attends with
``F.scaled_dot_product_attention``) and a final LayerNorm follow. ``Features.pooled`` is the CLS
token after the final norm (``pool="mean"``: the mean of the patch tokens, as MAE's fine-tuning
uses), and ``Features.maps`` holds one map, the patch tokens as a (B, dim, H/p, W/p) grid keyed by
stride ``patch_size``.

The position embedding is a table for the build grid (``image_size / patch_size`` per side),
either learned (DINO) or the fixed 2-D sin-cos of MAE (He et al. 2022). Another input size gets the
table resized bicubically to its grid (DINO's ``interpolate_pos_encoding``), so DINO's small crops
and evaluation at another resolution use the same weights.

MAE needs the encoder on visible patches only: ``forward_tokens(images, keep_indices)``. BEiT (and
UM-MAE's secondary masking) replace some patch tokens by a learned mask token before the positions are
added: ``forward_tokens(images, masked=..., mask_token=...)``. The two halves ``embed`` (patch tokens
with positions) and ``encode`` (CLS + blocks + norm) are there for methods that need the tokens between.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn

from sslbench.backbones.base import Encoder, Features, Normalize
from sslbench.errors import ConfigError

VIT_PRESETS: dict[str, dict[str, int]] = {
    "nano": {"dim": 64, "depth": 3, "heads": 2},
    "tiny": {"dim": 192, "depth": 12, "heads": 3},
    "small": {"dim": 384, "depth": 12, "heads": 6},
}
"""ViT-Tiny and ViT-Small as in DeiT (Touvron et al. 2021); ``nano`` is a CPU-test size."""

POSITION_EMBEDDINGS = ("learned", "sincos")
POOLINGS = ("cls", "mean")


def default_patch_size(image_size: int) -> int:
    """Patch 4 up to 64 px (an 8x8 grid at CIFAR's 32 px), 8 up to 128 px, 16 above (ImageNet's ViTs)."""
    if image_size <= 64:
        return 4
    return 8 if image_size <= 128 else 16


def sincos_position_embedding(dim: int, height: int, width: int) -> torch.Tensor:
    """The fixed 2-D sin-cos table of MAE (He et al. 2022), (height * width, dim), rows in raster order.

    Half of the channels encode the row, half the column, each as [sin(pos * w_k), cos(pos * w_k)]
    with frequencies w_k = 10000^(-k / (dim / 4)), k = 0..dim/4-1 (the 1-D transformer encoding).
    """
    if dim % 4:
        raise ConfigError(f"ViT dim={dim} must be a multiple of 4 for sin-cos position embeddings; use e.g. 64, 192 or 384")
    quarter = dim // 4
    frequencies = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64), indexing="ij")

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * frequencies.view(1, -1)
        return torch.cat([angles.sin(), angles.cos()], 1)

    return torch.cat([encode(rows), encode(cols)], 1).float()


class VisionTransformer(Encoder):
    """A ViT whose patch tokens form one stride-``patch_size`` feature map."""

    def __init__(self, dim: int = 192, depth: int = 12, heads: int = 3, patch_size: int = 4, image_size: int = 32,
                 mlp_ratio: float = 4.0, position_embedding: str = "learned", pool: str = "cls", drop_path: float = 0.0,
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406), std: tuple[float, float, float] = (0.229, 0.224, 0.225)):
        super().__init__()
        if dim < 1 or depth < 1 or heads < 1 or dim % heads:
            raise ConfigError(f"ViT dim={dim}, depth={depth}, heads={heads} is invalid; dim must be a positive multiple of heads")
        if patch_size < 1 or image_size % patch_size:
            raise ConfigError(f"ViT image_size={image_size} is not a multiple of patch_size={patch_size}; choose a patch size that divides it")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ConfigError(f"unknown ViT position_embedding {position_embedding!r}; use one of {', '.join(POSITION_EMBEDDINGS)}")
        if pool not in POOLINGS:
            raise ConfigError(f"unknown ViT pool {pool!r}; use one of {', '.join(POOLINGS)}")
        if not 0 <= drop_path < 1:
            raise ConfigError(f"ViT drop_path={drop_path} is out of range; use a value in [0, 1)")
        self.normalize = Normalize(mean, std)
        self.patch_size = patch_size
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.patch_embed = nn.Conv2d(3, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        table_size = (1 + self.grid[0] * self.grid[1], dim)
        if position_embedding == "learned":
            self.position = nn.Parameter(torch.zeros(1, *table_size))
            nn.init.trunc_normal_(self.position, std=0.02)
        else:
            # The CLS row stays zero (MAE); the table is a function of the shape, so it is not saved.
            table = torch.cat([torch.zeros(1, dim), sincos_position_embedding(dim, *self.grid)])
            self.register_buffer("position", table.unsqueeze(0), persistent=False)
        # Stochastic depth grows linearly with depth (timm / DeiT); 0 everywhere by default.
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio, qkv_bias=True, drop_path=rate,
                                           norm_layer=partial(nn.LayerNorm, eps=1e-6)) for rate in rates])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pool = pool
        self.pooled_dim = dim
        self.map_channels = {patch_size: dim}
        self.spec = {"backbone": "vit", "dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size,
                     "image_size": image_size, "mlp_ratio": mlp_ratio, "position_embedding": position_embedding,
                     "pool": pool, "drop_path": drop_path, "mean": list(mean), "std": list(std)}
        self._init_weights()

    def _init_weights(self) -> None:
        # ViT/DeiT/DINO initialisation: truncated normal 0.02 for linear maps and tokens, zero biases;
        # the patch embedding is a linear map of the flattened patch (MAE's view of it).
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.patch_embed.weight.view(self.patch_embed.out_channels, -1), std=0.02)
        nn.init.zeros_(self.patch_embed.bias)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def dim(self) -> int:
        return self.pooled_dim

    def grid_size(self, images: torch.Tensor) -> tuple[int, int]:
        """Patches per side of ``images``; a ConfigError if the size is not a multiple of the patch."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ConfigError(f"image size {height}x{width} is not a multiple of the ViT patch size {self.patch_size}; "
                              f"use --image-size a multiple of {self.patch_size} or another patch size")
        return height // self.patch_size, width // self.patch_size

    def patch_positions(self, height: int, width: int) -> torch.Tensor:
        """The patch rows of the position table, (1, height * width, dim), resized bicubically to that grid."""
        table = self.position[:, 1:]
        if (height, width) == self.grid:
            return table
        grid = table.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid.float(), size=(height, width), mode="bicubic", align_corners=False).to(table.dtype)
        return grid.flatten(2).transpose(1, 2)

    def embed(self, images: torch.Tensor, masked: torch.Tensor | None = None,
              mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """Patch tokens plus their positions, (B, N, dim) in raster order, from [0, 1] images.

        Where ``masked`` (B, N) is true the patch's token is replaced by ``mask_token`` (1, 1, dim) before
        its position is added (BEiT, Bao et al. 2022, sec. 2.3), so nothing of the hidden pixels gets in.
        """
        height, width = self.grid_size(images)
        tokens = self.patch_embed(self.normalize(images)).flatten(2).transpose(1, 2)
        if masked is not None:
            tokens = torch.where(masked.unsqueeze(-1), mask_token, tokens)
        return tokens + self.patch_positions(height, width)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLS token (with its position) + ``tokens`` through the blocks and the final norm: (B, 1 + K, dim)."""
        cls = (self.cls_token + self.position[:, :1]).expand(len(tokens), -1, -1)
        x = torch.cat([cls, tokens], 1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_tokens(self, images: torch.Tensor, keep_indices: torch.Tensor | None = None,
                       masked: torch.Tensor | None = None, mask_token: torch.Tensor | None = None) -> torch.Tensor:
        """All output tokens (CLS first); with ``keep_indices`` (B, K) only those patches enter the
        transformer (MAE's encoder), the others are never computed on; ``masked`` (B, N) patches are
        replaced by ``mask_token`` first (see ``embed``)."""
        tokens = self.embed(images, masked, mask_token)
        if keep_indices is not None:
            tokens = torch.gather(tokens, 1, keep_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.encode(tokens)

    def forward(self, images: torch.Tensor) -> Features:
        height, width = self.grid_size(images)
        tokens = self.forward_tokens(images)
        patches = tokens[:, 1:]
        pooled = tokens[:, 0] if self.pool == "cls" else patches.mean(1)
        feature_map = patches.transpose(1, 2).reshape(len(images), -1, height, width)
        return Features(pooled=pooled, maps={self.patch_size: feature_map})
