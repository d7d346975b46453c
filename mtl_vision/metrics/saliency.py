"""Saliency metric: maxF (F_beta, beta^2 = 0.3) from split-level counts per threshold."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import SALIENCY_NUM_THRESHOLDS, _saliency_compute, _saliency_update

__all__ = ["SaliencyMetrics"]


class SaliencyMetrics(Metric):
    """maxF (percent) over thresholds 0.05, 0.10, ..., 0.95, as in ATRC ``MaxF`` / InvPT ``SaliencyMeter``.

    States are int64 true-positive and predicted-positive counts per threshold (predicted
    salient = ``prob >= t``) and the ground-truth positive count, summed over the split; P, R and
    F_beta = (1 + 0.3) P R / (0.3 P + R) are computed once from the sums, then maximised.

    ``update(pred, target)``: ``pred`` are probabilities (after sigmoid), (N, H, W) or
    (N, 1, H, W); ``target`` binary (salient where > 0.5), 255 = ignored. ``compute()`` returns
    ``{"maxF"}``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    true_pos: Tensor
    pred_pos: Tensor
    gt_pos: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("true_pos", "pred_pos"):
            self.add_state(name, default=torch.zeros(SALIENCY_NUM_THRESHOLDS, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("gt_pos", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of saliency probabilities ``pred`` and binary targets."""
        true_pos, pred_pos, gt_pos = _saliency_update(pred, target)
        self.true_pos += true_pos
        self.pred_pos += pred_pos
        self.gt_pos += gt_pos

    def compute(self) -> dict[str, Tensor]:
        """Split-level maxF in percent."""
        return _saliency_compute(self.true_pos, self.pred_pos, self.gt_pos)
