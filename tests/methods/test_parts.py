"""Shared method parts: the queue, Sinkhorn-Knopp, EMA/cosine schedules, multi-crop views."""

import math

import torch
from torch import nn

from sslbench.augment import ViewConfig
from sslbench.methods.parts import MLPHead, Queue, ScaleBatchNorm1d, cosine_schedule, ema_update, multicrop_views, sinkhorn, split_batch_forward


def test_queue_is_fifo_wraps_around_and_is_checkpointed():
    queue = Queue(size=4, dim=1, random_init=False)
    assert not queue.is_full
    queue.enqueue(torch.tensor([[1.0], [2.0], [3.0]]))
    assert queue.keys.flatten().tolist() == [1.0, 2.0, 3.0, 0.0] and int(queue.pointer) == 3
    queue.enqueue(torch.tensor([[4.0], [5.0]]))  # 5 overwrites the oldest entry, 1
    assert queue.keys.flatten().tolist() == [5.0, 2.0, 3.0, 4.0] and int(queue.pointer) == 1
    assert queue.is_full
    assert set(queue.state_dict()) == {"keys", "pointer", "count"}


def test_random_queue_starts_full_of_unit_vectors():
    queue = Queue(size=8, dim=5)
    assert queue.is_full and torch.allclose(queue.keys.norm(dim=1), torch.ones(8))


def test_sinkhorn_codes_have_uniform_marginals():
    scores = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    raw = torch.softmax(scores / 0.5, dim=1)
    codes = sinkhorn(scores, epsilon=0.5, iterations=50)
    # After the final (column) normalisation every sample's code sums to exactly 1 ...
    assert torch.allclose(codes.sum(1), torch.ones(6), atol=1e-6)
    # ... and each prototype receives B/K = 2 of the mass (exact only in the limit, which 50 iterations reach),
    # which the plain softmax of the same scores does not.
    assert torch.allclose(codes.sum(0), torch.full((3,), 2.0), atol=1e-3)
    assert not torch.allclose(raw.sum(0), torch.full((3,), 2.0), atol=0.05)
    assert (codes >= 0).all()


def test_sinkhorn_one_iteration_by_hand():
    scores = [[0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]
    eps = 1.0
    # Hand computation of SwAV's Algorithm 1 with one iteration on Q = exp(S/eps)^T (K x B).
    q = [[math.exp(scores[b][k] / eps) for b in range(3)] for k in range(2)]
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    q = [[x / sum(row) / 2 for x in row] for row in q]
    cols = [q[0][b] + q[1][b] for b in range(3)]
    q = [[q[k][b] / cols[b] / 3 * 3 for b in range(3)] for k in range(2)]
    expected = torch.tensor(q).t()
    assert torch.allclose(sinkhorn(torch.tensor(scores), eps, 1), expected, atol=1e-6)


def test_sinkhorn_is_float32_under_low_precision_and_survives_large_scores():
    codes = sinkhorn(torch.tensor([[100.0, -100.0], [-100.0, 100.0]]).bfloat16(), epsilon=0.05, iterations=3)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()
    assert torch.allclose(codes, torch.eye(2), atol=1e-4)


def test_ema_update_and_cosine_schedule_endpoints():
    target, online = nn.Linear(2, 1), nn.Linear(2, 1)
    nn.init.zeros_(target.weight)
    nn.init.ones_(online.weight)
    ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, torch.full((1, 2), 0.1))
    assert cosine_schedule(0, 100, 0.99, 1.0) == 0.99
    assert abs(cosine_schedule(50, 100, 0.99, 1.0) - 0.995) < 1e-12
    assert cosine_schedule(100, 100, 0.996, 1.0) == 1.0
    assert cosine_schedule(500, 100, 0.996, 1.0) == 1.0


def test_multicrop_views_are_two_global_then_local():
    views = multicrop_views(ViewConfig(blur_p=0.3), 32, 16, 3, (0.14, 1.0), (0.05, 0.14))
    assert [v.size for v in views] == [32, 32, 16, 16, 16]
    assert views[0].crop_scale == (0.14, 1.0) and views[4].crop_scale == (0.05, 0.14)
    assert all(v.blur_p == 0.3 for v in views)


def test_mlp_head_layers_and_its_hidden_part_alone():
    head = MLPHead([8, 6, 6, 4], last_bn=True)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, ScaleBatchNorm1d]
    assert head(torch.randn(5, 8)).shape == (5, 4)
    # The output BatchNorm scales each normalised feature by its gamma and adds nothing.
    with torch.no_grad():
        head[-1].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    out = head.train()(torch.randn(64, 8))
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.std(0, unbiased=False), torch.tensor([1.0, 2.0, 0.5, 3.0]), atol=1e-3)
    hidden = MLPHead([8, 6, 3], output_layer=False)  # every step of dims is a Linear-BN-ReLU layer
    assert [type(m) for m in hidden] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU]
    out = hidden(torch.randn(5, 8))
    assert out.shape == (5, 3) and (out >= 0).all()


def test_split_batch_forward_normalises_each_chunk_and_restores_the_order():
    x = torch.tensor([[0.0], [2.0], [10.0], [14.0], [1.0], [5.0]])
    bn = nn.BatchNorm1d(1, affine=False)
    # In order: chunks (0, 2), (10, 14), (1, 5), each mapped to (-1, 1) by its own mean and std.
    assert torch.allclose(split_batch_forward(bn, x, 3), torch.tensor([[-1.0], [1.0]] * 3), atol=1e-4)
    # Permuted: chunks (x[5], x[0]) = (5, 0), (14, 1), (10, 2); each row is scored within its chunk, returned in x's order.
    permutation = torch.tensor([5, 0, 3, 4, 2, 1])
    expected = torch.tensor([[-1.0], [-1.0], [1.0], [1.0], [-1.0], [1.0]])
    assert torch.allclose(split_batch_forward(bn, x, 3, permutation), expected, atol=1e-4)
    # Without batch statistics the split changes nothing, whatever the order.
    linear = nn.Linear(1, 2)
    assert torch.allclose(split_batch_forward(linear, x, 3, permutation), linear(x))
    assert torch.equal(split_batch_forward(bn, x, 1), bn(x))
