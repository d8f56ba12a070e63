"""Every backbone satisfies the Encoder contract: pooled (B, pooled_dim), maps keyed by stride."""

import pytest
import torch
from torch import nn

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.backbones.base import count_parameters
from sslbench.errors import ConfigError

CASES = [
    ("resnet18", 0.25, 32, 128, {1: 16, 2: 32, 4: 64, 8: 128}),
    ("resnet18", 1.0, 32, 512, {1: 64, 2: 128, 4: 256, 8: 512}),
    ("resnet50", 0.25, 32, 512, {1: 64, 2: 128, 4: 256, 8: 512}),
    ("resnet18", 0.25, 128, 128, {4: 16, 8: 32, 16: 64, 32: 128}),
    ("unet-tiny", 1.0, 32, None, None),
    ("vit-nano", 1.0, 32, 64, {4: 64}),
    ("vit-nano/8", 1.0, 64, 64, {8: 64}),
]


@pytest.mark.parametrize("name,width,size,pooled_dim,channels", CASES)
def test_encoder_contract(name, width, size, pooled_dim, channels):
    encoder = build_encoder(backbone_spec(name, width, size)).eval()
    if pooled_dim is not None:
        assert encoder.pooled_dim == pooled_dim
        assert encoder.map_channels == channels
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, size, size))
    assert features.pooled.shape == (2, encoder.pooled_dim)
    assert set(features.maps) == set(encoder.map_channels)
    for stride, fmap in features.maps.items():
        assert fmap.shape == (2, encoder.map_channels[stride], size // stride, size // stride)
    assert list(features.maps) == sorted(features.maps)  # finest first


def test_spec_round_trip_rebuilds_the_same_architecture():
    encoder = build_encoder(backbone_spec("resnet18", 0.25))
    clone = build_encoder(encoder.spec)
    clone.load_state_dict(encoder.state_dict())
    x = torch.rand(2, 3, 32, 32)
    encoder.eval(), clone.eval()
    assert torch.equal(encoder(x).pooled, clone(x).pooled)


def test_resnet18_quarter_width_parameter_count():
    # C10-mini backbone: channels 16/32/64/128; full width is the classic 11.2M CIFAR ResNet-18.
    full = build_encoder(backbone_spec("resnet18", 1.0))
    assert round(count_parameters(full) / 1e6, 1) == 11.2


def test_count_parameters_counts_shared_ones_once_and_can_skip_frozen_ones():
    shared = nn.Linear(3, 2)  # 3 x 2 + 2 = 8
    frozen = nn.Linear(2, 4).requires_grad_(False)  # 2 x 4 + 4 = 12
    first, second = nn.Sequential(shared, frozen), nn.Sequential(shared, nn.Linear(2, 1))  # + 2 x 1 + 1 = 3
    assert count_parameters(first, second) == 8 + 12 + 3
    assert count_parameters(first, second, trainable_only=True) == 8 + 3
    assert count_parameters(frozen, trainable_only=True) == 0


@pytest.mark.parametrize("name", ["resnet19", "unet-huge", "vgg"])
def test_unknown_backbone_is_a_config_error(name):
    with pytest.raises(ConfigError, match="unknown"):
        build_encoder(backbone_spec(name))


@pytest.mark.parametrize("name", ["resnet18", "vit-nano"])
def test_a_spec_key_the_backbone_does_not_take_is_a_config_error(name):
    with pytest.raises(ConfigError, match=r"spec has a key it does not take \('poool'\); remove or correct it \(it takes '"):
        build_encoder({**backbone_spec(name), "poool": "mean"})


def test_a_diffusion_spec_with_a_stale_unet_key_or_no_readout_block_is_a_config_error():
    spec = backbone_spec("unet-tiny")
    with pytest.raises(ConfigError, match=r"diffusion U-Net spec has a key it does not take \('channel_mult'\)"):
        build_encoder({**spec, "unet": {**spec["unet"], "channel_mult": [1, 2]}})
    with pytest.raises(ConfigError, match=r"diffusion encoder spec lacks 'block'"):
        build_encoder({key: value for key, value in spec.items() if key != "block"})
    with pytest.raises(ConfigError, match=r"lacks its 'unet' config"):
        build_encoder({key: value for key, value in spec.items() if key != "unet"})


def test_a_type_error_inside_a_backbone_constructor_is_not_reported_as_a_bad_spec(monkeypatch):
    """A bug in a constructor (here a TypeError raised inside it) must surface as itself, not as advice to fix the spec."""
    def broken(depth: str = "resnet18", width: float = 1.0, stem: str = "cifar"):
        raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'int'")

    monkeypatch.setattr("sslbench.backbones.ResNet", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        build_encoder(backbone_spec("resnet18"))


def test_bad_width_is_a_config_error():
    with pytest.raises(ConfigError, match="width"):
        build_encoder(backbone_spec("resnet18", -1.0))


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_resnet_runs_in_the_layout_of_its_weights_whatever_the_layout_of_its_input(layout):
    """The views arrive channels_last; a ResNet kept contiguous must not be turned channels_last by them."""
    torch.manual_seed(0)
    encoder = build_encoder(backbone_spec("resnet18", 0.125)).eval().to(memory_format=layout)
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        reference = encoder(images).pooled
        features = encoder(images.contiguous(memory_format=torch.channels_last))
    assert all(m.is_contiguous(memory_format=layout) for m in features.maps.values())
    assert torch.allclose(features.pooled, reference, atol=1e-5)


def test_a_projected_spec_without_its_head_is_a_config_error():
    with pytest.raises(ConfigError, match=r"projected encoder spec lacks 'head_dims'"):
        build_encoder({"backbone": "projected", "encoder": backbone_spec("resnet18", 0.25)})
