"""benchmarks/ema_knn.py and engine.load_training_module: every encoder of a training checkpoint, read back."""

import sys

import pytest
import torch

from sslbench.data import load_dataset
from sslbench.engine import RunConfig, load_encoder, load_training_module, pretrain
from sslbench.errors import SslbenchError
from sslbench.tasks import ClassificationTask, ProbeConfig

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}
HEADS = {"projection_hidden": 32, "projection_dim": 16, "prediction_hidden": 32}


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ema")
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    result = pretrain("byol", images, RunConfig(out=root / "run", progress=False), backbone=RESNET, options=HEADS,
                      train={"epochs": 2, "batch_size": 32})
    return result.out


def test_the_training_module_holds_the_exported_encoder_and_a_distinct_target(byol_run):
    module = load_training_module(byol_run / "last.ckpt")
    exported, _ = load_encoder(byol_run)
    state = module.encoder.state_dict()
    assert all(torch.equal(state[key], value) for key, value in exported.state_dict().items())
    # After 4 steps at target momentum ~0.99 the target is still near its start, unlike the online network.
    target = module.target_encoder.state_dict()
    assert any(not torch.equal(state[key], target[key]) for key in state if state[key].is_floating_point())
    assert not module.training


def test_ema_knn_scores_both_encoders_and_marks_the_exported_one(byol_run, tmp_path, monkeypatch, capsys, load_benchmark, write_cifar10):
    write_cifar10(tmp_path, train_per_batch=10, test=20)
    bench = load_benchmark("ema_knn")
    monkeypatch.setattr(sys, "argv", ["ema_knn.py", "--data-root", str(tmp_path), "--checkpoint", str(byol_run / "last.ckpt"),
                                      "--threads", "1"])
    bench.main()
    lines = capsys.readouterr().out.splitlines()[1:]
    scores = {line.split()[0]: float(line.split()[3]) for line in lines}
    assert set(scores) == {"encoder", "target_encoder"}
    assert [line.endswith("(exported)") for line in lines] == [True, False]
    # The online network's score is the exported encoder's, scored as the c10_mini benchmark scores it.
    train, test = load_dataset("cifar10", tmp_path, "train"), load_dataset("cifar10", tmp_path, "test")
    exported, _ = load_encoder(byol_run)
    probe = ProbeConfig(seed=0, device="cpu", knn_k=200, knn_temperature=0.1)
    assert scores["encoder"] == pytest.approx(ClassificationTask().evaluate(exported, train, test, "knn", probe)["top1"], abs=1e-4)


def test_a_missing_or_foreign_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(SslbenchError, match=r"training checkpoint .*last.ckpt not found; pass the last.ckpt"):
        load_training_module(tmp_path / "last.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(SslbenchError, match=r"other.ckpt is not a readable sslbench training checkpoint \(KeyError"):
        load_training_module(tmp_path / "other.ckpt")
