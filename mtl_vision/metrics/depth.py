"""Depth metric: errors pooled over every valid pixel of the split."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import _depth_compute, _depth_update

__all__ = ["DepthMetrics"]


class DepthMetrics(Metric):
    """rmse, abs_rel, log_rmse (metres / unitless) and delta1 (percent) over a whole split.

    States are float64 sums and int64 counts over valid pixels (``target > 0``), so rmse is
    sqrt(sum of squared errors / number of valid pixels of the split), as in the reference
    ``DepthMeter`` — not a mean of per-image or per-batch rmse. Predictions are clamped to
    1e-9 before all terms (reference behaviour, see ``functional._depth_update``).

    ``update(pred, target)``: depth in metres, (N, H, W) or (N, 1, H, W), any float dtype.
    ``compute()`` returns ``{"rmse", "abs_rel", "log_rmse", "delta1"}`` (NaN if nothing was valid).
    """

    is_differentiable = False
    # mixed: the errors are lower-is-better, delta1 is higher-is-better
    higher_is_better = None
    full_state_update = False

    sum_sq_err: Tensor
    sum_abs_rel: Tensor
    sum_sq_log_err: Tensor
    n_valid: Tensor
    n_delta1: Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("sum_sq_err", "sum_abs_rel", "sum_sq_log_err"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_valid", "n_delta1"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predicted depth ``pred`` and ground truth ``target``, (N, H, W)."""
        sum_sq_err, sum_abs_rel, sum_sq_log_err, n_valid, n_delta1 = _depth_update(pred, target)
        self.sum_sq_err += sum_sq_err
        self.sum_abs_rel += sum_abs_rel
        self.sum_sq_log_err += sum_sq_log_err
        self.n_valid += n_valid
        self.n_delta1 += n_delta1

    def compute(self) -> dict[str, Tensor]:
        """Split-level depth errors."""
        return _depth_compute(self.sum_sq_err, self.sum_abs_rel, self.sum_sq_log_err, self.n_valid, self.n_delta1)
