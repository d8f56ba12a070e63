"""Heads that tasks train on top of an encoder's features, built from the Encoder contract alone.

A dense head takes the dict stride -> map of ``Features.maps`` with whatever strides the encoder has
(a ResNet's 4/8/16/32 or 1/2/4/8, one ViT map, a diffusion U-Net's levels) and predicts at any
requested image size. ``TaskHead`` pairs a head with what it reads, so a probe caches only that.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from sslbench.backbones.base import Features
from sslbench.errors import ConfigError

HeadReader = Callable[[nn.Module, Features, tuple[int, int]], torch.Tensor]
"""How a head consumes a feature batch: ``(module, features, output_size) -> output``."""


@dataclass
class TaskHead:
    """A head module, how it reads a feature batch, and the maps it needs (``()``: the pooled vector)."""

    module: nn.Module
    read: HeadReader
    strides: tuple[int, ...] = ()

    def __call__(self, features: Features, output_size: tuple[int, int]) -> torch.Tensor:
        return self.read(self.module, features, output_size)


def _read_pooled(module: nn.Module, features: Features, output_size: tuple[int, int]) -> torch.Tensor:
    return module(features.pooled)


def _read_maps(module: nn.Module, features: Features, output_size: tuple[int, int]) -> torch.Tensor:
    return module(features.maps, output_size)


def _read_one_map(stride: int, module: nn.Module, features: Features, output_size: tuple[int, int]) -> torch.Tensor:
    return module(features.maps[stride])


def usable_strides(map_channels: dict[int, int], finest_stride: int) -> list[int]:
    """The encoder's strides a dense head reads, finest first: those >= ``finest_stride`` (a head's cost
    grows with its finest resolution), or the coarsest one when none is that coarse."""
    if not map_channels:
        raise ConfigError("the encoder reports no feature maps (map_channels is empty); dense heads need an encoder with maps")
    return sorted(s for s in map_channels if s >= finest_stride) or [max(map_channels)]


class LinearHead(nn.Module):
    """A linear layer on pooled features, after a BatchNorm without affine parameters.

    The parameter-free BatchNorm only rescales each feature dimension, so the head stays linear, but
    it makes one learning rate work for encoders whose features differ in scale by orders of
    magnitude (MAE's linear probe, He et al. 2022, does the same).
    """

    def __init__(self, in_dim: int, num_classes: int, batch_norm: bool = True) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_dim, affine=False, eps=1e-6) if batch_norm else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(pooled))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, dilation: int = 1) -> nn.Sequential:
    """Conv (no bias, BN has one) + BatchNorm + ReLU, 'same' padding for odd ``kernel_size``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2), dilation=dilation, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UNetDecoder(nn.Module):
    """The decoder half of a U-Net (Ronneberger et al. 2015) over an encoder's maps.

    The deepest map goes through a 3x3 conv-BN-ReLU to ``width`` channels. Then, for each shallower
    map from coarse to fine, the running map is upsampled bilinearly to that map's size (so odd sizes
    and stride gaps work), concatenated with it (the skip connection) and passed through two 3x3
    conv-BN-ReLU blocks. A 1x1 conv gives ``out_channels`` at the finest map's resolution, upsampled
    bilinearly to the requested output size. One map alone (a ViT) gives a conv head plus upsampling.
    """

    def __init__(self, map_channels: dict[int, int], out_channels: int, width: int = 64) -> None:
        super().__init__()
        if not map_channels:
            raise ConfigError("UNetDecoder needs at least one feature map; the encoder reports no map_channels")
        self.strides = sorted(map_channels, reverse=True)  # deepest first
        self.center = conv_bn_relu(map_channels[self.strides[0]], width)
        self.blocks = nn.ModuleDict({
            str(s): nn.Sequential(conv_bn_relu(width + map_channels[s], width), conv_bn_relu(width, width)) for s in self.strides[1:]
        })
        self.out = nn.Conv2d(width, out_channels, 1)

    def forward(self, maps: dict[int, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        x = self.center(maps[self.strides[0]])
        for stride in self.strides[1:]:
            skip = maps[stride]
            x = self.blocks[str(stride)](torch.cat([_resize(x, skip.shape[-2:]), skip], 1))
        return _resize(self.out(x), output_size)


DEEPLAB_RATES = (6, 12, 18)
DEEPLAB_MAP_SIDE = 33
"""DeepLabV3's atrous rates and the map side they were chosen for: 513-pixel crops at output stride 16
(Chen et al. 2017, "Rethinking Atrous Convolution for Semantic Image Segmentation", section 3.3)."""


def aspp_rates(side: int) -> tuple[int, ...]:
    """DeepLabV3's rates scaled to a map of ``side`` pixels, at least 1.

    A 3x3 filter whose dilation reaches past the map sees only zero padding off its centre, so it
    degenerates to a 1x1 filter (the paper's reason for adding image pooling). Fixed rates 6/12/18 on
    the 4x4 maps of a 32-pixel image would all degenerate; scaled, the largest is 18/33 of the side,
    so every branch keeps reaching real pixels (a 4x4 map gets 1, 1, 2).
    """
    if side < 1:
        raise ConfigError(f"ASPP needs a map of at least 1 pixel, got side={side}")
    return tuple(max(1, round(rate * side / DEEPLAB_MAP_SIDE)) for rate in DEEPLAB_RATES)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3, Chen et al. 2017): a 1x1 conv, one dilated 3x3 conv
    per rate and an image-pooling branch (global average, 1x1 conv, broadcast back), each with BN and
    ReLU, concatenated and projected to ``out_channels`` by a 1x1 conv-BN-ReLU."""

    def __init__(self, in_channels: int, out_channels: int, rates: tuple[int, ...]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [conv_bn_relu(in_channels, out_channels, kernel_size=1)] + [conv_bn_relu(in_channels, out_channels, dilation=r) for r in rates]
        )
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(in_channels, out_channels, kernel_size=1))
        self.project = conv_bn_relu((len(rates) + 2) * out_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooling(x).expand(-1, -1, *x.shape[-2:])
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], 1))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution").

    ASPP over the deepest map (rates from ``aspp_rates`` of its side ``deepest_side``), a 3x3
    conv-BN-ReLU, bilinear upsampling to the low-level map (stride 4, or the finest map when there is
    no stride 4), concatenation with that map reduced by a 1x1 conv to ``width * 48 / 256`` channels
    (the paper's 48 next to 256; at least 8), two 3x3 conv-BN-ReLU, a 1x1 classifier and bilinear upsampling to
    the requested output size. Plain 3x3 convs as in the paper's ResNet variant; no dropout, because
    the probe budget is a few epochs.
    """

    def __init__(self, map_channels: dict[int, int], out_channels: int, deepest_side: int, width: int = 64) -> None:
        super().__init__()
        if not map_channels:
            raise ConfigError("DeepLabV3Plus needs at least one feature map; the encoder reports no map_channels")
        self.deepest = max(map_channels)
        self.low_level = 4 if 4 in map_channels else min(map_channels)
        low_width = max(8, round(width * 48 / 256))
        self.aspp = nn.Sequential(ASPP(map_channels[self.deepest], width, aspp_rates(deepest_side)), conv_bn_relu(width, width))
        self.reduce = conv_bn_relu(map_channels[self.low_level], low_width, kernel_size=1)
        self.fuse = nn.Sequential(conv_bn_relu(width + low_width, width), conv_bn_relu(width, width))
        self.out = nn.Conv2d(width, out_channels, 1)

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(sorted({self.low_level, self.deepest}))

    def forward(self, maps: dict[int, torch.Tensor], output_size: tuple[int, int]) -> torch.Tensor:
        low = self.reduce(maps[self.low_level])
        deep = _resize(self.aspp(maps[self.deepest]), low.shape[-2:])
        return _resize(self.out(self.fuse(torch.cat([deep, low], 1))), output_size)


class CountingConvHead(nn.Module):
    """Two 3x3 conv-BN-ReLU blocks on one feature map, global average pooling and a linear layer.

    Counting depends on where objects are, which a pooled vector has already averaged away; the
    convolutions can first mark each object locally, so the average becomes proportional to the count.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64) -> None:
        super().__init__()
        self.convs = nn.Sequential(conv_bn_relu(in_channels, width), conv_bn_relu(width, width))
        self.linear = nn.Linear(width, num_classes)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(feature_map).mean((2, 3)))


def linear_task_head(pooled_dim: int, num_classes: int) -> TaskHead:
    """A ``LinearHead`` on the pooled vector."""
    return TaskHead(LinearHead(pooled_dim, num_classes), _read_pooled)


def counting_conv_task_head(map_channels: dict[int, int], num_classes: int, width: int) -> TaskHead:
    """A ``CountingConvHead`` on the deepest map."""
    if not map_channels:
        raise ConfigError("the encoder reports no feature maps (map_channels is empty); the conv counting head needs one")
    deepest = max(map_channels)
    return TaskHead(CountingConvHead(map_channels[deepest], num_classes, width), partial(_read_one_map, deepest), (deepest,))


def unet_task_head(map_channels: dict[int, int], out_channels: int, width: int, finest_stride: int) -> TaskHead:
    """A ``UNetDecoder`` on the maps of ``usable_strides``."""
    strides = usable_strides(map_channels, finest_stride)
    return TaskHead(UNetDecoder({s: map_channels[s] for s in strides}, out_channels, width), _read_maps, tuple(strides))


def deeplab_task_head(map_channels: dict[int, int], out_channels: int, width: int, finest_stride: int, image_size: tuple[int, int]) -> TaskHead:
    """A ``DeepLabV3Plus`` on the maps of ``usable_strides``, its ASPP rates scaled to the deepest map's
    side at ``image_size`` (the training images)."""
    strides = usable_strides(map_channels, finest_stride)
    deepest_side = math.ceil(min(image_size) / max(strides))
    decoder = DeepLabV3Plus({s: map_channels[s] for s in strides}, out_channels, deepest_side, width)
    return TaskHead(decoder, _read_maps, decoder.strides)
