"""DDAE with EDM training: the noise-level distribution, the loss weight and loss, training, export."""

import math

import pytest
import torch

from sslbench.backbones.diffusion import DDPMSchedule, DiffusionEncoder, EDMSchedule
from sslbench.backbones.unet import UNET_PRESETS, UNet
from sslbench.config import apply_overrides
from sslbench.engine import RunConfig, load_encoder, pretrain
from sslbench.errors import ConfigError
from sslbench.methods import METHODS
from sslbench.methods.ddae_edm import DDAEEDMOptions, edm_loss, edm_loss_weight, sample_training_sigmas


def test_training_sigmas_are_log_normal_with_the_edm_parameters():
    sigmas = sample_training_sigmas(40_000, p_mean=-1.2, p_std=1.2, generator=torch.Generator().manual_seed(0))
    assert sigmas.shape == (40_000,) and bool((sigmas > 0).all())
    log_sigma = sigmas.log()
    assert abs(log_sigma.mean().item() + 1.2) < 0.02
    assert abs(log_sigma.std().item() - 1.2) < 0.02
    # The median of a log-normal is exp(P_mean) = 0.301.
    assert abs(sigmas.median().item() - math.exp(-1.2)) < 0.01
    shifted = sample_training_sigmas(40_000, p_mean=0.5, p_std=0.3, generator=torch.Generator().manual_seed(0))
    assert abs(shifted.log().mean().item() - 0.5) < 0.01 and abs(shifted.log().std().item() - 0.3) < 0.01


def test_loss_weight_is_the_inverse_squared_output_scale():
    # By hand: lambda(0.5) = (0.25 + 0.25) / 0.25^2 = 8, lambda(1) = 1.25 / 0.25 = 5.
    weights = edm_loss_weight(torch.tensor([0.5, 1.0]), 0.5)
    assert torch.allclose(weights, torch.tensor([8.0, 5.0]))
    sigma = torch.tensor([0.002, 0.1, 3.0, 80.0], dtype=torch.float64)
    assert torch.allclose(edm_loss_weight(sigma, 0.5) * EDMSchedule(0.5).c_out(sigma) ** 2, torch.ones(4, dtype=torch.float64))


def test_edm_loss_matches_its_formula_for_an_untrained_unet():
    # DDPM's init zeroes the output conv, so F = 0 and D(x; sigma) = c_skip (x0 + sigma n).
    unet, edm = UNet(UNET_PRESETS["tiny"]), EDMSchedule()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    loss = edm_loss(unet, edm, x0, -1.2, 1.2, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    sigma = sample_training_sigmas(4, -1.2, 1.2, generator=generator).view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=generator)
    c_skip = 0.25 / (sigma**2 + 0.25)
    expected = ((sigma**2 + 0.25) / (0.5 * sigma) ** 2 * (c_skip * (x0 + sigma * noise) - x0) ** 2).mean()
    assert torch.allclose(loss, expected, rtol=1e-5)


def test_edm_loss_of_an_untrained_unet_on_unit_scaled_data_is_one():
    # With data of std sigma_data the weighted error of D = c_skip x is 1 at every sigma (Karras et al., app. B.6).
    unet, edm = UNet(UNET_PRESETS["tiny"]), EDMSchedule()
    x0 = 0.5 * torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = edm_loss(unet, edm, x0, -1.2, 1.2, torch.Generator().manual_seed(1))
    assert abs(loss.item() - 1.0) < 0.05


def test_a_few_adam_steps_lower_the_edm_loss():
    torch.manual_seed(0)
    unet, edm = UNet(UNET_PRESETS["tiny"]), EDMSchedule()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)

    def loss():  # the same noise levels and noise every time
        return edm_loss(unet, edm, x0, -1.2, 1.2, torch.Generator().manual_seed(0))

    before = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * before


def test_default_readout_sigma_is_the_noise_of_ddpm_t_11():
    assert DDAEEDMOptions().readout_sigma == round(DDPMSchedule().equivalent_sigma(11), 3)


@pytest.mark.parametrize("key,value,message", [
    ("p_std", "0", "p_std=0.0 must be positive"),
    ("sigma_data", "-1", "sigma_data=-1.0"),
    ("readout_sigma", "-0.5", "readout_sigma=-0.5 is out of range"),
])
def test_bad_edm_options_are_config_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(DDAEEDMOptions(), {key: value})


def test_ddae_edm_pretrains_and_exports_an_edm_encoder(tmp_path, small_scenes):
    assert METHODS["ddae_edm"].name == "ddae_edm"
    result = pretrain("ddae_edm", small_scenes[:32], RunConfig(out=tmp_path / "edm", progress=False),
                      options={"unet": "tiny", "readout_sigma": 0.1, "readout_block": "up1.0"},
                      train={"epochs": 3, "batch_size": 16, "lr": 2e-3})
    assert all(math.isfinite(loss) for loss in result.epoch_losses)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    encoder, meta = load_encoder(tmp_path / "edm")
    assert isinstance(encoder, DiffusionEncoder) and isinstance(encoder.schedule, EDMSchedule)
    assert meta["method"] == "ddae_edm" and encoder.t == 0.1 and encoder.block == "up1.0"
    with torch.no_grad():
        assert encoder(torch.rand(2, 3, 16, 16)).pooled.shape == (2, 32)
