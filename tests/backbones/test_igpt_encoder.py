"""iGPT's transformer and encoder: no future leak, BERT masking, middle-layer readout, spec round trip."""

import pytest
import torch
import torch.nn.functional as F

from sslbench.backbones import build_encoder
from sslbench.backbones.igpt import ImageGPT, ImageGPTEncoder
from sslbench.errors import ConfigError

TINY = {"palette_size": 8, "grid": 4, "image_size": 16, "depth": 4, "width": 16, "heads": 2}


def _fitted_encoder(**overrides):
    torch.manual_seed(0)
    encoder = ImageGPTEncoder(**{**TINY, **overrides}).eval()
    encoder.palette.fit(torch.rand(512, 3), 5, torch.Generator().manual_seed(0))
    return encoder


def _tokens(seed=0, length=12, vocabulary=8):
    return torch.randint(0, vocabulary, (2, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_autoregressive_slot_never_sees_its_own_or_later_tokens():
    torch.manual_seed(0)
    model = ImageGPT(vocabulary=8, length=12, depth=2, width=16, heads=2, causal=True).eval()
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 8
    before, after = model(tokens), model(changed)
    # Slot i predicts token i from the start vector and tokens < i: slots 0..5 ignore token 5.
    assert torch.equal(before[:, :6], after[:, :6])
    assert not torch.allclose(before[:, 6:], after[:, 6:])


@torch.no_grad()
def test_bert_attention_is_bidirectional_and_a_masked_token_is_invisible():
    torch.manual_seed(0)
    model = ImageGPT(vocabulary=8, length=12, depth=2, width=16, heads=2, causal=False).eval()
    tokens = _tokens()
    changed = tokens.clone()
    changed[:, 5] = (changed[:, 5] + 1) % 8
    assert not torch.allclose(model(tokens)[:, :5], model(changed)[:, :5])
    masked = torch.zeros(2, 12, dtype=torch.bool)
    masked[:, 5] = True
    assert torch.equal(model(tokens, masked=masked), model(changed, masked=masked))


@torch.no_grad()
def test_readout_is_the_layernormed_middle_layer_pooled_over_positions():
    encoder = _fitted_encoder()
    assert encoder.readout_layer == 2 and encoder.spec["readout_layer"] == 2
    images = torch.rand(3, 3, 16, 16)
    features = encoder(images)
    assert features.pooled.shape == (3, 16)
    assert set(features.maps) == {4} and features.maps[4].shape == (3, 16, 4, 4)
    hidden = encoder.transformer(encoder.tokenize(images), layers=2)
    expected = F.layer_norm(hidden, (16,))
    assert torch.allclose(features.pooled, expected.mean(1), atol=1e-5)
    assert torch.allclose(features.maps[4].flatten(2).transpose(1, 2), expected, atol=1e-5)  # raster order
    # Blocks after the readout layer are never run; reading the last layer gives other features.
    for param in encoder.transformer.blocks[2:].parameters():
        param.add_(1.0)
    assert torch.allclose(encoder(images).pooled, features.pooled, atol=1e-6)
    last = _fitted_encoder(readout_layer=4)
    assert not torch.allclose(last(images).pooled, _fitted_encoder()(images).pooled)


@torch.no_grad()
def test_spec_rebuilds_the_encoder_and_other_input_sizes_keep_the_token_grid():
    encoder = _fitted_encoder()
    clone = build_encoder(encoder.spec).eval()
    clone.load_state_dict(encoder.state_dict())
    assert bool(clone.palette.fitted) and torch.equal(clone.palette.colours, encoder.palette.colours)
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(clone(images).pooled, encoder(images).pooled)
    assert encoder.map_channels == {4: 16}
    assert encoder(torch.rand(2, 3, 32, 32)).maps[8].shape == (2, 16, 4, 4)


@pytest.mark.parametrize("overrides,message", [
    ({"heads": 3}, "not divisible by heads=3"),
    ({"readout_layer": 5}, "readout_layer=5 is out of range"),
    ({"readout_layer": 0}, "readout_layer=0 is out of range"),
    ({"grid": 0}, "must all be positive"),
])
def test_bad_sizes_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ImageGPTEncoder(**{**TINY, **overrides})


def test_malformed_spec_is_a_config_error():
    with pytest.raises(ConfigError, match=r"iGPT encoder spec has a key it does not take \('layers'\)"):
        build_encoder({"backbone": "igpt", "layers": 3})
