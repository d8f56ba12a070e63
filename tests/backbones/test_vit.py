"""The ViT behind the Encoder contract: shapes at two input sizes, position embeddings, visible-only
encoding, spec names, export/reload, and the dense tasks on its single stride-4 map."""

import math

import pytest
import torch

from sslbench.backbones import backbone_spec, build_encoder
from sslbench.backbones.vit import VisionTransformer, sincos_position_embedding
from sslbench.data import load_dataset
from sslbench.engine import export_encoder, load_encoder
from sslbench.errors import ConfigError
from sslbench.tasks import TASKS, ProbeConfig


def nano(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    return build_encoder({**backbone_spec("vit-nano", image_size=32), **overrides}).eval()


@pytest.mark.parametrize("size,grid", [(32, 8), (16, 4)])
def test_vit_features_at_build_size_and_at_half_size(size, grid):
    encoder = nano()
    assert encoder.pooled_dim == 64 and encoder.map_channels == {4: 64}
    with torch.no_grad():
        features = encoder(torch.rand(2, 3, size, size))
    assert features.pooled.shape == (2, 64)
    assert list(features.maps) == [4] and features.maps[4].shape == (2, 64, grid, grid)


def test_pooled_is_the_cls_token_or_the_mean_of_the_patch_tokens():
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        cls_encoder = nano()
        tokens = cls_encoder.forward_tokens(images)
        assert torch.equal(cls_encoder(images).pooled, tokens[:, 0])
        mean_encoder = nano(pool="mean")
        features = mean_encoder(images)
    assert torch.allclose(features.pooled, features.maps[4].mean((2, 3)), atol=1e-6)
    # The map is the patch tokens in raster order: token 1 + 8 * row + col sits at (row, col).
    assert torch.equal(cls_encoder(images).maps[4][:, :, 2, 5], tokens[:, 1 + 8 * 2 + 5])


def test_sincos_table_by_hand():
    table = sincos_position_embedding(8, 2, 3)  # quarter = 2: frequencies 1 and 1/100
    assert table.shape == (6, 8)
    # Patch (row 1, column 2) is raster index 5: [sin(1), sin(0.01), cos(1), cos(0.01), sin(2), sin(0.02), cos(2), cos(0.02)].
    expected = [math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01), math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)]
    assert torch.allclose(table[5], torch.tensor(expected), atol=1e-6)
    with pytest.raises(ConfigError, match="multiple of 4"):
        sincos_position_embedding(6, 2, 2)


def test_position_table_is_resized_to_other_grids():
    encoder = nano()
    assert torch.equal(encoder.patch_positions(8, 8), encoder.position[:, 1:])
    with torch.no_grad():
        encoder.position[:, 1:] = 0.5  # a constant table stays constant under bicubic resizing
        assert torch.allclose(encoder.patch_positions(4, 4), torch.full((1, 16, 64), 0.5))
        encoder.position[:, 1:] = torch.arange(64.0).view(1, 64, 1)  # raster index
        small = encoder.patch_positions(4, 4)[0, :, 0]
    # Each 4x4 cell covers a 2x2 block of the 8x8 grid: its value lies between that block's values,
    # so the table is resampled over the whole image, not cut to its top-left corner.
    block = torch.tensor([0.0, 1, 8, 9])
    assert block.min() - 1 < small[0] < block.max() + 1
    assert small[-1] > 50


def test_forward_tokens_on_kept_patches_ignores_the_others():
    encoder = nano()
    images = torch.rand(1, 3, 32, 32)
    keep = torch.tensor([[0, 9, 63]])  # patches (0, 0), (1, 1), (7, 7)
    changed = images.clone()
    changed[:, :, 8:, :8] = torch.rand(1, 3, 24, 8)  # rows 2..7 of column 0: none kept
    with torch.no_grad():
        latent = encoder.forward_tokens(images, keep)
        assert latent.shape == (1, 4, 64)
        assert torch.equal(latent, encoder.forward_tokens(changed, keep))
        changed[:, :, 28:, 28:] = 0.0  # inside kept patch 63
        assert not torch.allclose(latent, encoder.forward_tokens(changed, keep))


@pytest.mark.parametrize("position", ["learned", "sincos"])
def test_export_and_reload_give_the_same_features(tmp_path, position):
    encoder = nano(position_embedding=position)
    export_encoder(encoder, tmp_path, {"method": "test"})
    reloaded, meta = load_encoder(tmp_path)
    assert meta["spec"]["backbone"] == "vit" and meta["spec"]["position_embedding"] == position
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(encoder(images).pooled, reloaded(images).pooled)


def test_backbone_names():
    assert backbone_spec("vit-tiny") == {"backbone": "vit", "dim": 192, "depth": 12, "heads": 3, "patch_size": 4, "image_size": 32}
    assert backbone_spec("vit-small", image_size=128)["patch_size"] == 8
    assert backbone_spec("vit-nano/8", image_size=64)["patch_size"] == 8
    for name, message in [("vit-huge", "unknown ViT preset"), ("vit-tiny/x", "not a number")]:
        with pytest.raises(ConfigError, match=message):
            backbone_spec(name)


def test_bad_vit_settings_are_config_errors():
    with pytest.raises(ConfigError, match="patch size 4"):
        nano()(torch.rand(1, 3, 30, 30))
    with pytest.raises(ConfigError, match="multiple of heads"):
        VisionTransformer(dim=64, heads=3)
    with pytest.raises(ConfigError, match="position_embedding"):
        VisionTransformer(dim=64, heads=2, depth=1, position_embedding="rope")


@pytest.mark.parametrize("task", ["depth", "segmentation"])
def test_dense_tasks_accept_the_single_stride_4_map(task):
    images = load_dataset("scenes", None, "train", limit=24)
    train, test = images.subset(torch.arange(16)), images.subset(torch.arange(16, 24))
    metrics = TASKS[task]().evaluate(nano(), train, test, "probe", ProbeConfig(epochs=1, dense_batch_size=8, decoder_width=8))
    assert metrics and all(math.isfinite(v) for v in metrics.values())
