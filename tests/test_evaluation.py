"""Every registered method's checkpoint evaluates on all four tasks: pretrain two tiny steps, export,
load it through ``checkpoint_subject`` and run one probe protocol per task with a minimal budget."""

import math

import pytest
import torch

from sslbench.backbones.resnet import RESNET_LAYOUTS
from sslbench.backbones.vit import VIT_PRESETS
from sslbench.engine import RunConfig, pretrain
from sslbench.evaluation import checkpoint_subject, evaluate, load_splits
from sslbench.methods import METHODS
from sslbench.results import load_rows
from sslbench.tasks import TASKS, TRAINABLE_PARAMS, ProbeConfig

SIZE = 16
RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}
TASK_PROTOCOLS = [("classification", "knn"), ("counting", "linear"), ("depth", "probe"), ("segmentation", "probe")]
PROBE = ProbeConfig(epochs=1, batch_size=32, dense_batch_size=16, decoder_width=8, knn_k=5)

TINY_OPTIONS = {
    "simclr": {"projection_hidden": 32, "projection_dim": 16},
    "moco": {"queue_size": 64, "projection_hidden": 32, "projection_dim": 16},
    "byol": {"projection_hidden": 32, "projection_dim": 16, "prediction_hidden": 32},
    "swav": {"projection_hidden": 32, "projection_dim": 16, "prototypes": 16},
    "dino": {"hidden": 32, "bottleneck": 16, "prototypes": 32},
    "detcon_s": {"num_masks": 4, "projection_hidden": 32, "projection_dim": 16},
    "detcon_b": {"num_masks": 4, "projection_hidden": 32, "projection_dim": 16, "prediction_hidden": 32},
    "ddae": {"unet": "tiny"},
    "ddae_edm": {"unet": "tiny"},
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2},
    "igpt": {"depth": 2, "width": 32, "heads": 2, "grid": 8, "palette_size": 16, "palette_pixels": 2048},
}
"""Small heads for the registered methods; a method missing here runs with its default options."""


def tiny_backbone(default: dict) -> dict:
    """The method's default backbone at test size: a 1/8-width ResNet-18 or a ViT-nano at 16 px. Methods
    that build their own encoder (DDAE's U-Net, iGPT's transformer) keep their spec and are sized by options."""
    if default.get("backbone") in RESNET_LAYOUTS:
        return RESNET
    if default.get("backbone") == "vit":
        return {**default, **VIT_PRESETS["nano"], "image_size": SIZE}
    return default


@pytest.fixture(scope="module")
def scenes():
    """32 training and 16 test scenes at 16 px, with class, count, depth and mask labels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops are slower with two threads on a busy 2-core machine
    yield load_splits("scenes", None, SIZE, 32, 16)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_checkpoint_evaluates_on_the_four_tasks(tmp_path, scenes, method):
    train, test = scenes
    cls = METHODS[method]
    pretrain(method, train.images, RunConfig(out=tmp_path / "run", progress=False), backbone=tiny_backbone(cls.default_backbone),
             options=TINY_OPTIONS.get(method, {}), train={"epochs": 1, "batch_size": 16, "warmup_epochs": 0.0})
    subject = checkpoint_subject(tmp_path / "run")
    # The row's label is the method's name, or a finer label it records (DetCon's ``detcon_s[fh]``).
    assert subject.method == method or subject.method.startswith(f"{method}[")
    assert subject.epochs == 1
    results = tmp_path / "results"
    for task, protocol in TASK_PROTOCOLS:
        metrics = evaluate(subject, task, protocol, "scenes", train, test, PROBE, results)
        assert metrics.keys() >= {TRAINABLE_PARAMS} and len(metrics) > 1
        assert all(math.isfinite(value) for value in metrics.values()), (task, metrics)
    rows = load_rows(results)
    assert {(row["task"], row["protocol"]) for row in rows} == set(TASK_PROTOCOLS)
    assert all(row["method"] == subject.method and row["epochs"] == 1 for row in rows)
    assert {row["task"] for row in rows} == set(TASKS)
