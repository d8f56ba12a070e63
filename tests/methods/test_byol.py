import math

import pytest
import torch

from sslbench.errors import ConfigError
from sslbench.methods import METHODS, TrainConfig
from sslbench.methods.byol import BYOLOptions, byol_loss

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[1.0, 1.0], [-3.0, -4.0]])
    # Row 0: cos 45 degrees; row 1: opposite vectors, cos -1.
    expected = ((2 - 2 / math.sqrt(2)) + (2 + 2)) / 2
    assert abs(byol_loss(p, z).item() - expected) < 1e-6
    assert byol_loss(z, 5 * z).item() < 1e-6


def test_byol_training_lowers_the_loss(train_and_reload):
    losses = train_and_reload("byol", 3, {"projection_hidden": 256, "prediction_hidden": 256, "projection_dim": 64})
    assert losses[-1] < losses[0] - 0.2


def test_byol_trains_with_lars(train_and_reload):
    # solo-learn's BYOL recipe: LARS at lr 1.0 (plain SGD at that lr diverges).
    losses = train_and_reload("byol", 3, {"projection_hidden": 256, "prediction_hidden": 256, "projection_dim": 64},
                              optimizer="lars", lr=1.0)
    assert losses[-1] < losses[0] - 0.2


def _method(name, **options):
    cls = METHODS[name]
    return cls(RESNET, cls.Options(projection_hidden=32, prediction_hidden=32, projection_dim=16, **options),
               TrainConfig(epochs=2, lr=0.1, warmup_epochs=1), image_size=16, steps_per_epoch=4)


@pytest.mark.parametrize("name", ["byol", "detcon_b"])
def test_predictor_lr_scale_gives_the_predictor_its_own_scaled_schedule(name):
    method = _method(name, predictor_lr_scale=10.0)
    config = method.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    predictor = {id(p) for p in method.prediction.parameters()}
    in_groups = [{id(p) for p in group["params"]} for group in optimizer.param_groups]
    assert set().union(*in_groups) == {id(p) for p in method.parameters() if p.requires_grad}
    scaled = [ids <= predictor and bool(ids) for ids in in_groups]
    assert set().union(*(ids for ids, s in zip(in_groups, scaled) if s)) == predictor
    for step in range(8):  # warm-up then cosine: the factor of 10 holds at every step
        lrs = {s: {group["lr"] for group, s2 in zip(optimizer.param_groups, scaled) if s2 == s} for s in (True, False)}
        (base,), (fast,) = lrs[False], lrs[True]
        assert fast == pytest.approx(10 * base) and base > 0
        optimizer.step()
        scheduler.step()
    # Weight decay stays off the predictor's biases and BN parameters.
    for group, s in zip(optimizer.param_groups, scaled):
        if s:
            assert (group.get("weight_decay", optimizer.defaults["weight_decay"]) == 0.0) == all(p.ndim <= 1 for p in group["params"])


def test_default_predictor_lr_keeps_the_two_standard_groups():
    groups = _method("byol").parameter_groups()
    assert len(groups) == 2 and "lr" not in groups[0] and groups[1]["weight_decay"] == 0.0


def test_bad_predictor_lr_scale_and_unknown_lr_scale_module_raise_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="predictor_lr_scale=0"):
        BYOLOptions(predictor_lr_scale=0)
    method = _method("byol")
    monkeypatch.setattr(method, "lr_scales", lambda: {"predictor": 10.0})
    with pytest.raises(ConfigError, match=r"\['predictor'\], which are not submodules"):
        method.parameter_groups()
