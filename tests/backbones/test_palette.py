"""The k-means colour palette: exact on images of K colours, bounded error on random colours, seeded sampling."""

import math

import pytest
import torch
import torch.nn.functional as F

from sslbench.backbones.palette import ColourPalette, kmeans, nearest_centre, sample_pixels
from sslbench.errors import ConfigError, SslbenchError


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _fitted(k, pixels, iterations=10):
    palette = ColourPalette(k)
    palette.fit(pixels, iterations, _generator())
    return palette


def test_images_made_of_exactly_k_colours_round_trip_without_error():
    k = 16
    colours = torch.rand(k, 3, generator=_generator(1))
    images = colours[torch.randint(0, k, (6, 8, 8), generator=_generator(2))].permute(0, 3, 1, 2)
    palette = _fitted(k, images.permute(0, 2, 3, 1).reshape(-1, 3))
    # k-means++ never draws a point twice while other points remain, so every colour becomes a centre.
    assert torch.allclose(palette.colours[palette.colours[:, 0].argsort()], colours[colours[:, 0].argsort()], atol=1e-6)
    tokens = palette.quantize(images)
    assert tokens.shape == (6, 8, 8) and tokens.dtype == torch.long
    assert (palette.dequantize(tokens) - images).abs().max() < 1e-6


@pytest.mark.parametrize("k", [8, 64])
def test_error_on_random_colours_is_bounded_by_the_palette_size(k):
    palette = _fitted(k, torch.rand(8192, 3, generator=_generator(3)))
    images = torch.rand(4, 3, 16, 16, generator=_generator(4))  # held-out colours
    error = (palette.dequantize(palette.quantize(images)) - images).norm(dim=1)
    # K centres spread over the unit cube leave cells of side K^(-1/3); no pixel is farther from its centre
    # than a cell's diagonal (measured: about half of it).
    assert error.max() < math.sqrt(3) / k ** (1 / 3)
    # The nearest colour is the one returned: no other palette colour is closer to any pixel.
    distances = torch.cdist(images.permute(0, 2, 3, 1).reshape(-1, 3), palette.colours)
    assert torch.allclose(error.flatten(), distances.min(1).values, atol=1e-5)


def test_lloyd_iterations_lower_the_quantisation_error_of_the_seeds():
    points = torch.rand(4096, 3, generator=_generator(5))

    def inertia(centres):
        return (points - centres[nearest_centre(points, centres)]).pow(2).sum(1).mean()

    seeds = kmeans(points, 32, 0, _generator(6))
    refined = kmeans(points, 32, 10, _generator(6))
    assert inertia(refined) < 0.8 * inertia(seeds)


def test_quantisation_is_float32_under_bf16_autocast():
    # Greys 0.001 apart: bf16 (8 bits of mantissa) cannot tell them apart.
    palette = ColourPalette(8)
    palette.colours.copy_(torch.linspace(0.500, 0.507, 8).view(-1, 1).expand(-1, 3))
    palette.fitted.fill_(True)
    images = palette.colours[torch.arange(8)].T.reshape(1, 3, 2, 4).contiguous()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = palette.quantize(images)
    assert tokens.flatten().tolist() == list(range(8))


def test_sample_pixels_draws_seeded_pixels_of_the_prepared_images():
    # Image i is a checkerboard of 0 and 20 i: only after the 2x area downsampling is every pixel 10 i.
    board = (torch.arange(4).view(-1, 1) + torch.arange(4)) % 2
    images = (board * 20 * torch.arange(10).view(-1, 1, 1, 1)).expand(-1, 3, -1, -1).to(torch.uint8).contiguous()

    def prepare(x):
        return F.interpolate(x, size=(2, 2), mode="area")

    pixels = sample_pixels(images, 500, _generator(7), prepare, chunk=3)
    assert pixels.shape == (500, 3)
    values = (pixels * 255).round()
    assert set(values.flatten().tolist()) == {10.0 * i for i in range(10)}  # every image contributes
    assert torch.equal(pixels, sample_pixels(images, 500, _generator(7), prepare))
    assert not torch.equal(pixels, sample_pixels(images, 500, _generator(8), prepare))


def test_unfitted_palette_and_too_few_points_are_clear_errors():
    with pytest.raises(SslbenchError, match="not fitted"):
        ColourPalette(4).quantize(torch.rand(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="at least k=16 points"):
        kmeans(torch.rand(10, 3), 16, 5, _generator())
    with pytest.raises(ConfigError, match="palette size 1"):
        ColourPalette(1)
