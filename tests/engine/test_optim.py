import dataclasses
import math

import pytest
import torch

from sslbench.errors import ConfigError
from sslbench.methods import METHODS, SimCLR, TrainConfig
from sslbench.optim import LARS


def _step(optimizer, param, grad):
    param.grad = torch.tensor(grad)
    optimizer.step()
    return param.detach().clone()


def test_lars_step_against_hand_computation():
    # |w| = 5, |g| = 1: ratio = 0.02 * 5 / (1 + 0.1 * 5) = 1/15; clipped form min(ratio / lr, 1) = 2/15 at lr 0.5.
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = LARS([w], lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    d1 = (2 / 15) * torch.tensor([0.6 + 0.3, 0.8 + 0.4])
    after_one = _step(optimizer, w, [0.6, 0.8])
    assert torch.allclose(after_one, torch.tensor([3.0, 4.0]) - 0.5 * d1, atol=1e-6)
    # Second step: the momentum buffer is 0.9 * d1 + d2, d2 scaled by the new norms.
    w_norm = after_one.norm().item()
    ratio = min(0.02 * w_norm / (1.0 + 0.1 * w_norm) / 0.5, 1.0)
    d2 = ratio * (torch.tensor([0.6, 0.8]) + 0.1 * after_one)
    after_two = _step(optimizer, w, [0.6, 0.8])
    assert torch.allclose(after_two, after_one - 0.5 * (0.9 * d1 + d2), atol=1e-6)


def test_lars_without_clip_scales_by_the_raw_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.0, eta=0.02, clip=False)
    # ratio = 0.02 * 5 / 1 = 0.1, unclipped: the step is lr * 0.1 * g.
    assert torch.allclose(_step(optimizer, w, [0.6, 0.8]), torch.tensor([3.0 - 0.03, 4.0 - 0.04]), atol=1e-6)


def test_lars_leaves_unadapted_groups_to_plain_sgd():
    bias = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    optimizer = LARS([{"params": [bias], "weight_decay": 0.0, "lars_adapt": False}], lr=0.5, momentum=0.9, weight_decay=0.1)
    assert torch.allclose(_step(optimizer, bias, [0.2, 0.4]), torch.tensor([0.9, -2.2]), atol=1e-6)


def test_lars_zero_weights_take_the_plain_step():
    # A zero-initialised tensor has no trust ratio (|w| = 0): it moves by the plain gradient instead of staying at 0.
    w = torch.nn.Parameter(torch.zeros(2))
    optimizer = LARS([w], lr=0.5, momentum=0.0, weight_decay=0.0)
    assert torch.allclose(_step(optimizer, w, [1.0, -1.0]), torch.tensor([-0.5, 0.5]), atol=1e-6)


def test_methods_build_lars_with_bias_and_norm_excluded():
    method = SimCLR({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, SimCLR.Options(),
                    TrainConfig(optimizer="lars", lr=1.0), image_size=16, steps_per_epoch=2)
    optimizer = method.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, LARS)
    adapt = {group["lars_adapt"]: group for group in optimizer.param_groups}
    assert all(p.ndim > 1 for p in adapt[True]["params"]) and all(p.ndim <= 1 for p in adapt[False]["params"])
    assert adapt[False]["weight_decay"] == 0.0


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer='rmsprop' is not allowed; use one of sgd, lars, adamw, adam"):
        TrainConfig(optimizer="rmsprop").validate()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_no_method_option_shadows_a_training_setting(method):
    # ``--set KEY=VALUE`` sends a key to the training settings when TrainConfig has it, so an option of the same
    # name (MoCo's key momentum was once ``momentum``) could never be set from the command line.
    options = {field.name for field in dataclasses.fields(METHODS[method].Options)}
    assert not options & TrainConfig.keys()


@pytest.mark.parametrize("final_lr_scale", [0.0, 0.25, 1.0])
def test_the_schedule_warms_up_then_follows_a_cosine_down_to_the_final_lr_scale(final_lr_scale):
    method = SimCLR({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, SimCLR.Options(),
                    TrainConfig(epochs=3, lr=0.4, warmup_epochs=1, final_lr_scale=final_lr_scale), image_size=16, steps_per_epoch=4)
    config = method.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lrs.append(optimizer.param_groups[0]["lr"])
    assert lrs[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])  # linear warm-up over the first epoch's 4 steps
    # After warm-up, step k of 8: 0.4 * (s + (1 - s) * (1 + cos(pi k / 8)) / 2), ending at 0.4 * s.
    expected = [0.4 * (final_lr_scale + (1 - final_lr_scale) * 0.5 * (1 + math.cos(math.pi * k / 8))) for k in range(9)]
    assert lrs[4:] == pytest.approx(expected)
    assert lrs[-1] == pytest.approx(0.4 * final_lr_scale)


def test_a_final_lr_scale_outside_0_1_is_a_config_error():
    with pytest.raises(ConfigError, match=r"final_lr_scale=1.5 is out of range; use a value in \[0.0, 1.0\]"):
        TrainConfig(final_lr_scale=1.5).validate()
