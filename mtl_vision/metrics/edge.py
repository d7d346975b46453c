"""Edge metric: cheap, APPROXIMATE odsF for monitoring during training (not the BSDS benchmark)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import EDGE_NUM_THRESHOLDS, _check_tolerance, _edge_compute, _edge_update

__all__ = ["EdgeApproxMetrics"]


class EdgeApproxMetrics(Metric):
    """Approximate ODS boundary F-measure (percent) pooled over the split.

    Per threshold t = k / (T + 1) (default T = 99: 0.01..0.99), a pixel with ``prob >= t`` is a
    correct prediction if a GT edge pixel lies within r = max(1, round(tolerance * diagonal)) px
    (square neighbourhood), and a GT pixel is recalled if a predicted pixel lies within r. No
    thinning, no one-to-one matching (see ``functional._edge_update``), so values are optimistic
    compared with the BSDS/SEISM evaluation and are meant for model selection / monitoring only.
    States are int64 counts per threshold; cost per batch is two separable max-pools and a few
    histograms, independent of T.

    Args:
        tolerance: match radius as a fraction of the image diagonal (BSDS ``maxDist`` is 0.0075).
        num_thresholds: number of thresholds T.

    ``update(pred, target)``: ``pred`` edge probabilities, (N, H, W) or (N, 1, H, W); ``target``
    binary edges (> 0.5), 255 = ignored. ``compute()`` returns ``{"odsF_approx"}``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pred_correct: Tensor
    pred_pos: Tensor
    gt_recalled: Tensor
    gt_pos: Tensor

    def __init__(self, tolerance: float, num_thresholds: int = EDGE_NUM_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_tolerance(tolerance)
        if not isinstance(num_thresholds, int) or num_thresholds < 1:
            raise ValueError(f"Expected `num_thresholds` to be a positive int, got {num_thresholds!r}")
        self.tolerance = float(tolerance)
        self.num_thresholds = num_thresholds
        for name in ("pred_correct", "pred_pos", "gt_recalled"):
            self.add_state(name, default=torch.zeros(num_thresholds, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("gt_pos", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of edge probabilities ``pred`` and binary edge targets."""
        pred_correct, pred_pos, gt_recalled, gt_pos = _edge_update(pred, target, self.tolerance, self.num_thresholds)
        self.pred_correct += pred_correct
        self.pred_pos += pred_pos
        self.gt_recalled += gt_recalled
        self.gt_pos += gt_pos

    def compute(self) -> dict[str, Tensor]:
        """Split-level approximate odsF in percent."""
        return _edge_compute(self.pred_correct, self.pred_pos, self.gt_recalled, self.gt_pos)
