"""Depth metric: errors pooled over every valid pixel of the split, per evaluation protocol."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import _depth_compute, _depth_sq_rel_compute, _depth_sq_rel_update, _depth_update
from mtl_vision.metrics.mtan import batch_mean, depth_batch
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, check_protocol

__all__ = ["DepthMetrics"]


class DepthMetrics(Metric):
    """rmse, abs_err (metres), abs_rel, log_rmse (unitless) and delta1 (percent) over a whole split.

    States are float64 sums and int64 counts over valid pixels (``target > 0``), so rmse is
    sqrt(sum of squared errors / number of valid pixels of the split), as in the reference
    ``DepthMeter`` — not a mean of per-image or per-batch rmse. Non-positive predictions become
    1e-9 before all terms (reference behaviour, see ``functional._depth_update``).

    Where a codebase reports one of these keys it computes it this way, pooled over the split,
    natural log (ATRC ``src/data/metrics.py: RMSE``, rmse only, after clamping predictions at 0
    instead of 1e-9; MTI-Net ``evaluation/eval_depth.py``, rmse and log_rmse; InvPT
    ``evaluation/eval_depth.py``, rmse, log_rmse, abs_rel); delta1 is ours.
    ``protocol="invpt"`` adds ``sq_rel`` = mean of (p - g)^2 / g, which the InvPT, TaskPrompter
    and MLoRE ``DepthMeter`` report. Their masks: InvPT counts ``gt != 255`` after its transforms
    turned missing depth (0) into 255, TaskPrompter and MLoRE count 0 < gt < 80; on NYUD
    (depth below 10 m) both select exactly ``target > 0``.

    ``protocol="mtan"`` (MTAN, nash-mtl, FAMO ``depth_error``) gives ``abs_err`` and ``abs_rel`` as
    their trainers do: per validation batch over its pixels with ``target != 0``, then the mean
    over batches (``metrics/mtan.py``); the other keys stay pooled.

    Args:
        protocol: ``atrc`` (default), ``invpt``, ``mtinet``, ``mtlora`` or ``mtan``.

    ``update(pred, target)``: depth in metres, (N, H, W) or (N, 1, H, W), any float dtype.
    ``compute()`` returns ``{"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"}`` (+ ``sq_rel`` under
    ``invpt``; NaN if nothing was valid).
    """

    is_differentiable = False
    # mixed: the errors are lower-is-better, delta1 is higher-is-better
    higher_is_better = None
    full_state_update = False

    sum_sq_err: Tensor
    sum_abs_rel: Tensor
    sum_abs_err: Tensor
    sum_sq_log_err: Tensor
    n_valid: Tensor
    n_delta1: Tensor

    def __init__(self, protocol: str = DEFAULT_PROTOCOL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.protocol = check_protocol(protocol, where="protocol")
        sums = ["sum_sq_err", "sum_abs_rel", "sum_sq_log_err", "sum_abs_err"] + (["sum_sq_rel"] if self.protocol == "invpt" else [])
        for name in sums:
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_valid", "n_delta1"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        if self.protocol == "mtan":
            self.add_state("batch_errors", default=torch.zeros(2, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("n_batches", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predicted depth ``pred`` and ground truth ``target``, (N, H, W)."""
        sum_sq_err, sum_abs_rel, sum_sq_log_err, n_valid, n_delta1, sum_abs_err = _depth_update(pred, target)
        self.sum_abs_err += sum_abs_err
        self.sum_sq_err += sum_sq_err
        self.sum_abs_rel += sum_abs_rel
        self.sum_sq_log_err += sum_sq_log_err
        self.n_valid += n_valid
        self.n_delta1 += n_delta1
        if self.protocol == "invpt":
            self.sum_sq_rel += _depth_sq_rel_update(pred, target)
        if self.protocol == "mtan" and (errors := depth_batch(pred, target)) is not None:
            self.batch_errors += torch.tensor(errors, dtype=torch.float64, device=self.batch_errors.device)
            self.n_batches += 1

    def compute(self) -> dict[str, Tensor]:
        """Split-level depth errors."""
        out = _depth_compute(
            self.sum_sq_err, self.sum_abs_rel, self.sum_sq_log_err, self.n_valid, self.n_delta1, self.sum_abs_err
        )
        if self.protocol == "invpt":
            out |= _depth_sq_rel_compute(self.sum_sq_rel, self.n_valid)
        if self.protocol == "mtan":
            abs_err, abs_rel = batch_mean(self.batch_errors, self.n_batches)
            out |= {"abs_err": abs_err, "abs_rel": abs_rel}
        return out
