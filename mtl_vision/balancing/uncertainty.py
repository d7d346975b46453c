"""Uncertainty weighting: Kendall, Gal, Cipolla, "Multi-Task Learning Using Uncertainty to Weigh
Losses for Scene Geometry and Semantics", CVPR 2018.

Each task has a learned log-variance s_t and the total is `sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t`,
the single form both reference codes use for every task, regression and classification alike
(the paper's classification form `exp(-s) L + 0.5 s` is used by neither), starting at s_t = -0.5:
lorenmt/mtan im2im_pred/model_segnet_mtan.py (`logsigma`) and utils.py `multi_task_trainer`, commit
c36c30baa18968dec74fe9039abcfd4f132edfa1; LibMTL LibMTL/weighting/UW.py, commit
4336804847eaa5e0b924b743d76beec7ac3fdc97. For fixed losses the optimum is s_t = log L_t, i.e.
weight 0.5 / L_t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl_vision.balancing.base import Balancer


class UncertaintyWeighting(Balancer):
    """Args:
        tasks: task names.
        init: initial log-variance s_t of every task (-0.5 as MTAN and LibMTL, weight 0.82; 0 gives
            weight 0.5).

    `log_vars` is a (T,) parameter trained by the model optimiser; since the total is linear in the
    losses, DDP averages its gradient `-0.5 exp(-s) L + 0.5` exactly.
    """

    def __init__(self, *, tasks: Sequence[str], init: float = -0.5) -> None:
        super().__init__(tasks=tasks)
        if not math.isfinite(float(init)):
            raise ValueError(f"balancer.init must be a finite log-variance, got {init!r}")
        self.log_vars = nn.Parameter(torch.full((len(self.tasks),), float(init)))

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # Not detached: s gets its gradient through these weights.
        weights = 0.5 * torch.exp(-self.log_vars)
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def regularizer(self, losses: Mapping[str, Tensor]) -> Tensor:
        return 0.5 * self.log_vars.sum()
