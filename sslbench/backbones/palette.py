"""A k-means colour palette: images in [0, 1] <-> integer colour tokens.

iGPT (Chen et al. 2020, "Generative Pretraining from Pixels") shrinks the 256^3 RGB values to a 9-bit
colour palette by clustering pixel values with k-means (k = 512) and replacing every pixel by the index of
its nearest centre. Any method that predicts discrete pixels (iGPT, a BEiT-style masked-token model)
needs the same tokeniser, so it lives here, with the backbones that quantise their input, and knows nothing
about transformers.

The centres are buffers, so they travel with checkpoints and exported encoders: a palette is fitted once
on training pixels and never refitted when a run resumes or an encoder is reloaded.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from sslbench.errors import ConfigError, SslbenchError


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): ``k`` centres chosen from ``points`` (N, D).

    The first centre is uniform; each next one is drawn with probability proportional to the squared
    distance to the nearest centre chosen so far, so an already chosen point is never drawn again while
    other points remain. When every point coincides with a centre (fewer distinct points than ``k``) the
    remaining centres are drawn uniformly, i.e. duplicated.
    """
    n = len(points)
    # Channels first, so that the distances to one centre are a fast reduction over a short first dimension.
    columns = points.t().float().contiguous()
    chosen = torch.empty(k, dtype=torch.long)
    chosen[0] = torch.randint(n, (1,), generator=generator)
    nearest = (columns - columns[:, chosen[0], None]).pow(2).sum(0)
    for i in range(1, k):
        # Inverse-CDF draw (``torch.multinomial`` is much slower on 10^5 weights). With ``right=True`` a
        # zero-weight point can never be drawn: adding 0 leaves its cumulative sum equal to its predecessor's.
        cumulative = torch.cumsum(nearest, 0)
        if cumulative[-1] <= 0:
            cumulative = torch.arange(1, n + 1, dtype=cumulative.dtype)
        target = torch.rand(1, generator=generator) * cumulative[-1]
        chosen[i] = torch.searchsorted(cumulative, target, right=True).clamp(max=n - 1)[0]
        nearest = torch.minimum(nearest, (columns - columns[:, chosen[i], None]).pow(2).sum(0))
    return points[chosen]


def nearest_centre(points: torch.Tensor, centres: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Index of the nearest centre (squared Euclidean distance) of every row of ``points`` (N, D), in float32.

    ``|x - c|^2 = |x|^2 - 2 x.c + |c|^2`` and ``|x|^2`` is the same for every centre, so the argmin of
    ``|c|^2 - 2 x.c`` is one ``addmm`` per ``chunk`` rows (chunks keep the score matrix in cache: 4x faster
    than one product on CPU). Autocast is switched off because bf16 would merge close colours.
    """
    with torch.autocast(device_type=points.device.type, enabled=False):
        centres = centres.float()
        squared_norms, scaled = centres.pow(2).sum(1), -2.0 * centres.t()
        return torch.cat([torch.addmm(squared_norms, rows, scaled).argmin(1) for rows in points.float().split(chunk)])


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means (``iterations`` rounds) from k-means++ seeds: ``k`` centres (k, D) of ``points`` (N, D).

    A centre that loses all its points keeps its position (it can win points back in a later round).
    """
    if len(points) < k:
        raise ConfigError(f"k-means needs at least k={k} points but got {len(points)}; sample more pixels or use a smaller palette")
    points = points.float()
    centres = kmeans_plus_plus(points, k, generator)
    for _ in range(iterations):
        assignment = nearest_centre(points, centres)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=k).to(points.dtype).unsqueeze(1)
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


def sample_pixels(images: torch.Tensor, count: int, generator: torch.Generator,
                  prepare: Callable[[torch.Tensor], torch.Tensor], chunk: int = 1024) -> torch.Tensor:
    """``count`` pixels (count, C), drawn uniformly with replacement from a uint8 dataset (N, 3, H, W).

    ``prepare`` maps a float [0, 1] batch to the images the palette will quantise (for iGPT: resized to
    the token grid; for a patch codebook: one C-dimensional vector per patch), so the palette is fitted on
    the vectors it will actually see. Only the images that
    hold a sampled pixel are prepared (at most ``count``), ``chunk`` at a time, so memory stays bounded
    whatever the dataset's size.
    """
    first = prepare(images[:1].float() / 255.0)
    per_image = first.shape[-2] * first.shape[-1]
    flat = torch.randint(0, len(images) * per_image, (count,), generator=generator)
    image_index, position = flat // per_image, flat % per_image
    needed, owner = torch.unique(image_index, return_inverse=True)
    pixels = torch.empty(count, first.shape[1])
    for start in range(0, len(needed), chunk):
        prepared = prepare(images[needed[start:start + chunk]].float() / 255.0)
        prepared = prepared.flatten(2).transpose(1, 2)  # (chunk, h*w, C)
        rows = ((owner >= start) & (owner < start + chunk)).nonzero().squeeze(1)
        pixels[rows] = prepared[owner[rows] - start, position[rows]].float()
    return pixels


class ColourPalette(nn.Module):
    """``size`` RGB colours in [0, 1] (a buffer), fitted by k-means; quantises images to colour indices.

    ``channels`` other than 3 make it a codebook of ``size`` vectors for images of that many channels (a
    BEiT-style patch codebook quantises one vector of p*p*3 values per patch); the k-means is the same."""

    def __init__(self, size: int, channels: int = 3):
        super().__init__()
        if size < 2:
            raise ConfigError(f"palette size {size} is too small; use at least 2 colours (iGPT uses 512)")
        self.size = size
        self.register_buffer("colours", torch.zeros(size, channels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, pixels: torch.Tensor, iterations: int, generator: torch.Generator) -> None:
        """Fit the colours to ``pixels`` (N, C) with k-means (k-means++ seeds, ``iterations`` rounds)."""
        centres = kmeans(pixels.cpu(), self.size, iterations, generator)
        self.colours.copy_(centres.to(self.colours.device))
        self.fitted.fill_(True)

    def quantize(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (B, C, H, W) -> tokens (B, H, W), the index of each pixel's nearest colour."""
        if not bool(self.fitted):
            raise SslbenchError("the colour palette is not fitted; fit it on training pixels first "
                                "(engine.pretrain does so through PretrainMethod.initialise_from_data)")
        b, _, h, w = images.shape
        pixels = images.permute(0, 2, 3, 1).reshape(-1, images.shape[1])
        return nearest_centre(pixels, self.colours).view(b, h, w)

    def dequantize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, H, W) -> images (B, C, H, W) made of the palette's colours."""
        return self.colours[tokens].permute(0, 3, 1, 2)
