"""Every task and protocol end to end on the tiny synthetic data of conftest.py: a fixed random conv
encoder on images whose labels are simple functions of the pixels, so a working head must score high."""

import pytest
import torch

from sslbench.data.base import ImageSet
from sslbench.errors import ConfigError, DataError
from sslbench.evaluation import EncoderUnderTest, check_task
from sslbench.evaluation import evaluate as run_evaluation
from sslbench.results import load_rows
from sslbench.tasks import TASKS, ProbeConfig, base, extract_features
from sslbench.tasks.probe import train_probe

CONFIG = ProbeConfig(epochs=20, batch_size=32, dense_batch_size=32, lr=3e-2, knn_k=10)
DENSE = dict(dense_batch_size=16, decoder_width=16)


def evaluate(data, task, protocol, **overrides):
    encoder, train, test = data
    config = ProbeConfig(**{**CONFIG.__dict__, **overrides})
    return TASKS[task]().evaluate(encoder, train, test, protocol, config)


def test_registry_and_protocols():
    assert set(TASKS) == {"classification", "counting", "depth", "segmentation"}
    for name, task in TASKS.items():
        assert task.name == name and "finetune" in task.protocols
    assert TASKS["classification"].protocols == ("knn", "linear", "finetune", "linear-1pct", "linear-10pct", "finetune-1pct", "finetune-10pct",
                                                 "distill-1pct", "distill-10pct")
    assert TASKS["counting"].protocols == ("linear", "conv", "finetune")
    assert check_task("counting", "conv", "scenes") == "conv"
    assert check_task("classification", "finetune-10pct", "scenes") == "finetune-10pct"


def test_classification_knn(data):
    result = evaluate(data, "classification", "knn")
    assert result["top1"] > 0.9 and result["trainable_params"] == 0


def test_classification_linear_and_its_parameter_count(data):
    result = evaluate(data, "classification", "linear")
    assert result["top1"] > 0.9
    # 24 pooled dims x 3 classes + 3 biases; the BatchNorm before it has no affine parameters.
    assert result["trainable_params"] == 24 * 3 + 3


def test_classification_few_labels(data, monkeypatch):
    # 10% of 96 images over 3 classes: 3 per class, 9 labels; 1%: at least 1 per class, 3 labels.
    seen = []

    def recording_probe(head, encoder, train, targets, loss_fn, config):
        seen.append(torch.bincount(targets, minlength=3).tolist())
        return train_probe(head, encoder, train, targets, loss_fn, config)

    monkeypatch.setattr(base, "train_probe", recording_probe)
    assert evaluate(data, "classification", "linear-10pct", epochs=30)["top1"] > 0.8  # chance: 1/3
    assert evaluate(data, "classification", "linear-1pct", epochs=30)["top1"] > 0.5
    assert seen == [[3, 3, 3], [1, 1, 1]]


def test_counting_linear(data):
    result = evaluate(data, "counting", "linear", epochs=40, lr=0.1)
    assert result["accuracy"] > 0.8 and result["mae"] < 0.25


def test_counting_conv_head(data):
    # It reads only the deepest (stride-4) random-feature map, so it learns less than the linear head
    # on pooled raw pixels, but far above chance (accuracy 0.25, mae about 1).
    result = evaluate(data, "counting", "conv", epochs=40, lr=1e-2, decoder_width=16, dense_batch_size=8)
    assert result["accuracy"] > 0.6 and result["mae"] < 0.5
    # Two 3x3 conv-BN-ReLU on the 8-channel stride-4 map (no conv bias) and a 16 -> 4 linear layer.
    assert result["trainable_params"] == (8 * 16 * 9 + 2 * 16) + (16 * 16 * 9 + 2 * 16) + (16 * 4 + 4)


def test_segmentation_probe(data):
    # DeepLabV3+ predicts at stride 4 from these random features: far above all-background (mIoU 0.45).
    result = evaluate(data, "segmentation", "probe", epochs=24, **DENSE)
    assert result["miou"] > 0.75 and result["pixel_acc"] > 0.95


def test_depth_probe(data):
    result = evaluate(data, "depth", "probe", epochs=12, lr=3e-3, **DENSE)
    assert result["abs_rel"] < 0.1 and result["delta1"] > 0.9 and result["rmse"] < 0.5


def test_deterministic_under_seed(data):
    assert evaluate(data, "classification", "linear", epochs=3) == evaluate(data, "classification", "linear", epochs=3)
    assert evaluate(data, "segmentation", "probe", epochs=2, **DENSE) == evaluate(data, "segmentation", "probe", epochs=2, **DENSE)


def test_extraction_caches_and_restores_mode(data):
    encoder, train, _ = data
    encoder.train()
    cache = extract_features(encoder, train, batch_size=40, device="cpu", maps=True)
    assert encoder.training
    assert cache.pooled.dtype == torch.float32 and cache.pooled.shape == (96, 24)
    assert {s: tuple(m.shape) for s, m in cache.maps.items()} == {1: (96, 8, 16, 16), 2: (96, 8, 8, 8), 4: (96, 8, 4, 4)}
    assert all(m.dtype == torch.float16 for m in cache.maps.values())
    only = extract_features(encoder, train, batch_size=40, device="cpu", pooled=False, maps=True, strides=(4,))
    assert only.pooled is None and set(only.maps) == {4}


def test_bad_protocol_and_missing_target(data):
    encoder, train, test = data
    with pytest.raises(ConfigError, match="knn, linear"):
        TASKS["classification"]().evaluate(encoder, train, test, "probe", CONFIG)
    with pytest.raises(ConfigError, match="linear, conv, finetune"):
        TASKS["counting"]().evaluate(encoder, train, test, "linear-1pct", CONFIG)
    no_depth = ImageSet(name="plain", images=train.images, targets={"class": train.targets["class"]})
    with pytest.raises(DataError, match="no 'depth' target"):
        TASKS["depth"]().evaluate(encoder, no_depth, test, "probe", CONFIG)
    with pytest.raises(ConfigError, match="epochs"):
        ProbeConfig(epochs=0)
    with pytest.raises(ConfigError, match="encoder_lr"):
        ProbeConfig(encoder_lr=0.0)


def test_result_rows_carry_the_trainable_parameter_count(data, tmp_path):
    encoder, train, test = data
    subject = EncoderUnderTest(encoder, "tiny", "none", 0)
    metrics = run_evaluation(subject, "counting", "linear", "synthetic", train, test, ProbeConfig(**{**CONFIG.__dict__, "epochs": 2}), tmp_path)
    rows = load_rows(tmp_path)
    # One row per metric; the count is a field of each (24 x 4 + 4 for the count head), not a row.
    assert [row["metric"] for row in rows] == ["accuracy", "mae"]
    assert all(row["trainable_params"] == 24 * 4 + 4 for row in rows) and metrics["trainable_params"] == 100


def test_the_head_training_loop_returns_the_last_epoch_mean_and_stops_on_a_non_finite_loss():
    from sslbench.errors import TrainingError
    from sslbench.tasks.probe import train_loop

    weight = torch.nn.Parameter(torch.zeros(()))
    seen = []

    def batch_loss(indices, step):  # 10 samples in batches of 4, 4 and 2: a loss of 1, 2, 3 per step of an epoch
        seen.append(step)
        return weight * 0 + (step % 3 + 1)

    config = ProbeConfig(epochs=2, seed=0, device="cpu")
    assert train_loop([{"params": [weight], "lr": 0.1}], batch_loss, 10, 4, config) == pytest.approx((4 * 1 + 4 * 2 + 2 * 3) / 10)
    assert seen == list(range(6))

    def exploding(indices, step):
        return weight * 0 + (float("nan") if step == 4 else 1.0)

    with pytest.raises(TrainingError, match=r"training loss became nan in epoch 1 \(features may overflow float16 or lr="):
        train_loop([{"params": [weight], "lr": 0.1}], exploding, 10, 4, config)
