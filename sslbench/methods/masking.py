"""Patch masking for masked image modelling, shared by MAE, UM-MAE and BEiT.

Patches are numbered in raster order over the ViT's grid, the order of ``patchify`` and of the ViT's
tokens. MAE samples patches to keep at random, UM-MAE keeps one per 2x2 block, BEiT masks rectangular
blocks of patches (``BlockwiseMasking``).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from sslbench.backbones import build_encoder
from sslbench.backbones.vit import VisionTransformer
from sslbench.errors import ConfigError

BEIT_ASPECT_RANGE = (0.3, 1 / 0.3)
"""The range of a BEiT block's aspect ratio (Bao et al. 2022, Algorithm 1), sampled log-uniformly."""
BEIT_MIN_BLOCK_FRACTION = 16 / 196
"""BEiT's smallest block: 16 patches of ViT-B/16's 14x14 grid at 224 px (its ``min_num_patches``)."""


def masked_image_vit(method: str, backbone: dict[str, Any], image_size: int) -> VisionTransformer:
    """The ViT that a masked-image-modelling method trains, built at the training images' size when the
    spec has no size of its own (the methods' default backbones); a ConfigError for any other backbone
    and for images that are not cut into whole patches."""
    if backbone.get("backbone") != "vit":
        raise ConfigError(f"{method} needs a ViT backbone, got {backbone.get('backbone')!r}; "
                          "use --backbone vit-tiny, vit-small or vit-nano")
    encoder = build_encoder({"image_size": image_size, **backbone})
    if image_size % encoder.patch_size:
        raise ConfigError(f"image size {image_size} is not a multiple of the ViT patch size {encoder.patch_size}; "
                          "change --image-size or the patch size (e.g. --backbone vit-tiny/8)")
    return encoder


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/p * W/p, p * p * C): patches in raster order, pixels (row, column, channel) within."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def standardise_patches(patches: torch.Tensor, eps: float) -> torch.Tensor:
    """Each patch vector (..., D) less its own mean, over its own (unbiased) standard deviation: MAE's normalised
    pixels, ``(x - mean) / sqrt(var + eps)``. What is left of a patch is its structure, not its colour or contrast."""
    return (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + eps).sqrt()


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """The inverse of ``patchify`` for ``height`` x ``width`` images."""
    b, _, dim = patches.shape
    p = patch_size
    c = dim // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, height, width)


def random_keep_indices(batch: int, num_patches: int, num_keep: int, generator: torch.Generator) -> torch.Tensor:
    """MAE's random masking: for each image, the first ``num_keep`` of a random permutation of the patches (B, K)."""
    return torch.rand(batch, num_patches, generator=generator).argsort(1)[:, :num_keep]


def uniform_keep_indices(batch: int, grid_height: int, grid_width: int, generator: torch.Generator) -> torch.Tensor:
    """UM-MAE's uniform sampling: one kept patch per 2x2 block, (B, blocks), blocks in raster order.

    Each image draws its blocks' kept corners without replacement from a pool holding each of the 4
    corners equally often, with at least twice as many entries as blocks (official code), so the
    corners are kept in near-equal numbers in every image.
    """
    blocks_high, blocks_wide = grid_height // 2, grid_width // 2
    blocks = blocks_high * blocks_wide
    pool = torch.arange(4).repeat(math.ceil(blocks / 2))
    corners = pool[torch.rand(batch, len(pool), generator=generator).argsort(1)[:, :blocks]]
    block = torch.arange(blocks)
    rows = 2 * (block // blocks_wide) + corners // 2
    cols = 2 * (block % blocks_wide) + corners % 2
    return rows * grid_width + cols


def gather_patches(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The rows ``indices`` (B, M) of every image of ``x`` (B, N, ...): (B, M, ...)."""
    index = indices.view(*indices.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


@dataclass(frozen=True)
class Block:
    """A rectangle of patches: rows ``top`` to ``top + height - 1``, columns ``left`` to ``left + width - 1``."""

    top: int
    left: int
    height: int
    width: int


class BlockwiseMasking:
    """BEiT's block-wise masking (Bao et al. 2022, Algorithm 1), made exact: ``num_masked`` patches per image.

    Algorithm 1 repeats: draw a block area ``s`` uniformly between ``min_block_patches`` and the number
    of patches still to mask, an aspect ratio ``r`` log-uniformly in [0.3, 1/0.3], sides
    ``round(sqrt(s r))`` x ``round(sqrt(s / r))`` (rows x columns) and a uniform position where the block
    fits in the grid, and mask the block's patches, until enough are masked. As in the official
    ``MaskingGenerator``, a block is rejected when it would mask nothing new or more patches than are still
    to mask (so the count never overshoots), and the block phase ends after ``attempts`` rejections in a
    row. The official code stops there, a few patches short when the budget left is smaller than the
    blocks; here the remaining patches are masked one at a time, each drawn uniformly among the unmasked
    patches next (4-neighbour) to a masked one, so every image has exactly ``num_masked`` masked patches
    (which also lets a batch gather them as a (B, M) index) and the top-up stays on the blocks' edges.
    """

    def __init__(self, grid_height: int, grid_width: int, num_masked: int, min_block_patches: int,
                 aspect_range: tuple[float, float] = BEIT_ASPECT_RANGE, attempts: int = 10):
        num_patches = grid_height * grid_width
        if not 1 <= num_masked <= num_patches:
            raise ConfigError(f"block-wise masking of {num_masked} patches is impossible on a {grid_height}x{grid_width} grid; "
                              f"mask between 1 and {num_patches} patches")
        if min_block_patches < 1:
            raise ConfigError(f"option min_block_patches={min_block_patches} is out of range; use a value >= 1")
        self.grid_height, self.grid_width = grid_height, grid_width
        self.num_masked = num_masked
        self.min_block_patches = min_block_patches
        self.log_aspect_range = (math.log(aspect_range[0]), math.log(aspect_range[1]))
        self.attempts = attempts

    def sample(self, rng: random.Random) -> tuple[bytearray, list[Block]]:
        """One image's mask (N bytes, 1 = masked, raster order) and the blocks placed before the top-up."""
        mask = bytearray(self.grid_height * self.grid_width)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masked:
            placed = self._place_block(mask, self.num_masked - count, rng)
            if placed is None:
                break
            blocks.append(placed[0])
            count += placed[1]
        for _ in range(self.num_masked - count):
            mask[rng.choice(self._frontier(mask))] = 1
        return mask, blocks

    def _place_block(self, mask: bytearray, budget: int, rng: random.Random) -> tuple[Block, int] | None:
        """Mask one block that adds between 1 and ``budget`` patches: (block, patches added), or None."""
        for _ in range(self.attempts):
            area = rng.uniform(self.min_block_patches, budget)
            aspect = math.exp(rng.uniform(*self.log_aspect_range))
            height, width = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if height > self.grid_height or width > self.grid_width:
                continue
            top, left = rng.randint(0, self.grid_height - height), rng.randint(0, self.grid_width - width)
            rows = [(top + row) * self.grid_width + left for row in range(height)]
            added = sum(mask[start:start + width].count(0) for start in rows)
            if 0 < added <= budget:
                for start in rows:
                    mask[start:start + width] = b"\x01" * width
                return Block(top, left, height, width), added
        return None

    def _frontier(self, mask: bytearray) -> list[int]:
        """Unmasked patches with a masked 4-neighbour; all unmasked patches when none is masked yet."""
        w = self.grid_width

        def touches_mask(i: int) -> bool:
            row, col = divmod(i, w)
            return ((row > 0 and mask[i - w]) or (row < self.grid_height - 1 and mask[i + w])
                    or (col > 0 and mask[i - 1]) or (col < w - 1 and mask[i + 1]))

        unmasked = [i for i, value in enumerate(mask) if not value]
        return [i for i in unmasked if touches_mask(i)] or unmasked

    def __call__(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """Masks of ``batch`` images (B, N) bool, on the CPU, drawn from ``generator`` (a fresh mask per image).

        The block loop is plain Python on bytes (cheaper than tensor ops on a handful of patches), seeded
        by one draw from ``generator``, so the masks depend only on the generator's state.
        """
        rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
        masks = b"".join(self.sample(rng)[0] for _ in range(batch))
        return torch.frombuffer(bytearray(masks), dtype=torch.uint8).view(batch, -1).bool()
