"""Tiny end-to-end pretraining for the method tests: 64 procedural scenes at 16 px, batch 32."""

import pytest
import torch

from sslbench.data import load_dataset
from sslbench.engine import RunConfig, load_encoder, pretrain

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}


@pytest.fixture(scope="session")
def small_scenes():
    # Half resolution keeps each run to a few seconds of CPU; the methods do not depend on the size.
    return load_dataset("scenes", None, "train", limit=64).images[..., ::2, ::2].contiguous()


@pytest.fixture
def train_and_reload(tmp_path, small_scenes):
    """Pretrain a method on the small scenes, check that its exported encoder reloads, return the epoch losses."""

    def run(method, epochs, options, **train):
        return _train_and_reload(tmp_path, method, small_scenes, epochs, options, **train)

    return run


def _train_and_reload(tmp_path, method, images, epochs, options, **train):
    result = pretrain(method, images, RunConfig(out=tmp_path / method, progress=False), backbone=RESNET,
                      options=options, train={"epochs": epochs, "batch_size": 32, **train})
    encoder, meta = load_encoder(tmp_path / method)
    assert meta["method"] == method and meta["epochs"] == epochs
    assert encoder(torch.rand(2, 3, 16, 16)).pooled.shape == (2, 64)
    return result.epoch_losses
