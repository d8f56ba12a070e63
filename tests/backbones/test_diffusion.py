"""DDPM schedule, the DDAE readout encoder and the DDPM training loss."""

import json
import math

import pytest
import torch

from sslbench.backbones.diffusion import DDPMSchedule, DiffusionEncoder, diffusion_encoder_from_spec
from sslbench.backbones.unet import UNET_PRESETS, UNet
from sslbench.errors import ConfigError
from sslbench.methods.ddae import ddpm_loss


@pytest.fixture(autouse=True)
def one_thread():
    # These shapes are tiny: one thread is fastest, and OpenMP threads spin badly on a shared busy CPU.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet(UNET_PRESETS["tiny"]).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.2)
    return unet


def test_linear_schedule_values():
    s = DDPMSchedule()
    assert s.betas.shape == s.alphas.shape == s.alphas_cumprod.shape == (1000,)
    assert math.isclose(s.betas[0].item(), 1e-4, rel_tol=1e-6) and math.isclose(s.betas[-1].item(), 0.02, rel_tol=1e-6)
    steps = s.betas[1:] - s.betas[:-1]
    assert torch.allclose(steps, torch.full_like(steps, (0.02 - 1e-4) / 999), rtol=1e-3)
    assert torch.allclose(s.alphas, 1 - s.betas)
    assert torch.allclose(s.alphas_cumprod, torch.cumprod(s.alphas.double(), 0).float())
    # By hand: abar_1 = (1 - 1e-4) * (1 - (1e-4 + 0.0199 / 999)).
    assert math.isclose(s.alphas_cumprod[1].item(), 0.99978009207, rel_tol=1e-7)
    assert s.alphas_cumprod[-1].item() < 1e-4  # almost pure noise at the last step
    assert "betas" not in s.state_dict()


@pytest.mark.parametrize("t", [0, 10, 250, 999])
def test_add_noise_statistics(t):
    s = DDPMSchedule()
    abar = s.alphas_cumprod[t].item()
    x0 = torch.full((20_000, 1, 1, 1), 0.7)
    steps = torch.full((20_000,), t)
    torch.manual_seed(t)
    xt = s.add_noise(x0, steps, torch.randn_like(x0))
    assert abs(xt.mean().item() - math.sqrt(abar) * 0.7) < 0.03
    assert abs(xt.std().item() - math.sqrt(1 - abar)) < 0.03 * max(math.sqrt(1 - abar), 0.1)
    assert torch.allclose(s.add_noise(x0, steps, torch.zeros_like(x0)), math.sqrt(abar) * x0)


def test_add_noise_uses_each_images_own_timestep():
    s = DDPMSchedule()
    x0, noise = torch.ones(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    xt = s.add_noise(x0, torch.tensor([0, 999]), noise)
    for i, t in enumerate([0, 999]):
        abar = s.alphas_cumprod[t]
        assert torch.allclose(xt[i], (abar.sqrt() + (1 - abar).sqrt()).expand(3, 4, 4))


def test_diffusion_encoder_contract():
    encoder = DiffusionEncoder(random_unet(), t=11, block="mid")
    assert encoder.pyramid_blocks == ["down0.0", "down1.0", "mid"]
    assert encoder.pooled_dim == 32 and encoder.map_channels == {1: 16, 2: 32, 4: 32}
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 32, 32))
    assert features.pooled.shape == (2, 32)
    assert list(features.maps) == [1, 2, 4]
    for stride, fmap in features.maps.items():
        assert fmap.shape == (2, encoder.map_channels[stride], 32 // stride, 32 // stride)
    assert encoder.spec["backbone"] == "ddpm_unet" and encoder.spec["t"] == 11 and encoder.spec["block"] == "mid"


def test_readout_is_deterministic_and_depends_on_noise_level():
    encoder = DiffusionEncoder(random_unet(), t=500, block="mid")
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        first, second = encoder(images).pooled, encoder(images).pooled
        assert torch.equal(first, second)
        encoder.noise_seed = 1
        assert not torch.allclose(encoder(images).pooled, first)
        encoder.t = 0
        clean = encoder(images).pooled
    assert not torch.allclose(clean, first, atol=1e-3)
    # t = 0 is the clean image in [-1, 1] at U-Net timestep 0.
    expected = encoder.unet.forward_features(images * 2 - 1, torch.zeros(2, dtype=torch.long), ["mid"])["mid"].mean((2, 3))
    assert torch.allclose(clean, expected.detach())


def test_readout_t_noises_with_the_previous_training_index():
    # Readout t (DDAE's 1-based count) noises with abar[t - 1] and feeds U-Net timestep t - 1.
    unet = random_unet()
    encoder = DiffusionEncoder(unet, t=500, block="up1.0", noise_seed=3)
    images = torch.rand(2, 3, 16, 16)
    generator = torch.Generator().manual_seed(3)
    noise = torch.randn(images.shape, generator=generator)
    steps = torch.full((2,), 499)
    with torch.no_grad():
        expected = unet.forward_features(encoder.schedule.add_noise(images * 2 - 1, steps, noise), steps, ["up1.0"])["up1.0"]
        assert torch.allclose(encoder(images).pooled, expected.mean((2, 3)))


def test_spec_round_trip():
    encoder = DiffusionEncoder(random_unet(), t=20, block="up2.1", pyramid_blocks=["up2.1", "up1.0", "up0.1"], noise_seed=5)
    clone = diffusion_encoder_from_spec(json.loads(json.dumps(encoder.spec)))
    assert clone.spec == encoder.spec
    clone.load_state_dict(encoder.state_dict())
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        a, b = encoder(images), clone(images)
    assert torch.equal(a.pooled, b.pooled)
    assert all(torch.equal(a.maps[s], b.maps[s]) for s in (1, 2, 4))


def test_bad_readouts_are_config_errors():
    unet = UNet(UNET_PRESETS["tiny"])
    with pytest.raises(ConfigError, match="t=1001"):
        DiffusionEncoder(unet, t=1001, block="mid")
    with pytest.raises(ConfigError, match="unknown U-Net block"):
        DiffusionEncoder(unet, t=0, block="middle")
    with pytest.raises(ConfigError, match="one block per stride"):
        DiffusionEncoder(unet, t=0, block="mid", pyramid_blocks=["down2.0", "mid"])
    with pytest.raises(ConfigError, match="malformed"):
        diffusion_encoder_from_spec({"backbone": "ddpm_unet", "t": 3})


def test_ddpm_loss_of_an_untrained_unet_is_the_noise_variance():
    # DDPM zero-initialises the output conv, so eps_theta = 0 and the loss is mean(eps^2) ~ 1.
    unet, schedule = UNet(UNET_PRESETS["tiny"]), DDPMSchedule()
    x0 = torch.rand(8, 3, 32, 32) * 2 - 1
    loss = ddpm_loss(unet, schedule, x0, torch.Generator().manual_seed(0))
    assert abs(loss.item() - 1.0) < 0.05
    assert torch.equal(loss, ddpm_loss(unet, schedule, x0, torch.Generator().manual_seed(0)))


def test_a_few_adam_steps_lower_the_ddpm_loss():
    torch.manual_seed(0)
    unet, schedule = UNet(UNET_PRESETS["tiny"]), DDPMSchedule()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)

    def loss():  # the same timesteps and noise every time
        return ddpm_loss(unet, schedule, x0, torch.Generator().manual_seed(0))

    before = loss().item()
    for _ in range(10):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.8 * before
