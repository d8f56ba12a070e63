import math

import torch

from sslbench.methods.byol import byol_loss


def test_byol_loss_is_two_minus_two_cosine():
    p = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[1.0, 1.0], [-3.0, -4.0]])
    # Row 0: cos 45 degrees; row 1: opposite vectors, cos -1.
    expected = ((2 - 2 / math.sqrt(2)) + (2 + 2)) / 2
    assert abs(byol_loss(p, z).item() - expected) < 1e-6
    assert byol_loss(z, 5 * z).item() < 1e-6


def test_byol_training_lowers_the_loss(train_and_reload):
    losses = train_and_reload("byol", 3, {"projection_hidden": 256, "prediction_hidden": 256, "projection_dim": 64})
    assert losses[-1] < losses[0] - 0.2


def test_byol_trains_with_lars(train_and_reload):
    # solo-learn's BYOL recipe: LARS at lr 1.0 (plain SGD at that lr diverges).
    losses = train_and_reload("byol", 3, {"projection_hidden": 256, "prediction_hidden": 256, "projection_dim": 64},
                              optimizer="lars", lr=1.0)
    assert losses[-1] < losses[0] - 0.2
