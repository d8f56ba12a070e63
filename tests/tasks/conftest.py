"""Tiny synthetic data for the task tests: a fixed random conv encoder on 16-pixel images whose labels
are simple functions of the pixels, so a working head must score high."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslbench.backbones.base import Encoder, Features
from sslbench.data.base import IGNORE_INDEX, ImageSet

SIZE = 16


class TinyEncoder(Encoder):
    """Raw pixels plus fixed random ReLU convs: maps at strides 1, 2, 4; pooled = their means.

    Parameters: conv1 3*5*9 + 5 = 140, conv2 and conv4 8*8*9 + 8 = 584 each, 1308 in all."""

    num_parameters = 1308

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
            self.conv4 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.requires_grad_(False)
        self.map_channels = {1: 8, 2: 8, 4: 8}
        self.pooled_dim = 24
        self.spec = {}

    def forward(self, images: torch.Tensor) -> Features:
        map1 = torch.cat([images, F.relu(self.conv1(images))], 1)
        map2 = F.relu(self.conv2(map1))
        map4 = F.relu(self.conv4(map2))
        maps = {1: map1, 2: map2, 4: map4}
        return Features(pooled=torch.cat([m.mean((2, 3)) for m in maps.values()], 1), maps=maps)


def make_set(n: int, seed: int) -> ImageSet:
    """Tinted noisy background (class = tint channel) with 0-3 bright 4x4 squares (count = their
    number, mask = square pixels, depth = 1 + 4 x (1 - brightness))."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, SIZE, SIZE, generator=generator) * 60
    classes = torch.randint(0, 3, (n,), generator=generator)
    images[torch.arange(n), classes] += 100
    counts = torch.randint(0, 4, (n,), generator=generator)
    mask = torch.zeros(n, SIZE, SIZE, dtype=torch.int64)
    for i in range(n):
        for cell in torch.randperm(16, generator=generator)[: counts[i]].tolist():
            y, x = 4 * (cell // 4), 4 * (cell % 4)
            images[i, :, y : y + 4, x : x + 4] = 200 + 55 * torch.rand(3, 1, 1, generator=generator)
            mask[i, y : y + 4, x : x + 4] = 1
    images = images.round().to(torch.uint8)
    depth = 1 + 4 * (1 - images.float().mean(1) / 255)
    mask[:, 0, 0] = IGNORE_INDEX
    depth[:, 0, :] = 0  # unknown depth
    return ImageSet(
        name=f"synthetic-{seed}",
        images=images,
        targets={"class": classes, "count": counts, "mask": mask, "depth": depth},
        num_classes={"class": 3, "count": 4, "mask": 2},
    )


@pytest.fixture(scope="module")
def data():
    """(encoder, 96 training images, 48 test images)."""
    # One thread: these tiny ops are slower with two threads on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TinyEncoder(), make_set(96, seed=1), make_set(48, seed=2)
    torch.set_num_threads(threads)
