"""DB-MTL: Lin et al., Dual-Balancing for Multi-Task Learning, 2023 (arXiv:2308.12029).

As its authors compute it in their library (median-research-group/LibMTL,
LibMTL/weighting/DB_MTL.py, commit 4336804): the loss scale is balanced by differentiating
log(L_t + 1e-8) (`GradientBalancer(transform="log")`), the gradient scale by a moving average
of each task's gradient, b_t <- g_t + (beta / k^sigma) (b_t - g_t) at step k from b_t = 0, whose
rows are scaled to the largest row norm: update = sum_t (max_s |b_s| / (|b_t| + 1e-8)) b_t. The
heads keep the plain sum of their log-loss gradients. float32, as theirs. The averages are one row
per task and shared parameter, so DB-MTL runs in `mode: params` only (LibMTL refuses
representation gradients) and its checkpoint state is T times the shared parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.reference import JacobianAggregator


class DBMTL(JacobianAggregator, Stateful):
    """Args:
    beta: the moving average's rate (LibMTL's `DB_beta`, 0.9).
    beta_sigma: its decay over steps, beta / k^beta_sigma (`DB_beta_sigma`, 0: constant).
    """

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"balancer.aggregator.beta must lie in [0, 1], got {beta}")
        if beta_sigma < 0:
            raise ValueError(f"balancer.aggregator.beta_sigma must be >= 0, got {beta_sigma}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.buffer: Tensor | None = None

    def combine(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor, None]:
        if self.buffer is None or self.buffer.shape != jacobian.shape:
            if self.buffer is not None:
                raise ValueError(
                    f"DB-MTL's gradient averages have shape {tuple(self.buffer.shape)}, this step's Jacobian "
                    f"{tuple(jacobian.shape)}: the tasks or the shared parameters changed mid-run"
                )
            self.buffer = torch.zeros_like(jacobian)
        self.step += 1
        rate = self.beta / self.step**self.beta_sigma
        self.buffer = jacobian + rate * (self.buffer.to(jacobian) - jacobian)
        norms = self.buffer.norm(dim=-1)
        alpha = norms.max() / (norms + 1e-8)
        return alpha @ self.buffer, alpha, None
