"""The ``mtan`` evaluation protocol's per-batch errors (MTAN, Liu et al., CVPR 2019; lorenmt/mtan
``im2im_pred/utils.py`` ``depth_error`` / ``normal_error``, copied unchanged by nash-mtl and FAMO
``experiments/nyuv2/utils.py``).

Their trainers score depth and normals per test batch and average the batch values over the
batches (``avg_cost += cost / test_batch``); only mIoU and pixel accuracy come from a confusion
matrix over the split. So the numbers depend on the validation batch size (2 in their NYUv2 and
Cityscapes trainers). The Metric classes keep the sums of the per-batch values and the batch
count (summable states); these functions give one batch's values. Under DDP each process batches
other images together than one process does, so these numbers also depend on the process count:
score on one process (`mtl-eval`) to compare with theirs.

Their mask is ``sum(target over channels) != 0``, for normals a sum of signed components.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["NORMAL_KEYS", "depth_batch", "normal_batch"]

NORMAL_KEYS = ("mean", "median", "within_11_25", "within_22_5", "within_30")


def depth_batch(pred: Tensor, target: Tensor) -> tuple[float, float] | None:
    """(mean |p - g|, mean |p - g| / g) over one batch's valid pixels (``g != 0``), as their
    ``depth_error``; None when the batch has no valid pixel (theirs gives NaN there).
    pred, target: (N, H, W) or (N, 1, H, W)."""
    pred, target = pred.reshape(target.shape[0], -1).float(), target.reshape(target.shape[0], -1).float()
    valid = target != 0
    count = int(valid.sum())
    if count == 0:
        return None
    err = (pred[valid] - target[valid]).abs()
    return float(err.double().sum() / count), float((err / target[valid]).double().sum() / count)


def normal_batch(pred: Tensor, target: Tensor) -> tuple[float, ...] | None:
    """(mean, median angle in degrees, percent of angles below 11.25, 22.5, 30) over one batch's
    valid pixels, as their ``normal_error``: float32 ``acos`` of the clamped dot product of the
    prediction as given (theirs is unit length) and the target; the median of an even count is
    the mean of the two middle angles (numpy's). None when no pixel is valid.
    pred, target: (N, 3, H, W)."""
    valid = target.sum(dim=1) != 0
    if not bool(valid.any()):
        return None
    dot = (pred.float() * target.float()).sum(dim=1)[valid]
    angles = torch.rad2deg(torch.acos(dot.clamp(-1, 1)).double())
    n = angles.numel()
    ordered = angles.sort().values
    median = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    within = [float((angles < t).double().mean()) * 100.0 for t in (11.25, 22.5, 30.0)]
    return (float(angles.mean()), float(median), *within)


def batch_mean(total: Tensor, batches: Tensor) -> Tensor:
    """Mean of per-batch values from their sum; NaN before any batch."""
    return total / batches if int(batches) > 0 else torch.full_like(total, math.nan)
