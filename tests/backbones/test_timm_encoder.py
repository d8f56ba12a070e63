"""timm models behind the Encoder contract: strides from feature_info, own normalisation, export/load, errors.

Every model is built with pretrained=false (no network); the one pretrained=true test points the
Hugging Face cache at an empty folder in offline mode, so it checks the error a user without weights sees.
"""

import json

import pytest
import torch

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.backbones.timm_encoder import TimmEncoder, parse_timm_reference
from sslbench.engine import ENCODER_SPEC, export_encoder, load_encoder
from sslbench.errors import ConfigError, SslbenchError
from sslbench.evaluation import encoder_subject

# ViT/Swin at test size: the published layouts shrunk through create_model's own keyword arguments.
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 16, "num_heads": 1}
TINY_SWIN = {"img_size": 32, "window_size": 2, "embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1]}


def test_resnet_maps_are_keyed_by_timm_reductions_and_pooled_is_the_deepest_map():
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t").eval()
    images = torch.rand(2, 3, 32, 32)
    features = encoder(images)
    assert list(features.maps) == [2, 4, 8, 16, 32]
    assert encoder.map_channels == {2: 64, 4: 64, 8: 128, 16: 256, 32: 512} and encoder.pooled_dim == 512
    for stride, feature_map in features.maps.items():
        assert feature_map.shape == (2, encoder.map_channels[stride], 32 // stride, 32 // stride)
    torch.testing.assert_close(features.pooled, features.maps[32].mean((2, 3)))
    # ImageNet statistics from timm's pretrained_cfg are applied inside the encoder.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(features.maps[32], encoder.model((images - mean) / std)[-1])


def test_shared_reduction_keeps_the_deepest_map_and_model_args_reach_timm():
    # output_stride=16 makes timm report the last two ResNet stages at reduction 16.
    encoder = TimmEncoder("resnet10t", model_args={"output_stride": 16}).eval()
    assert encoder.map_channels == {2: 64, 4: 64, 8: 128, 16: 512}
    features = encoder(torch.rand(1, 3, 32, 32))
    assert features.maps[16].shape == (1, 512, 2, 2) and features.pooled.shape == (1, 512)


def test_vit_uses_its_own_normalisation_and_one_map_per_stride():
    encoder = TimmEncoder("vit_tiny_patch16_224", model_args=TINY_VIT).eval()
    assert encoder.normalize.mean.flatten().tolist() == [0.5, 0.5, 0.5]
    images = torch.rand(2, 3, 32, 32)
    features = encoder(images)
    assert list(features.maps) == [8] and features.maps[8].shape == (2, 16, 4, 4)
    blocks = encoder.model((images - 0.5) / 0.5)
    torch.testing.assert_close(features.maps[8], blocks[-1])
    assert not torch.allclose(features.maps[8], blocks[0])


def test_channels_last_maps_are_returned_channels_first():
    encoder = TimmEncoder("swin_tiny_patch4_window7_224", model_args=TINY_SWIN).eval()
    assert encoder.channels_last_output
    features = encoder(torch.rand(2, 3, 32, 32))
    assert {s: tuple(m.shape) for s, m in features.maps.items()} == {4: (2, 8, 8, 8), 8: (2, 16, 4, 4), 16: (2, 32, 2, 2), 32: (2, 64, 1, 1)}
    torch.testing.assert_close(features.pooled, features.maps[32].flatten(1))


def test_export_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    encoder = TimmEncoder("resnet10t").eval()
    export_encoder(encoder, tmp_path, {"method": "timm"})
    loaded, meta = load_encoder(tmp_path)
    assert meta["spec"] == {"backbone": "timm", "name": "resnet10t", "pretrained": False, "model_args": {}}
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded(images).pooled, encoder(images).pooled)


@pytest.fixture
def offline_empty_hub(monkeypatch, tmp_path):
    """Hugging Face in offline mode with an empty cache: any weight download fails at once."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_loading_a_checkpoint_of_pretrained_weights_downloads_nothing(tmp_path, offline_empty_hub):
    encoder = TimmEncoder("resnet10t").eval()
    export_encoder(encoder, tmp_path, {})
    meta = json.loads((tmp_path / ENCODER_SPEC).read_text())
    meta["spec"]["pretrained"] = True  # as exported from timm:resnet10t with its published weights
    (tmp_path / ENCODER_SPEC).write_text(json.dumps(meta))
    loaded, _ = load_encoder(tmp_path)
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(images).pooled, encoder(images).pooled)


def test_missing_weights_give_one_line_naming_the_fixes(offline_empty_hub):
    with pytest.raises(SslbenchError) as error:
        TimmEncoder("resnet10t", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and "resnet10t" in message
    assert "HF_HUB_OFFLINE" in message and "timm:resnet10t?pretrained=false" in message


def test_unknown_model_names_close_matches():
    with pytest.raises(ConfigError, match=r"unknown timm model 'resnet10x'; did you mean resnet10t"):
        TimmEncoder("resnet10x")
    with pytest.raises(ConfigError, match="see timm.list_models"):
        build_encoder({"backbone": "timm", "name": "qqqqqqqq"})
    with pytest.raises(ConfigError, match="rejects the options"):
        TimmEncoder("resnet10t", model_args={"not_an_option": 1})


def test_reference_syntax():
    assert parse_timm_reference("timm:resnet50") == {"backbone": "timm", "name": "resnet50", "pretrained": True, "model_args": {}}
    assert parse_timm_reference("timm:resnet10t?pretrained=false&output_stride=16") == {
        "backbone": "timm", "name": "resnet10t", "pretrained": False, "model_args": {"output_stride": 16}}
    assert backbone_spec("timm:resnet10t?pretrained=false") == parse_timm_reference("resnet10t?pretrained=false")
    for bad, message in (("timm:", "names no model"), ("timm:resnet10t?pretrained", "is not KEY=VALUE"),
                         ("timm:resnet10t?pretrained=maybe", "is not a bool")):
        with pytest.raises(ConfigError, match=message):
            parse_timm_reference(bad)


def test_random_init_of_a_pretrained_spec_needs_no_weights(offline_empty_hub):
    encoder = build_encoder(parse_timm_reference("timm:resnet10t"), pretrained=False)
    assert encoder.spec["pretrained"] is False
    subject = encoder_subject("timm:resnet10t?pretrained=false", seed=3, image_size=32)
    assert (subject.method, subject.checkpoint) == ("random-timm:resnet10t", "random")
    again = encoder_subject("random:timm:resnet10t", seed=3, image_size=32)
    assert again.method == "random-timm:resnet10t"
    for a, b in zip(subject.encoder.parameters(), again.encoder.parameters()):
        torch.testing.assert_close(a, b)  # same seed, same random init
