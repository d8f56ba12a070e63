"""MAE: patchify, the two maskings, visible-only encoding, the loss by hand, and a short training run."""

import math

import pytest
import torch

from sslbench.backbones import backbone_spec
from sslbench.engine import RunConfig, load_encoder, pretrain
from sslbench.errors import ConfigError
from sslbench.methods import METHODS, TrainConfig
from sslbench.methods.mae import MAE, MAEOptions, mae_loss
from sslbench.methods.masking import patchify, uniform_keep_indices, unpatchify

NANO_16 = backbone_spec("vit-nano", image_size=16)  # patch 4: a 4x4 grid of 16 patches


def build_mae(**options) -> MAE:
    torch.manual_seed(0)
    return MAE(NANO_16, MAEOptions(**options), TrainConfig(), image_size=16, steps_per_epoch=1).eval()


def test_patchify_round_trip_and_layout():
    images = torch.rand(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # Patch 4 is row 1, column 1 in raster order; its pixels are ordered (row, column, channel).
    assert torch.equal(patches[1, 4], images[1, :, 4:8, 4:8].permute(1, 2, 0).flatten())
    assert torch.equal(unpatchify(patches, 4, 8, 12), images)


def test_random_masking_hides_exactly_three_quarters():
    mae = build_mae()
    keep, replaced = mae.sample_masks(50, torch.Generator().manual_seed(0))
    assert replaced is None and keep.shape == (50, 4)
    assert all(len(set(row.tolist())) == 4 for row in keep)
    mask = torch.ones(50, 16).scatter(1, keep, 0.0)
    assert torch.equal(mask.sum(1), torch.full((50,), 12.0))
    assert len({tuple(sorted(row.tolist())) for row in keep}) > 40  # a fresh draw per image


def test_uniform_sampling_keeps_one_patch_per_two_by_two_block():
    keep = uniform_keep_indices(200, 8, 8, torch.Generator().manual_seed(0))
    rows, cols = keep // 8, keep % 8
    blocks = (rows // 2) * 4 + cols // 2
    assert torch.equal(blocks, torch.arange(16).expand(200, -1))
    # The kept corners come from a pool with 8 of each corner: never more than 8 alike per image
    # (independent draws would exceed 8 in about 1 image in 30, so in some of 200 images).
    corners = (rows % 2) * 2 + cols % 2
    counts = torch.stack([(corners == c).sum(1) for c in range(4)], 1)
    assert counts.max() <= 8 and len(set(corners[:, 0].tolist())) == 4


def test_uniform_masking_then_secondary_masking_of_a_quarter_of_the_kept_patches():
    mae = build_mae(masking="uniform")
    keep, replaced = mae.sample_masks(20, torch.Generator().manual_seed(1))
    assert keep.shape == (20, 4)  # one per 2x2 block of the 4x4 grid
    assert torch.equal(((keep // 4) // 2) * 2 + (keep % 4) // 2, torch.arange(4).expand(20, -1))
    assert torch.equal(replaced.sum(1), torch.ones(20, dtype=torch.long))  # 25% of 4


def _patch_pixels(images: torch.Tensor, index: int) -> tuple[slice, slice]:
    row, col = divmod(index, 4)
    return slice(4 * row, 4 * row + 4), slice(4 * col, 4 * col + 4)


@pytest.mark.parametrize("masking", ["random", "uniform"])
def test_the_encoder_never_sees_masked_patches(masking):
    mae = build_mae(masking=masking)
    images = torch.rand(2, 3, 16, 16)
    keep, replaced = mae.sample_masks(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        latent = mae.encode_visible(images, keep, replaced)
        changed = images.clone()
        for b in range(2):
            seen = {int(i) for i, r in zip(keep[b], replaced[b] if replaced is not None else [False] * 4) if not r}
            for index in set(range(16)) - seen:  # masked, or replaced by the secondary mask token
                ys, xs = _patch_pixels(images, index)
                changed[b, :, ys, xs] = torch.rand(3, 4, 4)
        assert torch.equal(latent, mae.encode_visible(changed, keep, replaced))
        ys, xs = _patch_pixels(images, min(seen))
        changed[1, :, ys, xs] = 0.0  # a patch the encoder does see
        assert not torch.allclose(latent, mae.encode_visible(changed, keep, replaced))


def test_mae_loss_by_hand():
    prediction = torch.tensor([[[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]])
    target = torch.tensor([[[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 is visible: not in the loss
    # Raw pixels: patch 0 ((0-1)^2 + (0-3)^2) / 2 = 5, patch 2 ((2-0)^2 + (0-4)^2) / 2 = 10.
    assert mae_loss(prediction, target, mask, norm_pix=False).item() == pytest.approx(7.5)
    # Per-patch normalised: patch 0 has mean 2, unbiased var 2 -> [-1, 1] / sqrt(2 + 1e-6), error 1/(2+1e-6);
    # patch 2 has mean 2, var 8 -> [-2, 2] / sqrt(8 + 1e-6): ((2 + 2/s)^2 + (2/s)^2) / 2.
    s0, s2 = math.sqrt(2 + 1e-6), math.sqrt(8 + 1e-6)
    expected = ((1 / s0**2 + 1 / s0**2) / 2 + ((2 + 2 / s2) ** 2 + (2 / s2) ** 2) / 2) / 2
    assert mae_loss(prediction, target, mask, norm_pix=True).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("masking", ["random", "uniform"])
def test_mae_training_lowers_the_loss_and_exports_the_vit(tmp_path, small_scenes, masking):
    result = pretrain("mae", small_scenes, RunConfig(out=tmp_path, progress=False), backbone=NANO_16,
                      options={"masking": masking}, train={"epochs": 3, "batch_size": 32, "lr": 2e-3})
    assert result.epoch_losses[-1] < result.epoch_losses[0] - 0.2  # about 1.3 -> 0.9
    encoder, meta = load_encoder(tmp_path)
    assert meta["method"] == "mae" and meta["spec"]["backbone"] == "vit"
    assert meta["train"]["optimizer"] == "adamw" and list(meta["train"]["betas"]) == [0.9, 0.95]
    assert meta["train"]["lr"] == 2e-3 and meta["train"]["warmup_epochs"] == pytest.approx(0.15)
    assert encoder(torch.rand(2, 3, 16, 16)).maps[4].shape == (2, 64, 4, 4)


@pytest.mark.parametrize("masking", ["random", "uniform"])
def test_mae_step_under_bf16_autocast_reaches_both_mask_tokens(masking):
    # GPU runs use bf16 autocast: the decoder's linear outputs are bf16 while the mask token is float32.
    mae = build_mae(masking=masking)
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = mae.training_loss(images, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item()) and mae.decoder.mask_token.grad.abs().sum() > 0
    if masking == "uniform":
        assert mae.visible_mask_token.grad.abs().sum() > 0


def test_mae_learning_rate_scales_with_the_batch():
    derived = MAE.derived_train_defaults(MAE.default_backbone, TrainConfig(batch_size=512, epochs=100))
    assert derived == {"lr": pytest.approx(3e-4), "warmup_epochs": pytest.approx(5.0)}
    assert METHODS["mae"] is MAE


@pytest.mark.parametrize("options,message", [
    ({"masking": "block"}, "masking"),
    ({"masking": "uniform", "mask_ratio": 0.6}, "mask_ratio"),
    ({"mask_ratio": 0.99}, "visible"),
    ({"secondary_mask_ratio": 1.0}, "secondary_mask_ratio"),
    ({"decoder_dim": 30}, "decoder_dim"),
])
def test_bad_mae_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        build_mae(**options)


def test_mae_needs_a_vit():
    with pytest.raises(ConfigError, match="ViT backbone"):
        MAE(backbone_spec("resnet18", 0.125), MAEOptions(), TrainConfig(), image_size=16, steps_per_epoch=1)


@torch.no_grad()
def test_the_encoder_pools_the_patch_mean_unless_the_spec_chooses():
    # MAE's loss is on the patch tokens only: its encoder reads their mean (the official fine-tuning's global_pool).
    encoder = build_mae().encoder
    images = torch.rand(2, 3, 16, 16)
    assert encoder.spec["pool"] == "mean"
    assert torch.allclose(encoder(images).pooled, encoder.forward_tokens(images)[:, 1:].mean(1))
    torch.manual_seed(0)
    chosen = MAE({**NANO_16, "pool": "cls"}, MAEOptions(), TrainConfig(), image_size=16, steps_per_epoch=1).encoder.eval()
    assert chosen.spec["pool"] == "cls" and torch.allclose(chosen(images).pooled, chosen.forward_tokens(images)[:, 0])
