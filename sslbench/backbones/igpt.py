"""iGPT's transformer over colour tokens, and its encoder readout (Chen et al. 2020, "Generative Pretraining
from Pixels").

An image is resized to a small token grid (area averaging), each pixel is replaced by the index of its
nearest palette colour (``ColourPalette``), and the grid is read in raster order as a sequence. A GPT-2
decoder (Radford et al. 2019: pre-LayerNorm blocks, learned position embeddings) models the sequence:

- **autoregressive** (``causal=True``): the sequence is shifted right behind a learned start vector, so
  slot ``i`` holds the start vector and tokens ``< i`` and, through causal attention, predicts token ``i``;
- **BERT** (``causal=False``): slot ``i`` holds token ``i``; masked tokens enter as a zero embedding (as in
  iGPT's code) and attention is bidirectional.

The encoder reads layer ``readout_layer`` (iGPT Sec. 4.1: linear-probe features are best in the middle of
the network, hence the default ``depth // 2``): ``n = LayerNorm(h^l)`` without learned parameters, pooled
over the sequence (iGPT's ``f^l = <n_i^l>_i``) and reshaped to the token grid as the feature map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.backbones.base import Encoder, Features, spec_kwargs
from sslbench.backbones.palette import ColourPalette
from sslbench.errors import ConfigError


class TransformerBlock(nn.Module):
    """A GPT-2 block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))``, MLP 4x wide with GELU."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.attention_out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(self.attention_norm(x)).view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + self.attention_out(attended.transpose(1, 2).reshape(b, n, width))
        return x + self.mlp(self.mlp_norm(x))


class ImageGPT(nn.Module):
    """Token and position embeddings, ``depth`` GPT-2 blocks and the final LayerNorm, over ``length`` tokens."""

    def __init__(self, vocabulary: int, length: int, depth: int, width: int, heads: int, causal: bool):
        super().__init__()
        self.causal = causal
        self.depth = depth
        self.token_embedding = nn.Embedding(vocabulary, width)
        self.position_embedding = nn.Parameter(torch.zeros(length, width))
        # Only the autoregressive model has a start vector: an unused parameter would break DDP.
        self.start = nn.Parameter(torch.zeros(width)) if causal else None
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 depth)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.position_embedding, std=0.02)
        if self.start is not None:
            nn.init.normal_(self.start, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attention_out.weight, std=0.02 / math.sqrt(2 * self.depth))
            nn.init.normal_(block.mlp[-1].weight, std=0.02 / math.sqrt(2 * self.depth))

    def forward(self, tokens: torch.Tensor, layers: int | None = None, masked: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream (B, n, width) after ``layers`` blocks (default all; no final LayerNorm).

        ``tokens`` (B, n) are the image's tokens in raster order; the autoregressive model shifts them
        itself, so output slot ``i`` never depends on token ``i`` or later ones. ``masked`` (B, n) bool
        zeroes the embeddings of masked tokens (BERT objective only).
        """
        h = self.token_embedding(tokens)
        if self.causal:
            h = torch.cat([self.start.expand(len(h), 1, -1), h[:, :-1]], 1)
        elif masked is not None:
            h = h.masked_fill(masked.unsqueeze(-1), 0.0)
        h = h + self.position_embedding
        for block in self.blocks[:self.depth if layers is None else layers]:
            h = block(h, self.causal)
        return h


class ImageGPTEncoder(Encoder):
    """Palette + token grid + ``ImageGPT``, read at ``readout_layer`` (Encoder contract).

    Float images in [0, 1] of any size are area-resized to ``grid`` x ``grid`` and quantised to palette
    tokens. The quantisation is a hard nearest-colour choice, so **no gradient reaches the input images**:
    probing and fine-tuning the transformer work, input-gradient methods (adversarial examples, saliency)
    do not. ``maps`` holds one map at stride ``image_size / grid`` (rounded for the input's height); for the
    autoregressive model cell ``i`` is the state that predicts pixel ``i`` from the pixels before it.
    Only the blocks up to ``readout_layer`` run.
    """

    def __init__(self, palette_size: int = 512, grid: int = 16, image_size: int = 32, depth: int = 8, width: int = 256,
                 heads: int = 8, causal: bool = True, readout_layer: int | None = None):
        super().__init__()
        readout_layer = depth // 2 if readout_layer is None else readout_layer
        if min(grid, image_size, depth, width, heads) < 1:
            raise ConfigError(f"iGPT sizes grid={grid}, image_size={image_size}, depth={depth}, width={width}, heads={heads} "
                              "must all be positive")
        if width % heads:
            raise ConfigError(f"iGPT width={width} is not divisible by heads={heads}; choose heads that divide the width")
        if not 1 <= readout_layer <= depth:
            raise ConfigError(f"iGPT readout_layer={readout_layer} is out of range; use a block from 1 to depth={depth}")
        self.grid, self.readout_layer = grid, readout_layer
        self.palette = ColourPalette(palette_size)
        self.transformer = ImageGPT(palette_size, grid * grid, depth, width, heads, causal)
        self.pooled_dim = width
        self.map_channels = {max(1, round(image_size / grid)): width}
        self.spec = {"backbone": "igpt", "palette_size": palette_size, "grid": grid, "image_size": image_size,
                     "depth": depth, "width": width, "heads": heads, "causal": causal, "readout_layer": readout_layer}

    def to_grid(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] at token resolution (B, 3, grid, grid): area averaging."""
        return F.interpolate(images, size=(self.grid, self.grid), mode="area")

    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, 3, H, W) in [0, 1] -> palette tokens (B, grid * grid) in raster order."""
        return self.palette.quantize(self.to_grid(images)).flatten(1)

    def forward(self, images: torch.Tensor) -> Features:
        hidden = self.transformer(self.tokenize(images), layers=self.readout_layer)
        features = F.layer_norm(hidden.float(), hidden.shape[-1:])
        stride = max(1, round(images.shape[-2] / self.grid))
        grid_map = features.transpose(1, 2).reshape(len(features), -1, self.grid, self.grid)
        return Features(pooled=features.mean(1), maps={stride: grid_map})


def igpt_encoder_from_spec(spec: dict) -> ImageGPTEncoder:
    """Rebuild a (randomly initialised, palette not fitted) ``ImageGPTEncoder`` from its ``spec``; load weights after."""
    return ImageGPTEncoder(**spec_kwargs(ImageGPTEncoder, spec, "iGPT encoder"))
