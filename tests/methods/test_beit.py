"""BEiT with palette tokens: block-wise masks, the loss by hand and on masked patches only, the mask token
at the ViT's input, training, export, bad options and the CLI."""

import json
import math
import random
import sys

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sslbench.backbones import backbone_spec
from sslbench.backbones.palette import ColourPalette
from sslbench.cli import main
from sslbench.engine import LAST_CHECKPOINT, RunConfig, pretrain
from sslbench.errors import ConfigError
from sslbench.evaluation import checkpoint_subject
from sslbench.methods import METHODS, TrainConfig
from sslbench.methods.beit import BEiTPalette, BEiTPaletteOptions, palette_token_loss
from sslbench.methods.masking import BlockwiseMasking

NANO_16 = backbone_spec("vit-nano", image_size=16)  # patch 4: a 4x4 grid of 16 patches, 6 of them masked
TINY = {"palette_size": 16, "palette_pixels": 2048, "palette_iterations": 5}


def build_beit(**options) -> BEiTPalette:
    torch.manual_seed(0)
    method = BEiTPalette(NANO_16, BEiTPaletteOptions(**{**TINY, **options}), TrainConfig(), image_size=16, steps_per_epoch=1)
    method.initialise_from_data(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8), torch.Generator().manual_seed(0))
    return method.eval()


def _cells(block):
    return {(r, c) for r in range(block.top, block.top + block.height) for c in range(block.left, block.left + block.width)}


def test_block_masks_cover_exactly_the_target_with_blocks_inside_the_grid():
    masking = BlockwiseMasking(8, 8, 26, min_block_patches=5)  # 40% of an 8x8 grid; BEiT's 16/196 scaled
    rng = random.Random(0)
    shapes, top_ups = set(), 0
    for _ in range(300):
        mask, blocks = masking.sample(rng)
        assert sum(mask) == 26 and blocks
        masked = {divmod(i, 8) for i, value in enumerate(mask) if value}
        for block in blocks:
            assert 0 <= block.top <= block.top + block.height <= 8 and 0 <= block.left <= block.left + block.width <= 8
            # Sides are round(sqrt(s r)) x round(sqrt(s / r)) with r in [0.3, 1/0.3]: within rounding of those bounds.
            assert (block.height + 0.5) / (block.width - 0.5) >= 0.3 and (block.height - 0.5) / (block.width + 0.5) <= 1 / 0.3
            assert _cells(block) <= masked
            shapes.add((block.height, block.width))
        top_ups += len(masked - set().union(*map(_cells, blocks)))
    assert any(h > w for h, w in shapes) and any(h < w for h, w in shapes) and any(h == w for h, w in shapes)
    assert top_ups / 300 < 0.5  # measured 0.07: nearly all patches come from whole blocks


@pytest.mark.parametrize("grid,num_masked,min_block", [(14, 78, 16), (14, 75, 16), (4, 6, 1), (5, 10, 30), (3, 9, 1)])
def test_every_image_has_exactly_the_target_count(grid, num_masked, min_block):
    # (14, 75, 16) is BEiT's ImageNet setting, where the official generator often stops a few patches short;
    # with min_block 30 on a 5x5 grid hardly any block fits, so the top-up does most of the work.
    masks = BlockwiseMasking(grid, grid, num_masked, min_block)(64, torch.Generator().manual_seed(0))
    assert masks.shape == (64, grid * grid) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(1), torch.full((64,), num_masked))


def test_block_masks_are_seeded_blocky_and_drawn_afresh_per_image():
    masking = BlockwiseMasking(8, 8, 26, min_block_patches=5)
    masks = masking(200, torch.Generator().manual_seed(3))
    assert torch.equal(masks, masking(200, torch.Generator().manual_seed(3)))
    assert not torch.equal(masks, masking(200, torch.Generator().manual_seed(4)))
    assert len({tuple(row.tolist()) for row in masks}) > 190
    # Masked neighbours: blocks make many more adjacent masked pairs than 26 patches masked at random
    # (112 adjacent pairs x 26/64 x 25/63 = 18 expected).
    grid = masks.view(200, 8, 8)
    pairs = (grid[:, 1:] & grid[:, :-1]).sum((1, 2)) + (grid[:, :, 1:] & grid[:, :, :-1]).sum((1, 2))
    assert pairs.float().mean() > 1.5 * 112 * 26 / 64 * 25 / 63


def test_impossible_block_masking_is_a_config_error():
    with pytest.raises(ConfigError, match="between 1 and 16 patches"):
        BlockwiseMasking(4, 4, 17, 1)
    with pytest.raises(ConfigError, match="min_block_patches=0"):
        BlockwiseMasking(4, 4, 6, 0)


def _cross_entropy(row, target):
    return -row[target] + math.log(sum(math.exp(v) for v in row))


def test_palette_token_loss_by_hand():
    # Two images, one masked patch each, two pixels per patch, three palette colours.
    logits = torch.tensor([[[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], [[[0.5, 0.5, -1.0], [3.0, 0.0, 1.0]]]])
    targets = torch.tensor([[[0, 2]], [[1, 0]]])
    # By hand: 0.2395, 1.5514, 0.7990 and 0.1698 nats; the mean runs over all four pixels.
    expected = (_cross_entropy([2, 0, 0], 0) + _cross_entropy([0, 1, 0], 2)
                + _cross_entropy([0.5, 0.5, -1], 1) + _cross_entropy([3, 0, 1], 0)) / 4
    assert palette_token_loss(logits, targets).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.6899, abs=1e-4)


@torch.no_grad()
def test_the_loss_reads_only_the_masked_patches():
    method = build_beit()
    masked = method.masking(2, torch.Generator().manual_seed(0))
    indices = masked.nonzero()[:, 1].view(2, -1)
    outputs, tokens = torch.randn(2, 16, 64), torch.randint(0, 16, (2, 16, 16))
    loss = method.masked_prediction_loss(outputs, tokens, indices)
    changed_outputs, changed_tokens = outputs.clone(), tokens.clone()
    changed_outputs[~masked] = torch.randn(int((~masked).sum()), 64)
    changed_tokens[~masked] = (changed_tokens[~masked] + 1) % 16
    assert torch.equal(method.masked_prediction_loss(changed_outputs, changed_tokens, indices), loss)
    changed_outputs[masked] += 1.0
    assert not torch.allclose(method.masked_prediction_loss(changed_outputs, tokens, indices), loss)


@torch.no_grad()
def test_patch_targets_are_the_palette_token_of_each_patch_mean_colour():
    method = build_beit(target="patches", palette_size=4)
    assert method.head.out_features == 4 and method.tokens_per_side == 1
    method.palette.colours.copy_(torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]))
    images = torch.zeros(1, 3, 16, 16)
    images[0, 0, :4, :2] = 1.0  # patch (0, 0): left half red, right half green; mean (0.5, 0.5, 0)
    images[0, 1, :4, 2:4] = 1.0
    images[0, 0, :4, 4:8] = 1.0  # patch (0, 1): all red
    images[0, 1, 12:, 12:] = 0.9  # patch (3, 3): nearly green
    tokens = method.target_tokens(images)
    expected = torch.zeros(16, dtype=torch.long)
    expected[0], expected[1], expected[15] = 3, 1, 2  # the blend's colour, red, green; black elsewhere
    assert tokens.shape == (1, 16, 1) and torch.equal(tokens[0, :, 0], expected)
    # Per-pixel targets of the same image keep both colours of patch (0, 0), row by row.
    per_pixel = build_beit(target="pixels", palette_size=4)
    per_pixel.palette.colours.copy_(method.palette.colours)
    pixels = per_pixel.target_tokens(images)
    assert pixels.shape == (1, 16, 16) and pixels[0, 0].tolist() == [1, 1, 2, 2] * 4


def test_the_patch_palette_is_fitted_on_patch_means():
    # Images whose pixels are black or white in a checkerboard finer than the patch: every patch mean is grey.
    board = (torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)) % 2
    images = (board * 255).to(torch.uint8).expand(8, 3, 16, 16).contiguous()
    method = BEiTPalette(NANO_16, BEiTPaletteOptions(**{**TINY, "target": "patches", "palette_size": 2}), TrainConfig(),
                         image_size=16, steps_per_epoch=1)
    method.initialise_from_data(images, torch.Generator().manual_seed(0))
    assert torch.allclose(method.palette.colours, torch.full((2, 3), 0.5), atol=1e-6)


@torch.no_grad()
def test_code_targets_name_a_patch_by_its_structure_not_its_colour_or_contrast():
    method = build_beit(target="codes", palette_size=3)
    assert method.head.out_features == 3 and method.palette.colours.shape == (3, 48)
    # Three codes: a flat patch, a vertical edge (left half dark), a horizontal edge (top half dark), as the
    # standardised vectors of 4x4 RGB patches (values in (row, column, channel) order, as patchify lays them out).
    vertical = torch.zeros(3, 4, 4)
    vertical[:, :, 2:] = 1.0
    horizontal = vertical.transpose(1, 2)
    shapes = torch.stack([vertical, horizontal]).permute(0, 2, 3, 1).flatten(1)
    method.palette.colours.copy_(torch.cat([torch.zeros(1, 48), (shapes - 0.5) / shapes.var(1, keepdim=True).sqrt()]))
    images = torch.full((1, 3, 16, 16), 0.3)
    images[0, :, 0:4, 2:4] = 0.9  # patch (0, 0): a grey vertical edge
    images[0, :, 0:4, 6:8] = torch.tensor([0.5, 0.4, 0.45])[:, None, None]  # patch (0, 1): a fainter, tinted one
    images[0, :, 4:6, 8:12] = 0.1  # patch (1, 2): a dark top over light grey, a horizontal edge
    images[0, :, 12:16, 12:16] = torch.rand(3, 4, 4) * 0.01  # patch (3, 3): dark, with noise below 3 grey levels
    tokens = method.target_tokens(images)
    expected = torch.zeros(16, dtype=torch.long)
    expected[0], expected[1], expected[6] = 1, 1, 2  # the same token at any colour or contrast; flat patches 0
    assert tokens.shape == (1, 16, 1) and torch.equal(tokens[0, :, 0], expected)


def test_the_code_palette_is_fitted_on_standardised_patches():
    # Every patch of every image holds one of two shapes (a vertical or a horizontal edge) at a random colour and
    # contrast: the codebook is those two shapes, standardised, whatever the colours.
    generator = torch.Generator().manual_seed(0)
    edge = torch.zeros(4, 4)
    edge[:, 2:] = 1.0
    kinds = torch.randint(0, 2, (8, 4, 4), generator=generator)
    low = torch.rand(8, 3, 4, 4, generator=generator) * 0.4
    high = low + 0.2 + torch.rand(8, 3, 4, 4, generator=generator) * 0.4
    shape = torch.where(kinds.bool()[..., None, None], edge.t(), edge)  # (8, 4, 4, 4, 4): image, patch row/col, pixel
    values = low[..., None, None] + (high - low)[..., None, None] * shape.unsqueeze(1)
    images = (values.permute(0, 1, 2, 4, 3, 5).reshape(8, 3, 16, 16) * 255).round().to(torch.uint8)
    method = BEiTPalette(NANO_16, BEiTPaletteOptions(**{**TINY, "target": "codes", "palette_size": 2}), TrainConfig(),
                         image_size=16, steps_per_epoch=1)
    method.initialise_from_data(images, torch.Generator().manual_seed(0))
    # Each code is one edge in every channel: above the patch mean where the edge is bright, below it elsewhere.
    signs = {tuple(code.sign().flatten().tolist()) for code in method.palette.colours.view(2, 4, 4, 3)}
    assert signs == {tuple((shape * 2 - 1)[..., None].expand(4, 4, 3).flatten().tolist()) for shape in (edge, edge.t())}
    assert method.export_meta()["tokenizer"] == "k-means codebook of 2 standardised 4x4 patches, not a dVAE"


@torch.no_grad()
def test_the_vit_sees_the_mask_token_at_masked_patches_not_their_pixels():
    method = build_beit()
    images = torch.rand(2, 3, 16, 16)
    masked = method.masking(2, torch.Generator().manual_seed(1))
    # At the input, a masked patch is the mask token plus its position; a visible one its embedded pixels.
    embedded = method.encoder.embed(images, masked, method.mask_token)
    positions = method.encoder.patch_positions(4, 4).expand(2, -1, -1)
    assert torch.allclose(embedded[masked], (method.mask_token + positions)[masked])
    assert torch.allclose(embedded[~masked], method.encoder.embed(images)[~masked])
    outputs = method.encode_masked(images, masked)
    changed = images.clone()
    grid = masked.view(2, 4, 4).repeat_interleave(4, 1).repeat_interleave(4, 2)
    changed[grid.unsqueeze(1).expand(-1, 3, -1, -1)] = 0.5  # every pixel of every masked patch
    assert torch.equal(method.encode_masked(changed, masked), outputs)
    changed[~grid.unsqueeze(1).expand(-1, 3, -1, -1)] = 0.5  # now the visible pixels too
    assert not torch.allclose(method.encode_masked(changed, masked), outputs)


def test_training_lowers_the_loss_and_exports_the_vit(tmp_path, small_scenes):
    out = tmp_path / "beit"
    result = pretrain("beit_palette", small_scenes, RunConfig(out=out, progress=False), backbone=NANO_16, options=TINY,
                      train={"epochs": 24, "batch_size": 32, "lr": 1e-2})
    assert result.epoch_losses[0] < math.log(16) + 0.1  # a near-uniform head starts close to chance
    # A head that ignored the context could at best learn how often each colour occurs (2.21 nats on these
    # scenes, mostly near-grey ground); reading the visible patches gets below that (measured: 2.77 -> about
    # 2.05 over the last epochs of 24, i.e. 48 steps; the epoch losses jitter by about 0.1).
    state = torch.load(out / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]
    palette = ColourPalette(16)
    palette.load_state_dict({"colours": state["palette.colours"], "fitted": state["palette.fitted"]})
    tokens = palette.quantize(small_scenes.float() / 255)
    frequencies = torch.bincount(tokens.flatten(), minlength=16) / tokens.numel()
    marginal_entropy = -(frequencies * frequencies.clamp(min=1e-12).log()).sum().item()
    assert sum(result.epoch_losses[-4:]) / 4 < marginal_entropy - 0.1
    subject = checkpoint_subject(out)
    assert subject.method == "beit_palette[k=16]" and subject.epochs == 24
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["spec"]["backbone"] == "vit" and "not a dVAE" in meta["tokenizer"]
    assert meta["train"]["optimizer"] == "adamw" and list(meta["train"]["betas"]) == [0.9, 0.98]
    features = subject.encoder(torch.rand(2, 3, 16, 16))
    assert features.pooled.shape == (2, 64) and features.maps[4].shape == (2, 64, 4, 4)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path, small_scenes):
    # The palette comes back from the checkpoint and the masks are drawn from the per-step generator, so
    # 1 + 1 epochs give exactly the weights, mask token, head and palette of 2 epochs.
    class StopAfterOneEpoch(Callback):  # as a killed job would, with its schedule still planned for 2 epochs
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    def run(name, resume=False, callbacks=None):
        pretrain("beit_palette", small_scenes, RunConfig(out=tmp_path / name, progress=False, resume=resume),
                 backbone=NANO_16, options=TINY, train={"epochs": 2, "batch_size": 32, "lr": 1e-2}, callbacks=callbacks)
        return torch.load(tmp_path / name / LAST_CHECKPOINT, map_location="cpu", weights_only=False)["state_dict"]

    straight = run("straight")
    assert not torch.equal(run("split", callbacks=[StopAfterOneEpoch()])["mask_token"], straight["mask_token"])
    split = run("split", resume=True)
    assert straight.keys() == split.keys() and "palette.colours" in straight and "mask_token" in straight
    for key, value in straight.items():
        assert torch.allclose(value.float(), split[key].float(), atol=1e-6), key


def test_a_step_under_bf16_autocast_trains_the_mask_token_and_head():
    method = build_beit().train()
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method.training_loss(images, torch.Generator().manual_seed(0))
    loss.backward()
    assert math.isfinite(loss.item())
    assert method.mask_token.grad.abs().sum() > 0 and method.head.weight.grad.abs().sum() > 0


def test_defaults_follow_beit_scaled_to_the_batch():
    derived = BEiTPalette.derived_train_defaults(BEiTPalette.default_backbone, TrainConfig(batch_size=256, epochs=400))
    assert derived == {"lr": pytest.approx(1.875e-4), "warmup_epochs": pytest.approx(5.0)}
    assert METHODS["beit_palette"] is BEiTPalette
    method = BEiTPalette(dict(BEiTPalette.default_backbone), BEiTPaletteOptions(), TrainConfig(), image_size=32,
                         steps_per_epoch=1)
    assert method.masking.num_masked == 26 and method.masking.min_block_patches == 5  # 40% and 16/196 of 8x8
    assert method.head.out_features == 16 * 512 and method.encoder.spec["drop_path"] == 0.1


@pytest.mark.parametrize("options,backbone,message", [
    ({"mask_ratio": 0.0}, None, "mask_ratio=0.0 is out of range"),
    ({"mask_ratio": 0.99}, None, "masks 16 of 16 patches"),
    ({"min_block_patches": 0}, None, "min_block_patches=0 is out of range"),
    ({"palette_pixels": 8}, None, "palette_pixels=8 is out of range"),
    ({"target": "dvae"}, None, "target='dvae' is not allowed"),
    ({}, backbone_spec("resnet18", 0.125), "beit_palette needs a ViT backbone"),
])
def test_bad_options_are_config_errors(options, backbone, message):
    with pytest.raises(ConfigError, match=message):
        BEiTPalette(backbone or NANO_16, BEiTPaletteOptions(**{**TINY, **options}), TrainConfig(), image_size=16,
                    steps_per_epoch=1)


def test_cli_pretrains_beit_palette(monkeypatch, capsys, tmp_path):
    out = tmp_path / "cli"
    sets = [f"{key}={value}" for key, value in TINY.items()]
    argv = ["sslbench", "pretrain", "--method", "beit_palette", "--backbone", "vit-nano", "--limit", "64",
            "--image-size", "16", "--epochs", "1", "--batch-size", "32", "--out", str(out),
            *[arg for pair in sets for arg in ("--set", pair)]]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert "beit_palette: 1 epochs this run" in capsys.readouterr().out
    meta = json.loads((out / "encoder.json").read_text())
    assert meta["label"] == "beit_palette[k=16]" and meta["spec"]["backbone"] == "vit"
