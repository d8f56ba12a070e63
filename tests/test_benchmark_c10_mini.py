"""benchmarks/c10_mini.py: a recipe for every method that builds, and a --limit smoke run that says it is one."""

import json
import sys

import pytest
import torch

from sslbench.backbones import build_encoder
from sslbench.backbones.base import count_parameters
from sslbench.config import apply_overrides
from sslbench.methods import METHODS, TrainConfig

@pytest.fixture(scope="module")
def c10_mini(load_benchmark):
    return load_benchmark("c10_mini")


def test_machine_line_names_the_vector_isa_and_whether_bf16_is_native(c10_mini, monkeypatch):
    isa = torch.backends.cpu.get_cpu_capability()
    monkeypatch.setattr(c10_mini, "cpu_has_native_bf16", lambda: False)
    assert c10_mini.cpu_model().endswith(f" ({isa}, no native bf16)")
    monkeypatch.setattr(c10_mini, "cpu_has_native_bf16", lambda: True)
    assert c10_mini.cpu_model().endswith(f" ({isa}, native bf16)")


def test_every_registered_method_has_a_recipe(c10_mini):
    assert set(c10_mini.RECIPES) == set(METHODS)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_recipe_builds_its_method(c10_mini, method):
    """Options and training settings are valid for the method (as the engine merges them) and the model builds."""
    recipe, cls = c10_mini.RECIPES[method], METHODS[method]
    train = apply_overrides(apply_overrides(TrainConfig(), cls.train_defaults), recipe["train"])
    train = apply_overrides(train, {k: v for k, v in cls.derived_train_defaults(recipe["backbone"], train).items()
                                    if k not in recipe["train"]})
    train.validate()
    # DDAE's reference batch is 128; BYOL, SwAV and DINO take lightly's CIFAR batch (more steps in 15 epochs).
    assert train.batch_size == (128 if method.startswith("ddae") or method in ("byol", "swav", "dino") else 256)
    module = cls(recipe["backbone"], apply_overrides(cls.Options(), recipe["options"]), train, 32, 1)
    assert module.export_encoder().pooled_dim > 0


def test_backbone_sizes_match_the_recipe_notes(c10_mini):
    """The notes compare the ViT for MAE/BEiT (1.2M parameters) with the protocol's ResNet (0.7M)."""
    assert count_parameters(build_encoder(c10_mini.RESNET)) == pytest.approx(0.7e6, rel=0.05)
    assert count_parameters(build_encoder(c10_mini.VIT_MINI)) == pytest.approx(1.2e6, rel=0.05)


def test_limit_smoke_run_reports_that_it_is_not_the_protocol(c10_mini, tmp_path, monkeypatch, write_cifar10):
    write_cifar10(tmp_path, train_per_batch=52, test=8)
    report = tmp_path / "report.json"
    monkeypatch.setattr(sys, "argv", ["c10_mini.py", "--data-root", str(tmp_path), "--methods", "simclr", "--limit", "256",
                                      "--epochs", "1", "--seed", "3", "--threads", "1", "--linear", "--linear-epochs", "1", "--set", "temperature=0.2",
                                      "--out", str(tmp_path / "runs"), "--json", str(report)])
    c10_mini.main()
    result = json.loads(report.read_text())
    assert result["protocol"].startswith("NOT C10-mini: --limit 256") and "8 test queries" in result["protocol"]
    assert "--limit 256" in result["command"]
    run = result["methods"]["simclr"]
    assert set(run["knn_top1"]) == {"1"} and 0.0 <= run["knn_top1"]["1"] <= 1.0
    assert run["train"]["seed"] == 3 and run["train"]["epochs"] == 1
    assert run["options"]["temperature"] == 0.2 and run["options"]["projection_hidden"] == 512  # parsed, with defaults
    assert 0.0 <= run["linear_top1"] <= 1.0
    assert set(result["floors"]) == {"raw pixels", "random init (simclr backbone)", "random init (simclr backbone), linear"}


def test_set_reaches_training_settings_method_options_and_backbone_keys(c10_mini):
    train, options, backbone = c10_mini.split_overrides(["lr=0.1", "target=codes", "backbone.pool=mean",
                                                         "backbone.unet.init=pytorch", "backbone.unet.channel_mults=[1, 2]"])
    assert (train, options) == ({"lr": "0.1"}, {"target": "codes"})
    spec = c10_mini.RECIPES["ddae"]["backbone"]
    changed = c10_mini.set_backbone_keys(spec, {key: value for key, value in backbone.items() if key.startswith("unet.")})
    assert changed["unet"]["init"] == "pytorch" and changed["unet"]["channel_mults"] == [1, 2]
    assert spec["unet"]["channel_mults"] != [1, 2]  # the recipe itself is untouched
    assert c10_mini.set_backbone_keys(c10_mini.RECIPES["mae"]["backbone"], {"pool": "mean"})["pool"] == "mean"
    with pytest.raises(SystemExit, match="the protocol's seed is set with --seed"):
        c10_mini.split_overrides(["seed=1"])
    with pytest.raises(SystemExit, match="backbone.unet.x.y: the recipe's backbone has no section unet.x"):
        c10_mini.set_backbone_keys(spec, {"unet.x.y": "1"})
