"""ResNets for small images (CIFAR variant) and larger ones (ImageNet stem), with a width multiplier.

The CIFAR variant (He et al. 2016, as used by SimCLR/solo-learn/lightly on CIFAR) has a 3x3 stride-1
stem and no max-pool, so a 32x32 image keeps 4x4 maps at the last stage; the ImageNet stem (7x7
stride 2 + max-pool) is for 64+ pixel images. ``width`` scales every stage: 0.25 gives the C10-mini
backbone (16/32/64/128 channels).
"""

from __future__ import annotations

import torch
from torch import nn

from sslbench.backbones.base import Encoder, Features, Normalize
from sslbench.errors import ConfigError


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.shortcut = _shortcut(in_ch, ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, ch: int, stride: int):
        super().__init__()
        out_ch = ch * self.expansion
        self.conv1 = nn.Conv2d(in_ch, ch, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(ch)
        self.conv3 = nn.Conv2d(ch, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.shortcut = _shortcut(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


RESNET_LAYOUTS: dict[str, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(Encoder):
    """A ResNet returning the pooled vector and the four stage outputs keyed by stride."""

    def __init__(self, depth: str = "resnet18", width: float = 1.0, stem: str = "cifar",
                 mean: tuple[float, float, float] = (0.485, 0.456, 0.406), std: tuple[float, float, float] = (0.229, 0.224, 0.225)):
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ConfigError(f"unknown ResNet {depth!r}; use one of {sorted(RESNET_LAYOUTS)}")
        if stem not in ("cifar", "imagenet"):
            raise ConfigError(f"unknown ResNet stem {stem!r}; use 'cifar' (32-64 px images) or 'imagenet'")
        if not 0 < width <= 8:
            raise ConfigError(f"ResNet width {width} is out of range; use a multiplier in (0, 8], e.g. 0.25 or 1")
        block, counts = RESNET_LAYOUTS[depth]
        channels = [max(4, round(c * width)) for c in (64, 128, 256, 512)]
        self.normalize = Normalize(mean, std)
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
            base_stride = 1
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 7, 2, 3, bias=False), nn.BatchNorm2d(channels[0]),
                                      nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
            base_stride = 4
        stages = []
        in_ch = channels[0]
        for i, (ch, n) in enumerate(zip(channels, counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, ch, 2 if (j == 0 and i > 0) else 1))
                in_ch = ch * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.strides = [base_stride * 2**i for i in range(4)]
        self.map_channels = {s: c * block.expansion for s, c in zip(self.strides, channels)}
        self.pooled_dim = in_ch
        self.spec = {"backbone": depth, "width": width, "stem": stem, "mean": list(mean), "std": list(std)}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, images: torch.Tensor) -> Features:
        # Read the images in the layout of the weights. oneDNN runs a convolution channels_last when its input is, so
        # channels_last views (``sslbench.augment``) would otherwise turn a model the engine keeps contiguous
        # (``engine.cpu_channels_last_hazard``) channels_last again, layer by layer.
        layout = torch.channels_last if self.stem[0].weight.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        x = self.stem(self.normalize(images).contiguous(memory_format=layout))
        maps = {}
        for stride, stage in zip(self.strides, self.stages):
            x = stage(x)
            maps[stride] = x
        return Features(pooled=x.mean((2, 3)), maps=maps)
