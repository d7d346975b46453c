"""CAGrad: Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021.

As Cranial-XIX/CAGrad computes it on NYUv2 (nyuv2/utils.py `multi_task_mgd_trainer`: `cagrad` and
`overwrite_grad`; nyuv2/run.sh `--alpha 0.4`; commit dc3d481), for T tasks: with the float32
Gramian A and g0_norm = sqrt(mean(A) + 1e-8), c = alpha * g0_norm + 1e-8, scipy's `minimize`
(SLSQP, start 1/T, bounds [0, 1], sum = 1) of x^T A 1/T + c sqrt(x^T A x + 1e-8); then
lambda = c / (|g_w| + 1e-8) and the update (1/T sum_t g_t + lambda g_w), divided by 1 + alpha^2
(`rescale: 1`, theirs; 0: none; 2: 1 + alpha) and multiplied by T "to match the sum loss"
(`scale: sum`, theirs). LibMTL (LibMTL/weighting/CAGrad.py, commit 4336804) is the same with
calpha 0.5 and no factor T: `c: 0.5, scale: mean`. Heads keep their plain gradient in both.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

SCALES = ("sum", "mean")
RESCALES = (0, 1, 2)


class CAGradWeighting(ReferenceWeighting):
    """Args:
    c: the radius factor (`alpha` in their code; 0.4 in their NYUv2 and Cityscapes runs).
    rescale: 1 divides the update by 1 + c^2 (theirs), 2 by 1 + c, 0 leaves it.
    scale: "sum" multiplies the update by T (theirs, the scale of the summed loss), "mean" not (LibMTL).
    """

    def __init__(self, c: float = 0.4, rescale: int = 1, scale: str = "sum") -> None:
        super().__init__()
        if c < 0:
            raise ValueError(f"balancer.aggregator.c must be >= 0, got {c}")
        if rescale not in RESCALES:
            raise ValueError(f"balancer.aggregator.rescale must be one of {list(RESCALES)}, got {rescale!r}")
        if scale not in SCALES:
            raise ValueError(f"balancer.aggregator.scale must be one of {list(SCALES)}, got {scale!r}")
        self.c, self.rescale, self.scale = float(c), int(rescale), scale

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g32 = as_float32(gramian).cpu()
        n = g32.shape[0]
        g0_norm = (g32.mean() + 1e-8).sqrt()
        start = np.ones(n) / n
        a = g32.numpy()
        b = start.copy()
        radius = (self.c * g0_norm + 1e-8).item()

        def objective(x: np.ndarray) -> float:
            return (x.reshape(1, -1).dot(a).dot(b.reshape(-1, 1)) + radius * np.sqrt(
                x.reshape(1, -1).dot(a).dot(x.reshape(-1, 1)) + 1e-8
            )).sum()  # fmt: skip

        constraint = {"type": "eq", "fun": lambda x: 1 - sum(x)}
        res = minimize(objective, start, bounds=tuple((0, 1) for _ in start), constraints=constraint)
        w = torch.tensor(res.x, dtype=torch.float32)
        gw_norm = (w @ g32 @ w).clamp(min=0).sqrt()  # |sum_t w_t g_t|
        lmbda = radius / (gw_norm + 1e-8)
        weights = 1.0 / n + lmbda * w
        if self.rescale == 1:
            weights = weights / (1 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1 + self.c)
        if self.scale == "sum":
            weights = weights * n
        weights = weights.to(gramian.device)
        return weights, torch.ones_like(weights)


def cagrad(c: float = 0.4, rescale: int = 1, scale: str = "sum") -> ReferenceAggregator:
    """The authors' CAGrad as a torchjd aggregator (see the module docstring)."""
    return ReferenceAggregator(CAGradWeighting(c=c, rescale=rescale, scale=scale))
