import math

import torch

from sslbench.methods.dino import dino_loss, update_center


def test_dino_loss_on_two_by_two_toy_outputs():
    student = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    teacher = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])]
    center = torch.tensor([1.0, 0.0])
    ts, tt = 0.5, 0.25

    def softmax(v, t):
        e = [math.exp(x / t) for x in v]
        return [x / sum(e) for x in e]

    # Teacher 0 (centred [1, 0]) teaches student view 1, teacher 1 (centred [-1, 0]) teaches student view 0.
    p0, p1 = softmax([1.0, 0.0], tt), softmax([-1.0, 0.0], tt)
    s0, s1 = softmax([1.0, 0.0], ts), softmax([0.0, 1.0], ts)
    expected = (-sum(a * math.log(b) for a, b in zip(p0, s1)) - sum(a * math.log(b) for a, b in zip(p1, s0))) / 2
    assert abs(dino_loss(student, teacher, center, ts, tt).item() - expected) < 1e-5


def test_dino_center_update_by_hand():
    center = torch.tensor([1.0, -1.0])
    teacher = torch.tensor([[0.0, 2.0], [4.0, 0.0]])  # batch mean [2, 1]
    new = update_center(center, teacher, 0.9)
    assert torch.allclose(new, torch.tensor([0.9 + 0.2, -0.9 + 0.1]))


def test_dino_training_lowers_the_loss(train_and_reload):
    # Eight steps are too few for a 0.996 teacher to move, and the temperature warm-up raises the loss
    # by itself; a fast teacher at a fixed temperature shows the student following it.
    options = {"hidden": 128, "bottleneck": 32, "prototypes": 64, "warmup_teacher_epochs": 0.0, "momentum_start": 0.9}
    losses = train_and_reload("dino", 4, options)
    assert losses[-1] < losses[0] - 0.5
