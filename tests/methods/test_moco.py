import math

import torch

from sslbench.methods.moco import infonce_loss


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


def test_moco_training_lowers_the_loss(train_and_reload):
    # The queue starts with random unit vectors (easy negatives), so the loss first rises while real
    # keys replace them; queue 64 = one step of keys, so from the second epoch on the loss must fall.
    losses = train_and_reload("moco", 4, {"queue_size": 64, "projection_hidden": 256}, lr=0.1)
    assert losses[-1] < losses[1]
