"""DDPM schedule, the DDAE readout encoder and the DDPM training loss."""

import json
import math

import pytest
import torch

from sslbench.backbones.diffusion import (EDM_SIGMA_MIN, DDPMSchedule, DiffusionEncoder, EDMSchedule, diffusion_encoder_from_spec,
                                          schedule_from_spec)
from sslbench.backbones.unet import UNET_PRESETS, UNet
from sslbench.errors import ConfigError
from sslbench.methods.ddae import ddpm_loss


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
    with pytest.raises(ConfigError, match="lacks its .unet. config"):
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


TINY_BLOCKS = UNet(UNET_PRESETS["tiny"]).block_names()


@pytest.mark.parametrize("block", TINY_BLOCKS)
def test_readout_of_every_named_block_has_its_channels(block):
    unet = random_unet()
    encoder = DiffusionEncoder(unet, t=11, block=block)
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, 16, 16))
        maps = encoder.read_blocks(torch.rand(2, 3, 16, 16), [block])
    assert encoder.pooled_dim == unet.block_channels(block)
    assert features.pooled.shape == (2, unet.block_channels(block))
    stride = unet.block_stride(block)
    assert maps[block].shape == (2, unet.block_channels(block), 16 // stride, 16 // stride)


def test_read_blocks_gives_every_requested_block_from_one_pass():
    unet = random_unet()
    encoder = DiffusionEncoder(unet, t=50, block="mid")
    calls = []
    unet.conv_in.register_forward_hook(lambda *_: calls.append("in"))
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        together = encoder.read_blocks(images, TINY_BLOCKS)
        assert calls == ["in"]  # one U-Net pass for all 16 blocks
        for block in ("down1.0", "mid", "up1.1", "out"):
            assert torch.equal(together[block], encoder.read_blocks(images, [block])[block])


def test_pyramid_of_named_blocks_is_keyed_by_their_strides():
    unet = random_unet()
    encoder = DiffusionEncoder(unet, t=11, block="up2.1", pyramid_blocks=["mid", "up0.1", "up1.1"])
    assert encoder.pyramid_blocks == ["up0.1", "up1.1", "mid"] and encoder.map_channels == {1: 16, 2: 32, 4: 32}
    decoder_side = DiffusionEncoder(unet, t=11, block="mid", pyramid_blocks=["up2.up", "down1.down", "in"])
    assert decoder_side.map_channels == {1: 16, 2: 32, 4: 32}  # up2.up is at stride 2, down1.down at 4
    with torch.no_grad():
        features = decoder_side(torch.rand(2, 3, 32, 32))
    assert {stride: tuple(m.shape) for stride, m in features.maps.items()} == {1: (2, 16, 32, 32), 2: (2, 32, 16, 16), 4: (2, 32, 8, 8)}


def test_readout_at_t0_feeds_the_unet_the_clean_image():
    unet = random_unet()
    seen = {}
    unet.conv_in.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0].clone()))
    images = torch.rand(2, 3, 16, 16)
    for schedule in (DDPMSchedule(), EDMSchedule()):
        encoder = DiffusionEncoder(unet, t=0, block="mid", schedule=schedule)
        with torch.no_grad():
            encoder(images)
        scale = 1.0 if isinstance(schedule, DDPMSchedule) else 1 / 0.5  # EDM's c_in(0) = 1 / sigma_data
        assert torch.equal(seen["x"], (images * 2 - 1) * scale)
        encoder.t = 11 if isinstance(schedule, DDPMSchedule) else 0.05
        with torch.no_grad():
            encoder(images)
        assert not torch.allclose(seen["x"], (images * 2 - 1) * scale, atol=1e-3)


@pytest.mark.parametrize("sigma,c_skip,c_out,c_in,c_noise", [
    # By hand with sigma_data = 0.5: c_skip = 0.25 / (s^2 + 0.25), c_out = 0.5 s / sqrt(s^2 + 0.25),
    # c_in = 1 / sqrt(s^2 + 0.25), c_noise = ln(s) / 4.
    (0.5, 0.5, 0.35355339, 1.41421356, -0.17328680),
    (1.0, 0.2, 0.44721360, 0.89442719, 0.0),
    (0.002, 0.99998400, 0.00199998, 1.99998400, -1.55365202),
    (80.0, 3.9060974e-05, 0.49999023, 0.01249976, 1.09550666),
])
def test_edm_preconditioning_coefficients(sigma, c_skip, c_out, c_in, c_noise):
    edm = EDMSchedule(sigma_data=0.5)
    s = torch.tensor(sigma, dtype=torch.float64)
    for got, expected in ((edm.c_skip(s), c_skip), (edm.c_out(s), c_out), (edm.c_in(s), c_in), (edm.c_noise(s), c_noise)):
        assert math.isclose(got.item(), expected, rel_tol=1e-6, abs_tol=1e-8)


def test_edm_denoiser_is_skip_plus_scaled_network_output():
    edm, unet = EDMSchedule(), random_unet()
    noised, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.1, 3.0])
    with torch.no_grad():
        got = edm.denoise(unet, noised, sigma)
        for i in range(2):
            s = sigma[i].item()
            network = unet(noised[i:i + 1] / math.sqrt(s**2 + 0.25), torch.tensor([math.log(s) / 4]))
            expected = 0.25 / (s**2 + 0.25) * noised[i] + 0.5 * s / math.sqrt(s**2 + 0.25) * network[0]
            assert torch.allclose(got[i], expected, atol=1e-5)


def test_edm_readout_noises_with_sigma_and_conditions_on_c_noise():
    unet = random_unet()
    encoder = DiffusionEncoder(unet, t=0.3, block="mid", schedule=EDMSchedule(), noise_seed=2)
    images = torch.rand(2, 3, 16, 16)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        x = (images * 2 - 1 + 0.3 * noise) / math.sqrt(0.3**2 + 0.25)
        expected = unet.forward_features(x, torch.full((2,), math.log(0.3) / 4), ["mid"])["mid"].mean((2, 3))
        assert torch.allclose(encoder(images).pooled, expected, atol=1e-5)
        encoder.t = 0
        clean = unet.forward_features((images * 2 - 1) * 2, torch.full((2,), math.log(EDM_SIGMA_MIN) / 4), ["mid"])["mid"]
        assert torch.allclose(encoder(images).pooled, clean.mean((2, 3)), atol=1e-5)


def test_edm_encoder_spec_round_trip_and_level_checks():
    encoder = DiffusionEncoder(random_unet(), t=0.047, block="up1.0", schedule=EDMSchedule(sigma_data=0.4))
    assert encoder.spec["schedule"] == {"formulation": "edm", "sigma_data": 0.4}
    clone = diffusion_encoder_from_spec(json.loads(json.dumps(encoder.spec)))
    assert isinstance(clone.schedule, EDMSchedule) and clone.schedule.sigma_data == 0.4 and clone.t == 0.047
    # Specs exported before EDM existed carry no formulation: they are DDPM.
    assert isinstance(schedule_from_spec({"num_steps": 1000, "beta_start": 1e-4, "beta_end": 0.02}), DDPMSchedule)
    with pytest.raises(ConfigError, match="unknown diffusion formulation 'vp'"):
        schedule_from_spec({"formulation": "vp"})
    with pytest.raises(ConfigError, match="EDM readout sigma=-0.1"):
        DiffusionEncoder(random_unet(), t=-0.1, block="mid", schedule=EDMSchedule())
    with pytest.raises(ConfigError, match="t=2.5 is out of range; use an integer"):
        DiffusionEncoder(random_unet(), t=2.5, block="mid")
    with pytest.raises(ConfigError, match="sigma_data=0"):
        EDMSchedule(sigma_data=0)


def test_equivalent_sigma_of_a_ddpm_readout():
    s = DDPMSchedule()
    assert s.equivalent_sigma(0) == 0.0
    assert math.isclose(s.equivalent_sigma(1), math.sqrt(1e-4 / (1 - 1e-4)), rel_tol=1e-12)  # abar_0 = 1 - beta_0
    # abar_10 = prod_{s <= 10} (1 - (1e-4 + s * 0.0199 / 999)).
    abar = math.prod(1 - (1e-4 + step * 0.0199 / 999) for step in range(11))
    assert math.isclose(s.equivalent_sigma(11), math.sqrt((1 - abar) / abar), rel_tol=1e-9)
    assert round(s.equivalent_sigma(11), 3) == 0.047
