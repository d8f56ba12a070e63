"""BEiT-style masked image modelling with k-means palette tokens (after Bao et al. 2022, "BEiT: BERT
Pre-Training of Image Transformers").

BEiT masks about 40% of the patches with block-wise masking, feeds *all* positions to the ViT (the
masked ones as a learned mask token plus their position, unlike MAE, which drops them) and trains a
linear head to predict the visual tokens of the masked patches, with a cross-entropy on those
positions only. BEiT's tokens come from DALL-E's discrete VAE; **this method does not use a dVAE**.
Its tokens come from a k-means palette (``sslbench.backbones.palette``): iGPT's colour palette, or a palette of
patches (``codes`` below), fitted on training images before the first step and kept in the checkpoint, hence the
name ``beit_palette``.

Three targets (``target``), all k-means tokens:

- ``"pixels"`` (default): the palette index of *every pixel* of a masked patch, i.e. each masked patch is p*p
  classifications over the palette (p = patch size) from one ViT output. It keeps what BEiT's token stands for, the
  content of the patch, as a factorised code of its p*p colours. The cost is a head of p*p*K outputs (patch 4,
  K = 512: 8192, the size of BEiT's vocabulary), evaluated only at the masked positions.
- ``"patches"``: one token per patch, the palette index of the patch's mean colour (area averaging to the patch
  grid, the tokens iGPT reads at its 8x8 grid). A mean is a blend that may appear nowhere in the patch, but it
  depends less on the pixels along the patch's border, which sit next to visible ones; the head is p*p times smaller.
  The palette is then fitted on patch means, the colours it will quantise.
- ``"codes"``: one token per patch from a k-means codebook of *patches*: each patch's p*p*3 values, standardised
  over themselves as MAE's normalised-pixel target is (``standardise_patches``), quantised to the nearest of
  ``palette_size`` centres fitted on such vectors. Standardising removes the patch's colour and contrast, so the
  token names its structure (an edge, a corner, a flat patch), what a dVAE token mostly encodes and what colour
  tokens can be guessed without: a colour is predictable from the colours around a patch. Still k-means, not a
  dVAE: the codebook is a palette of patch shapes.

What ``generative_c10_mini.md`` measured: at C10-mini's budget (585 steps) neither colour target lifts any layer of
the ViT more than about a point above its random initialisation, whatever the learning rate or mask ratio; the
per-patch target took half the time per epoch. Patch codes at lr 1.5e-3 lift every layer by 1 to 3 points (+1.9 kNN,
+2.3 linear at the exported readout): the C10-mini recipe. The default stays ``pixels``, the palette tokens the
method is named for.

What differs from BEiT besides the tokens: the ViT has learned absolute positions and no layer scale
or relative position bias, and gradients are not clipped. What follows it: 40% block-wise masking
(``BlockwiseMasking``, here with an exact count), the mask token and head initialised with a truncated
normal of std 0.02, views that are a random resized crop (scale 0.08-1) and a horizontal flip, the
targets read from the same view, and AdamW with betas (0.9, 0.98), weight decay 0.05, lr 1.5e-3 at
batch 2048 scaled linearly with the batch, warm-up over 10 of 800 epochs and drop path 0.1 (its
ViT-B recipe). The exported encoder is the ViT.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.augment import ViewConfig, host_to_device
from sslbench.backbones.palette import ColourPalette, sample_pixels
from sslbench.backbones.vit import VIT_PRESETS, VisionTransformer
from sslbench.config import check_range
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod, TrainConfig
from sslbench.methods.masking import (BEIT_MIN_BLOCK_FRACTION, BlockwiseMasking, gather_patches, masked_image_vit,
                                      patchify, standardise_patches)


def palette_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BEiT's masked image modelling loss (Bao et al. 2022, eq. 1) on palette tokens: ``-log p(token)``
    averaged over the masked patches of the batch and the p*p pixels of each, in nats.

    ``logits`` (B, M, P, K): the predictions at the M masked patches of each image, P pixels per patch,
    K palette colours; ``targets`` (B, M, P): the palette indices of those pixels.
    """
    return F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())


TARGETS = ("pixels", "patches", "codes")
FLAT_PATCH_VARIANCE = 0.02**2
"""``eps`` of the ``codes`` target's standardisation, on [0, 1] pixels: a patch whose values vary by less than about
5 grey levels (standard deviation 0.02) is shrunk towards the flat vector instead of having its noise blown up to
a random structure (MAE's 1e-6 would)."""


@dataclass
class BEiTPaletteOptions:
    """Masking (BEiT: 40% of the patches in blocks of at least 16 of 196 patches, ``min_block_patches=None``
    scales that to the grid), the palette (iGPT's 512 colours, fitted on ``palette_pixels`` sampled pixels
    with ``palette_iterations`` Lloyd rounds) and the crop scale of the views."""

    mask_ratio: float = 0.4
    min_block_patches: int | None = None
    palette_size: int = 512
    palette_pixels: int = 65536
    palette_iterations: int = 20
    crop_scale: tuple[float, float] = (0.08, 1.0)
    target: str = "pixels"
    """``"pixels"``: the palette token of every pixel of a masked patch; ``"patches"``: one token per patch, that of
    its mean colour; ``"codes"``: one token per patch from a k-means codebook of standardised patches (see the module
    docstring)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"option mask_ratio={self.mask_ratio} is out of range; use a value in (0, 1) (BEiT: 0.4)")
        check_range("min_block_patches", self.min_block_patches, 1)
        check_range("palette_pixels", self.palette_pixels, self.palette_size)
        check_range("palette_iterations", self.palette_iterations, 0)
        if self.target not in TARGETS:
            raise ConfigError(f"option target={self.target!r} is not allowed; use one of {', '.join(TARGETS)}")


class BEiTPalette(PretrainMethod):
    """A ViT that predicts the palette tokens of block-masked patches from a mask token at their positions."""

    name = "beit_palette"
    Options = BEiTPaletteOptions
    train_defaults = {"optimizer": "adamw", "weight_decay": 0.05, "betas": (0.9, 0.98)}
    default_backbone = {"backbone": "vit", **VIT_PRESETS["tiny"], "patch_size": 4, "drop_path": 0.1}

    @classmethod
    def derived_train_defaults(cls, backbone: dict[str, Any], train: TrainConfig) -> dict[str, Any]:
        return {"lr": 1.5e-3 * train.batch_size / 2048, "warmup_epochs": train.epochs * 10 / 800}

    def build_encoder(self) -> VisionTransformer:
        return masked_image_vit(self.name, self.backbone_spec, self.image_size)

    def build(self) -> None:
        o = self.options
        encoder: VisionTransformer = self.encoder
        grid = self.image_size // encoder.patch_size
        num_patches = grid * grid
        num_masked = round(o.mask_ratio * num_patches)
        if not 1 <= num_masked < num_patches:
            raise ConfigError(f"option mask_ratio={o.mask_ratio} masks {num_masked} of {num_patches} patches; "
                              "use a ratio that masks at least one patch and leaves one visible")
        min_block = o.min_block_patches or max(1, round(BEIT_MIN_BLOCK_FRACTION * num_patches))
        self.masking = BlockwiseMasking(grid, grid, num_masked, min_block)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, encoder.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        # Target tokens per patch side: one per pixel, or one for the whole patch; a code quantises all p*p*3 values.
        self.tokens_per_side = encoder.patch_size if o.target == "pixels" else 1
        self.palette = ColourPalette(o.palette_size, 3 * encoder.patch_size**2 if o.target == "codes" else 3)
        self.head = nn.Linear(encoder.dim, self.tokens_per_side ** 2 * o.palette_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        view = ViewConfig(size=self.image_size, crop_scale=tuple(o.crop_scale), jitter_p=0.0, grayscale_p=0.0)
        self.views = self.make_views([view])

    def initialise_from_data(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Fit the palette on a seeded sample of training pixels, at the resolution the views have.

        Under DDP every process fits it from the same images and seed on the CPU, so all get the same palette.
        """
        o = self.options
        pixels = sample_pixels(images, o.palette_pixels, generator, self.token_images)
        self.palette.fit(pixels, o.palette_iterations, generator)

    def token_images(self, images: torch.Tensor) -> torch.Tensor:
        """Float images -> what the target quantises, one vector per token position (B, C, h, w): the pixels
        (``pixels``), the patch means (``patches``), or every patch's p*p*3 values, standardised (``codes``)."""
        p, target = self.encoder.patch_size, self.options.target
        if target == "pixels":
            return images
        if target == "patches":
            return F.avg_pool2d(images, p)
        vectors = standardise_patches(patchify(images.float(), p), FLAT_PATCH_VARIANCE)
        return vectors.transpose(1, 2).unflatten(2, (images.shape[-2] // p, images.shape[-1] // p))

    def target_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every patch's target tokens (B, N, P), P = ``tokens_per_side ** 2``, patches in raster order."""
        return patchify(self.palette.quantize(self.token_images(images)).unsqueeze(1), self.tokens_per_side)

    def export_meta(self) -> dict[str, Any]:
        size, target, p = self.options.palette_size, self.options.target, self.encoder.patch_size
        if target == "codes":
            return {"label": f"{self.name}[codes,k={size}]",
                    "tokenizer": f"k-means codebook of {size} standardised {p}x{p} patches, not a dVAE"}
        return {"label": f"{self.name}[k={size}]", "tokenizer": f"k-means colour palette of {size} colours, not a dVAE"}

    def encode_masked(self, images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """The ViT's patch outputs (B, N, dim) with the ``masked`` (B, N) patches replaced by the mask token."""
        return self.encoder.forward_tokens(images, masked=masked, mask_token=self.mask_token)[:, 1:]

    def masked_prediction_loss(self, outputs: torch.Tensor, tokens: torch.Tensor, masked_indices: torch.Tensor) -> torch.Tensor:
        """The loss from the patch outputs (B, N, dim) and every patch's target tokens (B, N, P), read at the
        masked patches ``masked_indices`` (B, M) only: the head never runs on the visible ones."""
        logits = self.head(gather_patches(outputs, masked_indices))
        logits = logits.unflatten(-1, (self.tokens_per_side ** 2, self.options.palette_size))
        return palette_token_loss(logits, gather_patches(tokens, masked_indices))

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        (view,) = self.views(images, generator)
        masked = self.masking(len(view), generator)
        # Every image has the same number of masked patches, so their indices form a (B, M) tensor.
        masked_indices = host_to_device(masked.nonzero()[:, 1].view(len(view), -1), view.device)
        outputs = self.encode_masked(view, host_to_device(masked, view.device))
        return self.masked_prediction_loss(outputs, self.target_tokens(view), masked_indices), {}

    def compiled_modules(self) -> list[nn.Module]:
        # The loss runs the ViT through forward_tokens (with mask tokens), not its forward: compile its blocks.
        return [*self.encoder.blocks]
