import math

import torch

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
