"""Batched view augmentation, run on the device the model runs on.

Per-image PIL pipelines in DataLoader workers are the usual bottleneck of SSL on small images. Here a
whole uint8 batch goes to the device once; every random parameter of every image is drawn in one
call on the CPU (so a seeded generator reproduces the views exactly, whatever the device), moved to
the device in one copy, and each transform is a handful of batched tensor ops:

* random resized crop + horizontal flip + rotation are one affine ``grid_sample``;
* colour jitter applies brightness, contrast, saturation and hue in a random order per image
  (as torchvision's ``ColorJitter``) by routing each image through four stages, planned on the host so that
  the device never has to report which images get which op;
* grayscale, Gaussian blur (grouped separable convolution), solarisation, cutout, Gaussian noise
  and Sobel filtering are masked blends.

All the transforms of SimCLR's augmentation study (Chen et al. 2020, Fig. 4) are here so the
composition study can be re-run from a config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import record_function

from sslbench.errors import ConfigError

GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclass
class ViewConfig:
    """One view's augmentation recipe. Defaults: SimCLR for CIFAR (lightly's ``SimCLRTransform``, no blur)."""

    size: int = 32
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.8
    contrast: float = 0.8
    saturation: float = 0.8
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    rotation_p: float = 0.0
    rotation_degrees: float = 0.0
    cutout_p: float = 0.0
    cutout_size: float = 0.5
    noise_p: float = 0.0
    noise_std: float = 0.1
    sobel_p: float = 0.0

    def validate(self) -> None:
        """Fail at start-up, naming the field, rather than producing silently wrong views."""
        for name in ("hflip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "rotation_p", "cutout_p", "noise_p", "sobel_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"view option {name}={value} is not a probability; use a value in [0, 1]")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigError(f"view option crop_scale={self.crop_scale} must satisfy 0 < min <= max <= 1")
        if self.size < 4:
            raise ConfigError(f"view option size={self.size} is too small; use at least 4 pixels")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"view option hue={self.hue} must be in [0, 0.5]")


def _uniform(generator: torch.Generator, n: int, low: float, high: float) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def _bernoulli(generator: torch.Generator, n: int, p: float) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      generator: torch.Generator, tries: int = 10) -> torch.Tensor:
    """Random-resized-crop boxes ``(n, 4)`` as (top, left, h, w) in pixels, torchvision's algorithm.

    Each image draws ``tries`` candidate (area, aspect) pairs and keeps the first that fits; images with
    none fall back to the central crop with the aspect clamped to ``ratio``, as torchvision does.
    """
    area = height * width
    target_area = area * _uniform(generator, n * tries, *scale).view(n, tries)
    log_ratio = _uniform(generator, n * tries, math.log(ratio[0]), math.log(ratio[1])).view(n, tries)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w_sel = w[rows, first.clamp(min=0)]
    h_sel = h[rows, first.clamp(min=0)]
    # Fallback: central crop at the clamped aspect ratio.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    ok = first >= 0
    w_sel = torch.where(ok, w_sel, torch.full_like(w_sel, fw))
    h_sel = torch.where(ok, h_sel, torch.full_like(h_sel, fh))
    top = torch.floor(torch.rand(n, generator=generator) * (height - h_sel + 1))
    left = torch.floor(torch.rand(n, generator=generator) * (width - w_sel + 1))
    top = torch.where(ok, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(ok, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h_sel, w_sel], 1)


def crop_affine(boxes: torch.Tensor, height: int, width: int, flip: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """``(n, 2, 3)`` affine matrices for ``F.affine_grid`` that crop ``boxes``, then flip and rotate.

    ``affine_grid`` maps output coordinates in [-1, 1] to input coordinates in [-1, 1]
    (align_corners=False): x_in = cx + (w/W) * x_out, so the box's pixel extent maps to the output.
    """
    top, left, h, w = boxes.unbind(1)
    cx = (left + w / 2) / width * 2 - 1
    cy = (top + h / 2) / height * 2 - 1
    sx = w / width * torch.where(flip, -1.0, 1.0)
    sy = h / height
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(len(boxes), 2, 3)
    theta[:, 0, 0] = sx * cos
    theta[:, 0, 1] = -sx * sin
    theta[:, 1, 0] = sy * sin
    theta[:, 1, 1] = sy * cos
    theta[:, 0, 2] = cx
    theta[:, 1, 2] = cy
    return theta


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, (B, 1, H, W)."""
    r, g, b = x.unbind(1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by ``shift`` (fraction of a turn, per image) in HSV space, as torchvision's ``adjust_hue``."""
    maxc, argmax = x.max(1)
    minc = x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = x.unbind(1)
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB with the branch-free formula f(n) = v - v s max(0, min(k, 4 - k, 1)), k = (n + 6h) mod 6.
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + hue.unsqueeze(1) * 6.0, 6.0)
    value = maxc.unsqueeze(1)
    return value - value * sat.unsqueeze(1) * torch.clamp(torch.minimum(k, 4.0 - k), 0.0, 1.0)


def _color_op(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    if op == 0:  # brightness
        return (x * f).clamp(0, 1)
    if op == 1:  # contrast: blend with the mean grey level of the image
        mean = grayscale(x).mean((1, 2, 3), keepdim=True)
        return (x * f + mean * (1 - f)).clamp(0, 1)
    if op == 2:  # saturation: blend with the grey image
        return (x * f + grayscale(x) * (1 - f)).clamp(0, 1)
    return _shift_hue(x, factor)


def jitter_plan(order: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
    """Which images get which colour-jitter op at each stage, from the per-image op ``order`` (B, 4) on the host.

    Column s of ``grouping`` lists the images by the op they get at stage s (op 0's first), and ``counts[s]`` gives
    each op's number of images. Planned on the host, where ``order`` is drawn: selecting each op's images on the
    device (``nonzero``) makes the host wait for the device, 16 times a view."""
    grouping = torch.argsort(order, dim=0, stable=True)
    counts = [torch.bincount(order[:, stage], minlength=4).tolist() for stage in range(4)]
    return grouping, counts


def color_jitter(x: torch.Tensor, factors: torch.Tensor, grouping: torch.Tensor, counts: list[list[int]]) -> torch.Tensor:
    """Apply the four jitter ops with per-image ``factors`` (B, 4) in each image's order, as ``jitter_plan`` laid
    it out (``grouping`` on ``x``'s device)."""
    for stage in range(4):
        out = torch.empty_like(x)
        for op, idx in enumerate(grouping[:, stage].split(counts[stage])):
            if len(idx):
                out[idx] = _color_op(x[idx], op, factors[idx, op])
        x = out
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image with its own sigma: a separable kernel applied as a grouped convolution."""
    b, c, h, w = x.shape
    radius = max(1, min(h, w) // 20 * 2 + 1)  # kernel about 10% of the image side, as in SimCLR
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-(coords.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    flat = x.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(b * c, 1, 1, -1), groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(b * c, 1, -1, 1), groups=b * c)
    return flat.view(b, c, h, w)


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude of the grey image, replicated to 3 channels and scaled to [0, 1]."""
    gray = grayscale(x)
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype)
    kernels = torch.stack([kx, kx.t()]).unsqueeze(1)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()
    mag = mag / mag.amax((2, 3), keepdim=True).clamp(min=1e-6)
    return mag.expand(-1, 3, -1, -1)


def _blend(mask: torch.Tensor, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` where the per-image ``mask`` (B,) is true (on the images' device), else ``old``."""
    return torch.where(mask.view(-1, 1, 1, 1), new, old)


def augment(images: torch.Tensor, config: ViewConfig, generator: torch.Generator) -> torch.Tensor:
    """One view of each image of a uint8 batch ``(B, 3, H, W)``: float (B, 3, size, size) in [0, 1].

    ``generator`` is a CPU generator: parameters are drawn on the CPU and sent to ``images.device``
    in one copy, so the same seed gives the same views on CPU and GPU.
    """
    return _augment(images, config, generator)[0]


def augment_with_masks(images: torch.Tensor, masks: torch.Tensor, config: ViewConfig,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``augment`` plus the same crop, flip and rotation applied to per-pixel integer ``masks`` (B, H, W).

    The mask follows the image's sampling grid with nearest sampling (ids are never blended) and the
    same reflection padding, so every view pixel keeps the id of the image pixel it shows; colour
    transforms leave masks alone. The random draws are those of ``augment``: with the same generator
    state the image views are identical to ``augment``'s. Returns (views, masks (B, size, size)).
    """
    views, grid = _augment(images, config, generator)
    return views, warp_masks(masks.to(views.device), grid)


def warp_masks(masks: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Sample integer ``masks`` (B, H, W) at ``grid`` (from ``F.affine_grid``) by nearest neighbour."""
    ids = masks.unsqueeze(1).to(torch.float32)  # float32 holds every id below 2**24 exactly
    warped = F.grid_sample(ids, grid, mode="nearest", padding_mode="reflection", align_corners=False)
    return warped.squeeze(1).round().to(masks.dtype)


def _augment(images: torch.Tensor, config: ViewConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The views and the ``affine_grid`` they were sampled with (crop, flip, rotation)."""
    n, _, height, width = images.shape
    device = images.device
    boxes = sample_crop_boxes(n, height, width, config.crop_scale, config.crop_ratio, generator)
    flip = _bernoulli(generator, n, config.hflip_p)
    rotate = _bernoulli(generator, n, config.rotation_p)
    angle = _uniform(generator, n, -1.0, 1.0) * math.radians(config.rotation_degrees) * rotate
    theta = crop_affine(boxes, height, width, flip, angle)
    jitter = _bernoulli(generator, n, config.jitter_p)
    factors = torch.stack([
        _uniform(generator, n, max(0.0, 1 - config.brightness), 1 + config.brightness),
        _uniform(generator, n, max(0.0, 1 - config.contrast), 1 + config.contrast),
        _uniform(generator, n, max(0.0, 1 - config.saturation), 1 + config.saturation),
        _uniform(generator, n, -config.hue, config.hue),
    ], 1)
    factors = torch.where(jitter.view(-1, 1), factors, torch.tensor([1.0, 1.0, 1.0, 0.0]))
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)
    gray = _bernoulli(generator, n, config.grayscale_p)
    blur = _bernoulli(generator, n, config.blur_p)
    sigma = _uniform(generator, n, *config.blur_sigma)
    solarize = _bernoulli(generator, n, config.solarize_p)
    cutout = _bernoulli(generator, n, config.cutout_p)
    cut_center = torch.rand(n, 2, generator=generator)
    noise = _bernoulli(generator, n, config.noise_p)
    use_sobel = _bernoulli(generator, n, config.sobel_p)

    dtype = torch.float32
    grouping, counts = jitter_plan(order)
    # Every per-image parameter in one host-to-device copy, which does not wait for the device.
    switches = torch.stack([gray, blur, solarize, use_sobel, cutout, noise], 1)
    params = torch.cat([theta.view(n, 6), factors, sigma.view(n, 1), cut_center, switches, grouping], 1)
    params = host_to_device(params.to(dtype), device)  # float32 holds every image index below 2**24 exactly
    theta_d, factors_d, sigma_d, cut_d = params[:, :6].view(n, 2, 3), params[:, 6:10], params[:, 10], params[:, 11:13]
    gray, blur, solarize, use_sobel, cutout, noise = (params[:, 13 + i] > 0 for i in range(6))
    grouping_d = params[:, 19:23].long()

    x = images.to(dtype).div_(255.0)
    grid = F.affine_grid(theta_d, [n, 3, config.size, config.size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if config.jitter_p > 0:
        x = color_jitter(x, factors_d, grouping_d, counts)
    if config.grayscale_p > 0:
        x = _blend(gray, grayscale(x).expand(-1, 3, -1, -1), x)
    if config.blur_p > 0:
        x = _blend(blur, gaussian_blur(x, sigma_d), x)
    if config.solarize_p > 0:
        x = _blend(solarize, torch.where(x < 0.5, x, 1.0 - x), x)
    if config.sobel_p > 0:
        x = _blend(use_sobel, sobel(x), x)
    if config.cutout_p > 0:
        side = config.cutout_size * config.size
        coords = torch.arange(config.size, device=device, dtype=dtype)
        cy, cx = cut_d[:, 0] * config.size, cut_d[:, 1] * config.size
        inside_y = (coords.view(1, -1) - cy.view(-1, 1)).abs() < side / 2
        inside_x = (coords.view(1, -1) - cx.view(-1, 1)).abs() < side / 2
        hole = (inside_y.unsqueeze(2) & inside_x.unsqueeze(1)).unsqueeze(1)
        x = _blend(cutout, x.masked_fill(hole, 0.0), x)
    if config.noise_p > 0:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        device_gen = torch.Generator(device=device).manual_seed(seed)
        gaussian = torch.randn(x.shape, generator=device_gen, device=device, dtype=dtype) * config.noise_std
        x = _blend(noise, (x + gaussian).clamp(0, 1), x)
    return x, grid


VIEWS_RANGE = "sslbench.views"
"""torch.profiler range of the batched augmentation of one step."""


class ViewMaker:
    """Makes the views of a method from uint8 batches: a list of recipes, one view each.

    Multi-crop methods (SwAV, DINO) pass 2 global recipes and N small-crop recipes.
    """

    def __init__(self, views: list[ViewConfig]):
        for view in views:
            view.validate()
        self.views = views

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        # A named range, so that a torch.profiler trace (benchmarks/profile_pretrain.py) shows the data path apart.
        with record_function(VIEWS_RANGE):
            out = [augment(images, view, generator) for view in self.views]
            return [_channels_last(v) for v in out]

    def with_masks(self, images: torch.Tensor, masks: torch.Tensor,
                   generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The views (as ``__call__``) and each view's warped ``masks`` (B, size, size) (DetCon's segments)."""
        with record_function(VIEWS_RANGE):
            pairs = [augment_with_masks(images, masks, view, generator) for view in self.views]
            return [_channels_last(v) for v, _ in pairs], [m for _, m in pairs]


def _channels_last(view: torch.Tensor) -> torch.Tensor:
    """Views leave in channels_last, the layout of the convnet methods' models (``Method.channels_last``), so the
    first convolution does not convert them; a model kept contiguous reads them just as well."""
    return view.contiguous(memory_format=torch.channels_last)


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator for one training step: views depend only on (seed, step), so resume is exact."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def host_to_device(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` (random draws from a ``step_generator``, on the host) on ``device``, without making the host wait: a
    blocking host-to-device copy waits for the device's queue to drain, every step. A non-blocking copy from
    ordinary host memory is staged before it returns, so ``x`` may be dropped at once. A tensor already on a device
    is copied blocking: a non-blocking copy to the host could be read before it lands."""
    return x.to(device, non_blocking=x.device.type == "cpu")
