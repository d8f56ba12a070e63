"""Monocular depth from frozen multi-scale feature maps."""

from __future__ import annotations

import torch

from sslbench.data.base import ImageSet
from sslbench.tasks.metrics import depth_metrics_from_totals, depth_totals
from sslbench.tasks.probe import CachedFeatures, ProbeConfig, Task, dense_probe

_MAX_LOG_DEPTH = 20.0
"""Clamp of the predicted log-depth before exp, so an untrained head cannot overflow."""


def log_depth_l1_loss(log_depth: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """Mean |predicted log-depth - log true depth| over valid pixels (depth > 0).

    L1 in log space penalises relative error, like AbsRel and delta1, so near and far pixels count
    alike, and it does not depend on the unit of the depth maps (metres or arbitrary renderer units).
    """
    log_depth = log_depth.squeeze(1)
    valid = depth > 0
    if not valid.any():
        return log_depth.sum() * 0.0
    return (log_depth[valid] - depth[valid].log()).abs().mean()


class DepthTask(Task):
    """``probe``: a ``DenseDecoder`` with one output channel read as log-depth, trained with
    ``log_depth_l1_loss``. Reports ``{"rmse", "abs_rel", "delta1"}`` pooled over the valid pixels
    (depth > 0) of the test set at full image resolution, in the dataset's depth unit."""

    name = "depth"
    protocols = ("probe",)
    target = "depth"
    uses_maps = True

    def score(
        self, train_features: CachedFeatures, train: ImageSet, test_features: CachedFeatures, test: ImageSet, protocol: str, config: ProbeConfig
    ) -> dict[str, float]:
        depth = train.targets[self.target]
        valid = depth > 0
        mean_log_depth = depth[valid].log().mean().item() if valid.any() else 0.0
        truth = test.targets[self.target]
        totals = torch.zeros(4, dtype=torch.float64)
        for indices, log_depth in dense_probe(
            train_features, depth, test_features, 1, log_depth_l1_loss, config, output_bias=mean_log_depth
        ):
            predicted = log_depth.squeeze(1).clamp(-_MAX_LOG_DEPTH, _MAX_LOG_DEPTH).exp().cpu()
            totals += depth_totals(predicted, truth[indices])
        return depth_metrics_from_totals(totals)
