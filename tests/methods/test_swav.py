import math

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from sslbench.engine import RunConfig, pretrain
from sslbench.methods.swav import swav_loss


def test_swav_loss_is_swapped_cross_entropy_by_hand():
    s = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[0.5, 0.5]])]
    codes = [torch.tensor([[0.75, 0.25]]), torch.tensor([[0.1, 0.9]])]
    tau = 0.5

    def ce(q, scores):
        logits = [x / tau for x in scores]
        log_z = math.log(sum(math.exp(x) for x in logits))
        return -sum(qk * (lk - log_z) for qk, lk in zip(q, logits))

    flat = [x[0].tolist() for x in s]
    q0, q1 = codes[0][0].tolist(), codes[1][0].tolist()
    expected = ((ce(q0, flat[1]) + ce(q0, flat[2])) / 2 + (ce(q1, flat[0]) + ce(q1, flat[2])) / 2) / 2
    assert abs(swav_loss(s, codes, tau).item() - expected) < 1e-6


def test_swav_training_lowers_the_loss(train_and_reload):
    options = {"projection_hidden": 256, "projection_dim": 32, "prototypes": 64, "freeze_prototypes_epochs": 1}
    losses = train_and_reload("swav", 4, options)
    assert losses[-1] < losses[0] - 0.05


def test_swav_with_a_queue_trains(train_and_reload):
    options = {"projection_hidden": 64, "projection_dim": 16, "prototypes": 16, "local_views": 0, "queue_size": 32}
    losses = train_and_reload("swav", 2, options)
    assert all(math.isfinite(x) for x in losses)


class _RecordPrototypes(Callback):
    def __init__(self) -> None:
        self.weights: list[torch.Tensor] = []

    def on_train_start(self, trainer, module):
        self.weights.append(module.prototypes.weight.detach().clone())

    def on_train_epoch_end(self, trainer, module):
        self.weights.append(module.prototypes.weight.detach().clone())


def test_swav_prototypes_are_frozen_during_the_first_epoch(tmp_path, small_scenes):
    record = _RecordPrototypes()
    options = {"projection_hidden": 64, "projection_dim": 16, "prototypes": 16, "local_views": 0}
    pretrain("swav", small_scenes, RunConfig(out=tmp_path, progress=False), backbone={"backbone": "resnet18", "width": 0.125},
             options=options, train={"epochs": 2, "batch_size": 32}, callbacks=[record])
    start, after_first, after_second = record.weights
    # Every step re-normalises the prototypes to unit rows (official code); during epoch 0 that is all
    # that happens to them: no gradient step, no weight decay.
    assert torch.allclose(after_first, F.normalize(start, dim=1), atol=1e-6)
    assert (after_second - after_first).abs().max() > 1e-4
