"""Fine-tuning: the caller's encoder stays untouched, its copy learns, views keep targets aligned."""

import pytest
import torch
import torch.nn.functional as F

from sslbench.backbones import build_encoder
from sslbench.tasks import TASKS, ProbeConfig
from sslbench.tasks import finetune as finetune_module
from sslbench.tasks.finetune import crop_flip_augment, finetune, flip_augment
from sslbench.tasks.heads import linear_task_head

CONFIG = ProbeConfig(epochs=6, batch_size=32, dense_batch_size=16, decoder_width=16, lr=1e-2, knn_k=10)
TINY_RESNET = {"backbone": "resnet18", "width": 0.0625, "stem": "cifar"}  # 4/8/16/32 channels


def _snapshot(module):
    return {name: value.clone() for name, value in module.state_dict().items()}


def test_finetune_trains_a_copy_and_leaves_the_original(data):
    train = data[1].subset(slice(0, 32))
    torch.manual_seed(0)
    encoder = build_encoder(TINY_RESNET).eval()
    before = _snapshot(encoder)
    head = linear_task_head(encoder.pooled_dim, 3)
    tuned = finetune(head, encoder, train, train.targets["class"], F.cross_entropy, crop_flip_augment, ProbeConfig(**{**CONFIG.__dict__, "epochs": 1}))
    assert tuned is not encoder and not tuned.training and not encoder.training
    assert all(torch.equal(value, encoder.state_dict()[name]) for name, value in before.items())
    after = tuned.state_dict()
    assert not torch.equal(after["stem.0.weight"], before["stem.0.weight"])  # the encoder's own lr trained it
    # BatchNorm ran in train mode: its running statistics moved from their initial zeros.
    assert not torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])


def test_encoder_and_head_learning_rates(data, monkeypatch):
    encoder, train, _ = data
    groups = []
    monkeypatch.setattr(finetune_module, "train_loop", lambda parameter_groups, *args: groups.extend(parameter_groups) or 0.0)
    for config, encoder_lr in ((ProbeConfig(lr=0.02), 0.002), (ProbeConfig(lr=0.02, encoder_lr=0.005), 0.005)):
        groups.clear()
        head = linear_task_head(encoder.pooled_dim, 3)
        finetune(head, encoder, train, train.targets["class"], F.cross_entropy, crop_flip_augment, config)
        assert [g["lr"] for g in groups] == [pytest.approx(encoder_lr), 0.02]
        # The frozen encoder is unfrozen in its copy: all 1308 parameters are trained.
        assert sum(p.numel() for p in groups[0]["params"] if p.requires_grad) == encoder.num_parameters
    assert not any(p.requires_grad for p in encoder.parameters())


def test_finetune_classification_beats_chance_and_counts_everything(data):
    encoder, train, test = data
    result = TASKS["classification"]().evaluate(encoder, train, test, "finetune", CONFIG)
    assert result["top1"] > 0.8  # chance: 1/3
    assert result["trainable_params"] == encoder.num_parameters + 24 * 3 + 3
    few = TASKS["classification"]().evaluate(encoder, train, test, "finetune-10pct", CONFIG)
    assert few["trainable_params"] == result["trainable_params"] and few["top1"] > 0.5


def test_finetune_dense_tasks_beat_trivial_predictions(data):
    encoder, train, test = data
    segmentation = TASKS["segmentation"]().evaluate(encoder, train, test, "finetune", ProbeConfig(**{**CONFIG.__dict__, "epochs": 16, "lr": 3e-2}))
    assert segmentation["miou"] > 0.8  # all background: 0.45
    depth = TASKS["depth"]().evaluate(encoder, train, test, "finetune", ProbeConfig(**{**CONFIG.__dict__, "lr": 3e-3}))
    assert depth["delta1"] > 0.9 and depth["abs_rel"] < 0.1


def test_finetune_is_deterministic(data):
    encoder, train, test = data
    config = ProbeConfig(**{**CONFIG.__dict__, "epochs": 2})
    assert TASKS["counting"]().evaluate(encoder, train, test, "finetune", config) == \
        TASKS["counting"]().evaluate(encoder, train, test, "finetune", config)


def test_flip_moves_masks_and_depth_with_their_images():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 5, 7), dtype=torch.uint8, generator=generator)
    mask = (images[:, 0] > 127).long()
    depth = images[:, 1].float() + 1
    views, flipped_mask = flip_augment(images, mask, torch.Generator().manual_seed(1))
    _, flipped_depth = flip_augment(images, depth, torch.Generator().manual_seed(1))
    assert views.dtype == torch.float32 and views.shape == images.shape
    assert torch.equal(flipped_mask, (views[:, 0] > 127 / 255).long())
    assert torch.allclose(flipped_depth, views[:, 1] * 255 + 1)
    flipped = (views != images.float() / 255).flatten(1).any(1)
    assert 0 < int(flipped.sum()) < 16  # about half the images
    counts = torch.arange(16)
    assert torch.equal(flip_augment(images, counts, generator)[1], counts)


def test_classification_views_are_crops_of_the_image_size():
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    views, same = crop_flip_augment(images, labels, torch.Generator().manual_seed(0))
    assert views.shape == (4, 3, 12, 12) and 0 <= views.min() and views.max() <= 1
    assert torch.equal(same, labels)
