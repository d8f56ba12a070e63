"""Every task end to end: a fixed random conv encoder on tiny synthetic images whose labels are
simple functions of the pixels, so a working probe must score high."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sslbench.backbones.base import Encoder, Features
from sslbench.data.base import IGNORE_INDEX, ImageSet
from sslbench.errors import ConfigError, DataError
from sslbench.tasks import TASKS, ProbeConfig, extract_features

SIZE = 16


class TinyEncoder(Encoder):
    """Raw pixels plus fixed random ReLU convs: maps at strides 1, 2, 4; pooled = their means."""

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
    # One thread: these tiny ops are slower with two threads on a busy 2-core machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield TinyEncoder(), make_set(96, seed=1), make_set(48, seed=2)
    torch.set_num_threads(threads)


CONFIG = ProbeConfig(epochs=20, batch_size=32, dense_batch_size=32, lr=3e-2, knn_k=10)


def evaluate(data, task, protocol, **overrides):
    encoder, train, test = data
    config = ProbeConfig(**{**CONFIG.__dict__, **overrides})
    return TASKS[task]().evaluate(encoder, train, test, protocol, config)


def test_registry():
    assert set(TASKS) == {"classification", "counting", "depth", "segmentation"}
    for name, task in TASKS.items():
        assert task.name == name and task.protocols


def test_classification_knn(data):
    assert evaluate(data, "classification", "knn")["top1"] > 0.9


def test_classification_linear(data):
    assert evaluate(data, "classification", "linear")["top1"] > 0.9


def test_counting_linear(data):
    result = evaluate(data, "counting", "linear", epochs=40, lr=0.1)
    assert result["accuracy"] > 0.8 and result["mae"] < 0.25


def test_segmentation_probe(data):
    result = evaluate(data, "segmentation", "probe", epochs=8)
    assert result["miou"] > 0.9 and result["pixel_acc"] > 0.95


def test_depth_probe(data):
    result = evaluate(data, "depth", "probe", epochs=12)
    assert result["abs_rel"] < 0.1 and result["delta1"] > 0.9 and result["rmse"] < 0.5


def test_deterministic_under_seed(data):
    assert evaluate(data, "classification", "linear", epochs=3) == evaluate(data, "classification", "linear", epochs=3)
    assert evaluate(data, "segmentation", "probe", epochs=2) == evaluate(data, "segmentation", "probe", epochs=2)


def test_extraction_caches_and_restores_mode(data):
    encoder, train, _ = data
    encoder.train()
    cache = extract_features(encoder, train, batch_size=40, device="cpu", maps=True)
    assert encoder.training
    assert cache.pooled.dtype == torch.float32 and cache.pooled.shape == (96, 24)
    assert {s: tuple(m.shape) for s, m in cache.maps.items()} == {1: (96, 8, 16, 16), 2: (96, 8, 8, 8), 4: (96, 8, 4, 4)}
    assert all(m.dtype == torch.float16 for m in cache.maps.values())


def test_bad_protocol_and_missing_target(data):
    encoder, train, test = data
    with pytest.raises(ConfigError, match="knn, linear"):
        TASKS["classification"]().evaluate(encoder, train, test, "probe", CONFIG)
    no_depth = ImageSet(name="plain", images=train.images, targets={"class": train.targets["class"]})
    with pytest.raises(DataError, match="no 'depth' target"):
        TASKS["depth"]().evaluate(encoder, no_depth, test, "probe", CONFIG)
    with pytest.raises(ConfigError, match="epochs"):
        ProbeConfig(epochs=0)
