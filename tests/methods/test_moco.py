import copy
import math

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from sslbench.engine import RunConfig, load_encoder, pretrain
from sslbench.methods.moco import infonce_loss

RESNET = {"backbone": "resnet18", "width": 0.125, "stem": "cifar"}


def _hand_infonce(q, k, queue, tau):
    """InfoNCE with explicit loops over queries and the queue, in plain Python floats."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    total = 0.0
    for qi, ki in zip(q, k):
        qi, ki = unit(qi), unit(ki)
        positive = sum(a * b for a, b in zip(qi, ki)) / tau
        negatives = [sum(a * b for a, b in zip(qi, n)) / tau for n in queue]
        total += -positive + math.log(math.exp(positive) + sum(math.exp(s) for s in negatives))
    return total / len(q)


def test_infonce_matches_hand_computation_with_a_two_key_queue():
    q = [[1.0, 0.0, 0.0], [0.3, 0.4, 0.5]]
    k = [[0.8, 0.6, 0.0], [0.0, 1.0, 1.0]]
    queue = [[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]]  # unit vectors, as the queue stores them
    got = infonce_loss(torch.tensor(q), torch.tensor(k), torch.tensor(queue), 0.2)
    assert abs(got.item() - _hand_infonce(q, k, queue, 0.2)) < 1e-5


def test_infonce_is_low_when_the_key_matches_and_the_queue_does_not():
    q = torch.eye(3)[:2]
    queue = torch.eye(3)[2:]
    assert infonce_loss(q, q * 2, queue, 0.1).item() < 1e-3
    assert infonce_loss(q, torch.eye(3)[[2, 2]], queue, 0.1).item() > 0.69  # positive = a negative: log 2


class _FixedBatchLoss(Callback):
    """MoCo's loss on one fixed batch against a full queue of real keys, at the start and at the end of training.

    Queries: the first 32 images in views drawn by a fixed generator; positives: the keys of their other
    views; queue: the keys the same model makes of both views of the next 32 images (64 keys, a full
    training queue). BatchNorm runs in training mode as in a step, and the module's state (its BN
    statistics) is put back afterwards, so measuring does not change the training run.
    """

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.losses: list[float] = []

    def on_train_start(self, trainer, module):
        self.losses.append(self.measure(module))

    def on_train_end(self, trainer, module):
        self.losses.append(self.measure(module))

    def measure(self, module) -> float:
        state, was_training = copy.deepcopy(module.state_dict()), module.training
        module.train()
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            v1, v2 = module.views(self.images[:32], generator)
            queries = module._queries(torch.cat([v1, v2]))[:32]
            keys = module._keys(torch.cat([v1, v2]), generator)[32:]
            queue = module._keys(torch.cat(module.views(self.images[32:64], generator)), generator)
        module.load_state_dict(state)
        module.train(was_training)
        return infonce_loss(queries, keys, queue, module.options.temperature).item()


def test_moco_training_lowers_the_loss_of_a_fixed_batch_against_a_full_queue(tmp_path, small_scenes):
    # The per-epoch training loss is no measure of progress over a few steps: the queue starts with
    # random unit vectors (easy negatives), so the loss rises while real keys replace them, and it moves
    # with each step's views by more than a short run changes it (at lr 0 it went 4.36, 4.55, 4.34).
    # The same batch against a full queue of the model's own keys, before and after training, has no
    # warm-up and no view noise: 4.65 -> 4.08 here (it stays exactly equal at lr 0). At this scale the
    # drop comes mostly from spreading the random network's bunched embeddings over the sphere.
    record = _FixedBatchLoss(small_scenes)
    pretrain("moco", small_scenes, RunConfig(out=tmp_path, progress=False), backbone=RESNET,
             options={"queue_size": 64, "projection_hidden": 256, "temperature": 0.1},
             train={"epochs": 6, "batch_size": 32, "lr": 0.1}, callbacks=[record])
    before, after = record.losses
    assert after < before - 0.25
    encoder, meta = load_encoder(tmp_path)
    assert meta["method"] == "moco" and encoder(torch.rand(2, 3, 16, 16)).pooled.shape == (2, 64)


def test_moco_views_follow_the_crop_and_jitter_options():
    from sslbench.methods import MoCo, TrainConfig

    def views(**options):
        method = MoCo({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, MoCo.Options(**options), TrainConfig(),
                      image_size=16, steps_per_epoch=2)
        return method.views.views

    default = views()
    assert len(default) == 2 and all(v.crop_scale == (0.2, 1.0) for v in default)
    assert (default[0].brightness, default[0].contrast, default[0].saturation, default[0].hue) == (0.4, 0.4, 0.4, 0.1)
    simclr = views(crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2))
    assert all(v.crop_scale == (0.08, 1.0) and (v.brightness, v.hue) == (0.8, 0.2) for v in simclr)


def test_moco_rejects_more_bn_splits_than_the_batch_can_fill():
    from sslbench.errors import ConfigError
    from sslbench.methods import MoCo, TrainConfig

    with pytest.raises(ConfigError, match="bn_splits=8.*batch_size=8; use --set bn_splits=4"):
        MoCo({"backbone": "resnet18", "width": 0.125, "stem": "cifar"}, MoCo.Options(bn_splits=8), TrainConfig(batch_size=8),
             image_size=16, steps_per_epoch=2)
    with pytest.raises(ConfigError, match="bn_splits"):
        MoCo.Options(bn_splits=0)
