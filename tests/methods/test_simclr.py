import math

import torch

from sslbench.methods.simclr import ntxent_loss


def _hand_ntxent(z1, z2, tau):
    """Loop-by-loop NT-Xent (SimCLR eq. 1) over the 2N views, in plain Python floats."""
    views = [v / math.sqrt(sum(x * x for x in v)) for v in [*z1, *z2]]
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        sims = {j: sum(a * b for a, b in zip(views[i], views[j])) / tau for j in range(2 * n) if j != i}
        total += -sims[partner] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * n)


def test_ntxent_matches_hand_computation():
    z1 = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    z2 = [[0.9, 0.1, 0.2], [0.0, 1.0, 0.3]]
    expected = _hand_ntxent(torch.tensor(z1), torch.tensor(z2), 0.5)
    got = ntxent_loss(torch.tensor(z1), torch.tensor(z2), 0.5)
    assert abs(got.item() - float(expected)) < 1e-5
    # A concrete value, computed once by the loop above, pins the formula itself.
    assert abs(got.item() - 0.7073) < 1e-3


def test_ntxent_is_low_for_aligned_pairs_and_scale_invariant():
    z = torch.eye(4)
    aligned = ntxent_loss(z, z * 3.0, 0.1)
    shuffled = ntxent_loss(z, z[[1, 0, 3, 2]], 0.1)
    assert aligned.item() < 0.01 < shuffled.item()


def test_ntxent_gradient_flows_to_both_views():
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16, requires_grad=True)
    ntxent_loss(z1, z2, 0.5).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0
