"""Task metrics: pure functions of tensors, no training state.

Dense metrics come in two steps so a task can score a test set batch by batch without holding every
prediction: accumulate sufficient statistics (``confusion_matrix``, ``depth_totals``) and turn the
sum into numbers (``mean_iou_from_confusion``, ``depth_metrics_from_totals``). The one-call forms
(``mean_iou``, ``depth_metrics``) are the same two steps on one tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_KNN_CHUNK_ELEMENTS = 1 << 24
"""Most query-by-bank similarities held at once (64 MiB of float32): 1,677 queries against 10k."""


def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Weighted kNN vote (Wu et al. 2018, "Unsupervised Feature Learning via Non-Parametric
    Instance Discrimination"; the same vote as DINO's ``eval_knn.py`` and lightly's ``knn_predict``).

    Features are L2-normalised here, so similarity is cosine. Each query takes its ``k`` most similar
    training vectors (all of them when the bank is smaller than ``k``); neighbour ``i`` votes for its
    label with weight ``exp(sim_i / temperature)``; the class with the largest summed weight wins
    (ties go to the lower class id). Queries are processed in chunks so that a 10k x 10k evaluation
    never materialises the full similarity matrix. Returns ``(Q,)`` int64 class ids on the device of
    ``query_feats``.
    """
    if train_feats.ndim != 2 or query_feats.ndim != 2 or train_feats.shape[1] != query_feats.shape[1]:
        raise ValueError(f"knn_predict needs (N, D) and (Q, D) features, got {tuple(train_feats.shape)} and {tuple(query_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(train_feats) == 0:
        raise ValueError(f"knn_predict needs one label per training vector and at least one, got {len(train_feats)} vectors, {len(train_labels)} labels")
    bank = F.normalize(train_feats.float(), dim=1)
    labels = train_labels.to(bank.device, torch.int64)
    k = min(k, len(bank))
    chunk = max(1, _KNN_CHUNK_ELEMENTS // len(bank))
    predictions = []
    for queries in query_feats.split(chunk):
        queries = F.normalize(queries.to(bank.device, torch.float32), dim=1)
        similarity, neighbours = (queries @ bank.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(len(queries), num_classes, device=bank.device)
        votes.scatter_add_(1, labels[neighbours], weights)
        predictions.append(votes.argmax(dim=1))
    if not predictions:
        return torch.zeros(0, dtype=torch.int64, device=query_feats.device)
    return torch.cat(predictions).to(query_feats.device)


def top1(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Fraction of predictions equal to the target."""
    return (pred == target).double().mean().item()


def count_mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean absolute difference of predicted and true counts (count ids)."""
    return (pred.double() - target.double()).abs().mean().item()


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = None) -> torch.Tensor:
    """``(C, C)`` int64 counts, row = true class, column = predicted class.

    Pixels (or samples) whose target equals ``ignore_index`` are not counted. Any shapes work as long
    as ``pred`` and ``target`` match; sums of confusion matrices over batches are confusion matrices.
    """
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix needs matching shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
    return torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_iou_from_confusion(confusion: torch.Tensor) -> float:
    """Mean intersection-over-union over the classes present in target or prediction (union > 0).

    NaN when no pixel is counted at all.
    """
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    if not present.any():
        return math.nan
    return (intersection[present] / union[present]).mean().item()


def pixel_accuracy_from_confusion(confusion: torch.Tensor) -> float:
    """Fraction of counted pixels predicted correctly (NaN when none is counted)."""
    total = confusion.sum().item()
    return confusion.diag().sum().item() / total if total else math.nan


def mean_iou(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int | None = 255) -> float:
    """Mean IoU of a class map against its target, ignoring ``ignore_index`` target pixels."""
    return mean_iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def pixel_accuracy(pred: torch.Tensor, target: torch.Tensor, ignore_index: int | None = 255) -> float:
    """Fraction of non-ignored pixels whose prediction equals the target (NaN when none is left)."""
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    total = int(keep.sum())
    return (pred[keep] == target[keep]).sum().item() / total if total else math.nan


def depth_totals(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sums behind the depth metrics over valid pixels (``target > 0``), float64 ``(4,)``:
    squared error, relative absolute error, pixels within delta < 1.25, number of valid pixels.

    Predictions are clamped to a tiny positive value so the ratio of delta1 stays finite.
    """
    if pred.shape != target.shape:
        raise ValueError(f"depth metrics need matching shapes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    valid = target > 0
    p = pred[valid].double().clamp_min(1e-8)
    t = target[valid].double()
    ratio = torch.maximum(p / t, t / p)
    return torch.stack([((p - t) ** 2).sum(), ((p - t).abs() / t).sum(), (ratio < 1.25).double().sum(), torch.tensor(float(len(t)), dtype=torch.float64, device=t.device)])


def depth_metrics_from_totals(totals: torch.Tensor) -> dict[str, float]:
    """RMSE, AbsRel and delta1 (Eigen et al. 2014), pooled over all valid pixels of the set."""
    squared, relative, within, count = (float(x) for x in totals)
    if count == 0:
        return {"rmse": math.nan, "abs_rel": math.nan, "delta1": math.nan}
    return {"rmse": math.sqrt(squared / count), "abs_rel": relative / count, "delta1": within / count}


def depth_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``{"rmse", "abs_rel", "delta1"}`` of predicted depth on pixels where ``target > 0``."""
    return depth_metrics_from_totals(depth_totals(pred, target))
