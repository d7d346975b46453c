"""Geometric loss strategy: Chennupati, Sistu, Yogamani, Rawashdeh, "MultiNet++: Multi-Stream
Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

The objective is the geometric mean `Gm = (prod_t L_t)^(1/T)`. Its gradient is
`sum_t Gm / (T * L_t) * dL_t`, so the balancer trains with the linear total `sum_t w_t * L_t`,
`w_t = Gm / (T * L_t)`, the weights computed from the global (process-averaged) losses. The total
then has the geometric mean's gradient and, on one process, its value. Gm is computed in the log
domain, with the losses clamped at >= 1e-12 so a zero loss gives a finite (large) weight instead of
a division by zero. The gradient is LibMTL's (LibMTL/weighting/GLS.py, commit
4336804847eaa5e0b924b743d76beec7ac3fdc97, which backpropagates `prod(L)^(1/T)` directly).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from mtl_vision.balancing.base import Balancer

_MIN_LOSS = 1e-12


class GeometricLossStrategy(Balancer):
    """Args:
        tasks: task names.

    Weights `Gm / (T * L_t)` of the global losses; their weighted sum of the losses is Gm.
    """

    uses_global_losses = True

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        stacked = torch.stack([losses[t] for t in self.tasks]).clamp_min(_MIN_LOSS)
        geometric_mean = torch.exp(torch.log(stacked).mean())
        weights = geometric_mean / (len(self.tasks) * stacked)
        return {t: weights[i] for i, t in enumerate(self.tasks)}
