import math

import pytest
import torch

from sslbench.tasks import metrics
from sslbench.tasks.metrics import (
    confusion_matrix,
    count_mae,
    depth_metrics,
    knn_predict,
    mean_iou,
    pixel_accuracy,
    top1,
)


def _unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Query at 0 degrees; one class-0 point at 0 degrees, two class-1 points at +-30 degrees.
BANK = torch.tensor([_unit(0), _unit(30), _unit(-30), _unit(180)])
LABELS = torch.tensor([0, 1, 1, 2])
QUERY = torch.tensor([[1.0, 0.0]])


def test_knn_weighted_vote_by_hand():
    # k=3, T=0.1: class 0 gets exp(1/0.1) = 22026, class 1 gets 2 exp(0.866/0.1) = 11537 -> class 0.
    assert knn_predict(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=0.1).tolist() == [0]
    # T=1: class 0 gets e = 2.72, class 1 gets 2 e^0.866 = 4.75 -> the majority wins.
    assert knn_predict(BANK, LABELS, QUERY, num_classes=3, k=3, temperature=1.0).tolist() == [1]
    # k=1: only the nearest neighbour votes.
    assert knn_predict(BANK, LABELS, QUERY, num_classes=3, k=1, temperature=1.0).tolist() == [0]


def test_knn_k_larger_than_bank_and_class_and_unnormalised_inputs():
    # k=200 > 4 bank vectors (and > the single class-0 member): all vote; the 180-degree point of
    # class 2 adds exp(-1) only. Scaling vectors does not change cosine similarity.
    scaled = BANK * torch.tensor([[5.0], [0.1], [2.0], [3.0]])
    assert knn_predict(scaled, LABELS, QUERY * 7, num_classes=3, k=200, temperature=1.0).tolist() == [1]
    assert knn_predict(scaled, LABELS, QUERY * 7, num_classes=3, k=200, temperature=0.1).tolist() == [0]
    # A query at 180 degrees: class 2's own point dominates.
    assert knn_predict(BANK, LABELS, torch.tensor([[-1.0, 0.0]]), num_classes=3, k=200, temperature=0.1).tolist() == [2]


def test_knn_chunked_equals_unchunked(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(50, 8, generator=generator), torch.randn(37, 8, generator=generator)
    labels = torch.randint(0, 5, (50,), generator=generator)
    whole = knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.1)
    monkeypatch.setattr(metrics, "_KNN_CHUNK_ELEMENTS", 50 * 4)  # 4 queries per chunk
    assert torch.equal(knn_predict(bank, labels, queries, num_classes=5, k=7, temperature=0.1), whole)


def test_top1_and_count_mae():
    assert top1(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    # |0-1| + |2-2| + |3-5| = 3 over 3 images.
    assert count_mae(torch.tensor([0, 2, 3]), torch.tensor([1, 2, 5])) == 1.0


# A 2x3 map with one ignored pixel (whose prediction must not count).
SEG_TARGET = torch.tensor([[0, 0, 1], [1, 255, 2]])
SEG_PRED = torch.tensor([[0, 1, 1], [1, 0, 0]])


def test_confusion_matrix_ignores_pixels():
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 0]])
    assert torch.equal(confusion_matrix(SEG_PRED, SEG_TARGET, 3, ignore_index=255), expected)


def test_mean_iou_and_pixel_accuracy_by_hand():
    # IoU: class 0 = 1/3 (I 1, U 2+2-1), class 1 = 2/3 (I 2, U 2+3-2), class 2 = 0 (I 0, U 1).
    assert mean_iou(SEG_PRED, SEG_TARGET, num_classes=3, ignore_index=255) == pytest.approx(1 / 3)
    # A class absent from both target and prediction (union 0) is left out of the mean.
    assert mean_iou(SEG_PRED, SEG_TARGET, num_classes=4, ignore_index=255) == pytest.approx(1 / 3)
    assert pixel_accuracy(SEG_PRED, SEG_TARGET, ignore_index=255) == pytest.approx(3 / 5)
    assert math.isnan(mean_iou(SEG_PRED, torch.full_like(SEG_TARGET, 255), num_classes=3))


def test_depth_metrics_by_hand():
    pred = torch.tensor([[1.0, 2.0], [4.0, 5.0]])
    target = torch.tensor([[1.0, 2.5], [2.0, 0.0]])  # the last pixel is invalid
    result = depth_metrics(pred, target)
    # errors 0, -0.5, 2 -> RMSE sqrt(4.25 / 3); AbsRel (0 + 0.2 + 1) / 3;
    # ratios 1, 1.25, 2 -> only the first is < 1.25.
    assert result["rmse"] == pytest.approx(math.sqrt(4.25 / 3))
    assert result["abs_rel"] == pytest.approx(0.4)
    assert result["delta1"] == pytest.approx(1 / 3)
