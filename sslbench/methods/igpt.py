"""iGPT (Chen et al. 2020, "Generative Pretraining from Pixels"), at small scale.

Images are resized to a small token grid and quantised with a k-means colour palette fitted on training
pixels before the first step; a GPT-2 transformer then learns the token sequence in raster order, either
autoregressively (next-token prediction) or BERT-style (predict 15% masked tokens). The exported encoder
is ``sslbench.backbones.igpt.ImageGPTEncoder``: it carries the palette and reads a middle layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.augment import ViewConfig, host_to_device
from sslbench.backbones.igpt import ImageGPTEncoder
from sslbench.backbones.palette import sample_pixels
from sslbench.config import check_range
from sslbench.errors import ConfigError
from sslbench.methods.base import PretrainMethod

OBJECTIVES = ("autoregressive", "bert")


def autoregressive_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """iGPT's L_AR (eq. 1): the mean over images and positions of ``-log p(x_i | x_<i)``, in nats.

    ``logits`` (B, n, K): slot ``i`` holds the prediction of ``tokens[:, i]`` (B, n).
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())


def masked_token_loss(logits: torch.Tensor, tokens: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """iGPT's L_BERT (eq. 2): ``-log p(x_i | unmasked tokens)`` averaged over the masked positions ``i``.

    ``masked`` (B, n) bool. The mean runs over all masked positions of the batch (iGPT's code first
    averages within each image; the two agree in expectation, and this one needs no image to be masked).
    A batch without masked positions gives 0.
    """
    losses = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
    weights = masked.flatten().float()
    return (losses * weights).sum() / weights.sum().clamp(min=1.0)


def bert_mask(shape: tuple[int, ...], ratio: float, generator: torch.Generator) -> torch.Tensor:
    """iGPT's BERT mask: every position is masked independently with probability ``ratio`` (CPU bool tensor)."""
    return torch.rand(shape, generator=generator) < ratio


@dataclass
class IGPTOptions:
    """The transformer (iGPT-S is depth 24, width 512, 8 heads on 32x32 tokens; these defaults are small),
    the objective, and the palette fit (``palette_pixels`` sampled pixels, ``palette_iterations`` Lloyd rounds)."""

    objective: str = "autoregressive"
    palette_size: int = 512
    grid: int = 16
    depth: int = 8
    width: int = 256
    heads: int = 8
    readout_layer: int | None = None
    mask_ratio: float = 0.15
    hflip: bool = True
    palette_pixels: int = 65536
    palette_iterations: int = 20

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"option objective={self.objective!r} is not allowed; use one of {', '.join(OBJECTIVES)}")
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"option mask_ratio={self.mask_ratio} is out of range; use a value in (0, 1) (iGPT: 0.15)")
        check_range("palette_pixels", self.palette_pixels, self.palette_size)
        check_range("palette_iterations", self.palette_iterations, 0)


class IGPT(PretrainMethod):
    """Fit the palette, then train the transformer plus a linear head over the palette on the token sequences."""

    name = "igpt"
    Options = IGPTOptions
    # iGPT's recipe (Sec. 3.3): Adam with beta2 = 0.95, one warm-up epoch then cosine decay to 0, no weight
    # decay (a small one did not change representation quality), batch 128; lr 1e-3, from their lr sweep.
    train_defaults = {"optimizer": "adamw", "lr": 1e-3, "betas": (0.9, 0.95), "weight_decay": 0.0, "batch_size": 128,
                      "warmup_epochs": 1.0}
    default_backbone = {"backbone": "igpt"}
    channels_last = False  # no convolutions: images become token sequences

    def build_encoder(self) -> ImageGPTEncoder:
        name = self.backbone_spec.get("backbone")
        if name != "igpt":
            raise ConfigError(f"method igpt trains its own transformer, not backbone {name!r}; drop --backbone and size it "
                              "with --set depth=..., width=..., heads=...")
        o = self.options
        return ImageGPTEncoder(palette_size=o.palette_size, grid=o.grid, image_size=self.image_size, depth=o.depth,
                               width=o.width, heads=o.heads, causal=o.objective == "autoregressive",
                               readout_layer=o.readout_layer)

    def build(self) -> None:
        o = self.options
        # iGPT's output embedding starts at zero: every token starts at probability 1/K, loss log K.
        self.head = nn.Linear(o.width, o.palette_size, bias=False)
        nn.init.zeros_(self.head.weight)
        # The only augmentation is a horizontal flip of the whole image (no crop, no colour change).
        flip = ViewConfig(size=self.image_size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                          hflip_p=0.5 if o.hflip else 0.0, jitter_p=0.0, grayscale_p=0.0)
        self.views = self.make_views([flip])

    def initialise_from_data(self, images: torch.Tensor, generator: torch.Generator) -> None:
        """Fit the palette on a seeded sample of training pixels at token resolution.

        Under DDP every process fits it from the same images and seed on the CPU, so all get the same palette.
        """
        o = self.options
        pixels = sample_pixels(images, o.palette_pixels, generator, self.encoder.to_grid)
        self.encoder.palette.fit(pixels, o.palette_iterations, generator)

    def token_logits(self, tokens: torch.Tensor, masked: torch.Tensor | None = None) -> torch.Tensor:
        """Palette logits (B, n, K) at every slot; slot ``i`` predicts ``tokens[:, i]``, from the tokens before
        it (autoregressive) or from the tokens not ``masked`` (BERT)."""
        transformer = self.encoder.transformer
        return self.head(transformer.norm(transformer(tokens, masked=masked)))

    def training_loss(self, images: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        tokens = self.encoder.tokenize(self.views(images, generator)[0])
        if self.options.objective == "autoregressive":
            return autoregressive_loss(self.token_logits(tokens), tokens), {}
        masked = host_to_device(bert_mask(tuple(tokens.shape), self.options.mask_ratio, generator), tokens.device)
        return masked_token_loss(self.token_logits(tokens, masked), tokens, masked), {}

    def compiled_modules(self) -> list[nn.Module]:
        return [self.encoder.transformer]  # the loss calls the transformer on tokens, not the encoder's forward
