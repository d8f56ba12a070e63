"""iGPT: hand-checked losses, BERT mask ratio, no leak through the head, training, export, resume, CLI."""

import json
import math
import sys

import pytest
import torch

from sslbench.backbones.palette import nearest_centre
from sslbench.cli import main
from sslbench.engine import LAST_CHECKPOINT, RunConfig, load_encoder, pretrain
from sslbench.errors import ConfigError
from sslbench.methods.base import TrainConfig
from sslbench.methods.igpt import IGPT, IGPTOptions, autoregressive_loss, bert_mask, masked_token_loss

TINY = {"depth": 2, "width": 32, "heads": 2, "grid": 8, "palette_size": 16, "palette_pixels": 2048}
TRAIN = {"batch_size": 32, "lr": 3e-3, "warmup_epochs": 0.0}


def _hand_cross_entropy(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_autoregressive_loss_matches_hand_computation():
    logits = [[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, -1.0], [3.0, 0.0, 1.0]]]
    tokens = [[0, 2], [1, 0]]
    expected = sum(_hand_cross_entropy(logits[b][i], tokens[b][i]) for b in range(2) for i in range(2)) / 4
    got = autoregressive_loss(torch.tensor(logits), torch.tensor(tokens))
    assert abs(got.item() - expected) < 1e-6
    assert abs(got.item() - 0.6899) < 1e-3  # (0.2395 + 1.5514 + 0.7989 + 0.1698) / 4, by hand


def test_masked_token_loss_averages_over_masked_positions_only():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]])
    tokens = torch.tensor([[0, 2, 1]])
    masked = torch.tensor([[False, True, True]])
    expected = (_hand_cross_entropy([0.0, 1.0, 0.0], 2) + math.log(3)) / 2
    assert abs(masked_token_loss(logits, tokens, masked).item() - expected) < 1e-6
    changed = logits.clone()
    changed[0, 0] = torch.tensor([-5.0, 5.0, 0.0])  # an unmasked position does not count
    assert masked_token_loss(changed, tokens, masked).item() == pytest.approx(expected, abs=1e-6)
    assert masked_token_loss(logits, tokens, torch.zeros_like(masked)).item() == 0.0


def test_bert_mask_masks_15_percent_independently():
    mask = bert_mask((64, 256), 0.15, torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (64, 256)
    assert abs(mask.float().mean().item() - 0.15) < 0.01
    assert mask.float().mean(1).std() > 0  # not the same number of masked tokens in every image
    assert torch.equal(mask, bert_mask((64, 256), 0.15, torch.Generator().manual_seed(0)))


@torch.no_grad()
def test_next_token_logits_do_not_depend_on_the_token_they_predict():
    torch.manual_seed(0)
    method = IGPT({"backbone": "igpt"}, IGPTOptions(**TINY), TrainConfig(), image_size=16, steps_per_epoch=1).eval()
    torch.nn.init.normal_(method.head.weight)  # the head starts at zero, which would hide a leak
    tokens = torch.randint(0, 16, (2, 64), generator=torch.Generator().manual_seed(1))
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 16
    before, after = method.token_logits(tokens), method.token_logits(changed)
    assert before.shape == (2, 64, 16)
    assert torch.equal(before[:, :21], after[:, :21])
    assert not torch.allclose(before[:, 21:], after[:, 21:])


def _palette(path):
    return torch.load(path / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]["encoder.palette.colours"]


def test_training_lowers_the_loss_and_the_export_keeps_the_palette(tmp_path, small_scenes):
    result = pretrain("igpt", small_scenes, RunConfig(out=tmp_path / "igpt", progress=False), options=TINY,
                      train={"epochs": 4, **TRAIN})
    # The zero-initialised head starts every token at chance, log 16 = 2.77 nats.
    assert result.epoch_losses[0] < math.log(16) + 1e-3
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.1
    encoder, meta = load_encoder(tmp_path / "igpt")
    assert meta["method"] == "igpt" and meta["spec"]["causal"] and meta["spec"]["readout_layer"] == 1
    assert bool(encoder.palette.fitted) and torch.equal(encoder.palette.colours, _palette(tmp_path / "igpt"))
    # Fitted on the scenes, the palette reproduces their downsampled pixels much better than 16 random
    # colours do (measured: 0.13 against 0.25).
    grid = encoder.to_grid(small_scenes[:8].float() / 255)
    error = (encoder.palette.dequantize(encoder.palette.quantize(grid)) - grid).norm(dim=1).mean()
    random = torch.rand(16, 3, generator=torch.Generator().manual_seed(0))
    random_error = (random[nearest_centre(grid.permute(0, 2, 3, 1).reshape(-1, 3), random)].view(8, 8, 8, 3)
                    - grid.permute(0, 2, 3, 1)).norm(dim=-1).mean()
    assert error < 0.7 * random_error
    features = encoder(torch.rand(2, 3, 16, 16))
    assert features.pooled.shape == (2, 32) and features.maps[2].shape == (2, 32, 8, 8)


def test_resume_keeps_the_palette_of_the_first_run(tmp_path, small_scenes):
    run = RunConfig(out=tmp_path / "run", progress=False)
    pretrain("igpt", small_scenes, run, options=TINY, train={"epochs": 1, **TRAIN})
    first = _palette(tmp_path / "run")
    inverted = 255 - small_scenes  # a refit on these images would give other colours
    resumed = RunConfig(out=tmp_path / "run", progress=False, resume=True)
    pretrain("igpt", inverted, resumed, options=TINY, train={"epochs": 2, **TRAIN})
    encoder, meta = load_encoder(tmp_path / "run")
    assert meta["epochs"] == 2
    assert torch.equal(encoder.palette.colours, first)
    refit = IGPT({"backbone": "igpt"}, IGPTOptions(**TINY), TrainConfig(), image_size=16, steps_per_epoch=1)
    refit.initialise_from_data(inverted, torch.Generator().manual_seed(0))
    assert not torch.allclose(refit.encoder.palette.colours, first, atol=0.05)


@pytest.mark.parametrize("options,backbone,message", [
    ({"objective": "gpt"}, None, "objective='gpt' is not allowed; use one of autoregressive, bert"),
    ({"mask_ratio": 0.0}, None, "mask_ratio=0.0 is out of range"),
    ({"palette_pixels": 8}, None, "palette_pixels=8 is out of range"),
    ({}, {"backbone": "resnet18", "width": 0.125}, "method igpt trains its own transformer"),
])
def test_bad_options_are_config_errors(tmp_path, small_scenes, options, backbone, message):
    with pytest.raises(ConfigError, match=message):
        pretrain("igpt", small_scenes, RunConfig(out=tmp_path / "bad", progress=False), backbone=backbone,
                 options={**TINY, **options}, train={"epochs": 1, **TRAIN})


def test_cli_pretrains_igpt_with_the_bert_objective(monkeypatch, capsys, tmp_path):
    out = tmp_path / "cli"
    sets = [f"{key}={value}" for key, value in {**TINY, "objective": "bert"}.items()]
    argv = ["sslbench", "pretrain", "--method", "igpt", "--limit", "64", "--image-size", "16", "--epochs", "1",
            "--batch-size", "32", "--out", str(out), *[arg for pair in sets for arg in ("--set", pair)]]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "igpt: 1 epochs this run" in capsys.readouterr().out
    spec = json.loads((out / "encoder.json").read_text())["spec"]
    assert spec["backbone"] == "igpt" and spec["causal"] is False
