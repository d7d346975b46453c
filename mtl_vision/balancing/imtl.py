"""IMTL-G as LibMTL computes it (median-research-group/LibMTL LibMTL/weighting/IMTL.py, commit
4336804; Liu et al., Towards Impartial Multi-task Learning, ICLR 2021, released no code).

With the task gradients g_t, their unit vectors u_t, D = [g_1 - g_t]_{t>1} and U = [u_1 - u_t]_{t>1},
alpha_{2..T} = g_1 U^T (D U^T)^-1 and alpha_1 = 1 - sum alpha_{2..T}: the combination whose
projections on every u_t are equal, in float32 as theirs. In `mode: params` the products are
formed from the gradients in their order (`weigh_rows`: with nearly dependent gradients the
system is ill-conditioned and its solution is their rounding); in `mode: features` from the
float32 Gramian. torchjd's IMTLG (the pseudo-inverse form) is the same where the gradients are
independent: `solver: pinv`. With `GradientBalancer(transform="learned_scale")` this is LibMTL's
IMTL, the hybrid of IMTL-G and IMTL-L (conf/balancer/imtl.yaml).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import IMTLGWeighting

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

SOLVERS = ("inverse", "pinv")


class IMTLWeighting(ReferenceWeighting):
    """Args:
    solver: "inverse" (LibMTL's closed form) or "pinv" (torchjd's IMTLG, defined for dependent
        gradients too).
    """

    def __init__(self, solver: str = "inverse") -> None:
        super().__init__()
        if solver not in SOLVERS:
            raise ValueError(f"balancer.aggregator.solver must be one of {list(SOLVERS)}, got {solver!r}")
        self.solver = solver

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if self.solver == "pinv":
            weights = IMTLGWeighting()(gramian.double()).to(gramian.dtype)
            return weights, torch.ones_like(weights)
        g = as_float32(gramian)
        norms = g.diagonal().clamp(min=0).sqrt()
        # g_1 . (u_1 - u_j) and (g_1 - g_i) . (u_1 - u_j), for i, j = 2..T
        first = g[0, 0] / norms[0] - g[0, 1:] / norms[1:]
        cross = g[0:1, :] / norms.view(1, -1)  # g_1 . u_j
        rows = g[1:, :] / norms.view(1, -1)  # g_i . u_j
        system = (cross[:, 0:1] - rows[:, 0:1]) - (cross[:, 1:] - rows[:, 1:])
        alpha = first @ torch.inverse(system)
        weights = torch.cat([(1 - alpha.sum()).view(1), alpha]).to(gramian.dtype)
        return weights, torch.ones_like(weights)


    def weigh_rows(self, jacobian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """LibMTL's products, formed from the float32 gradients in their order: where D U^T is
        ill-conditioned (nearly dependent gradients) the solution is dominated by their rounding."""
        if self.solver == "pinv":
            return None
        j = jacobian.float()
        units = j / torch.norm(j, p=2, dim=-1, keepdim=True)
        diffs = j[0:1] - j[1:]
        unit_diffs = units[0:1] - units[1:]
        alpha = (j[0] @ unit_diffs.t()) @ torch.inverse(diffs @ unit_diffs.t())
        weights = torch.cat([(1 - alpha.sum()).view(1), alpha])
        return weights, torch.ones_like(weights)


def imtl(solver: str = "inverse") -> ReferenceAggregator:
    """LibMTL's IMTL-G as a torchjd aggregator (see the module docstring)."""
    return ReferenceAggregator(IMTLWeighting(solver=solver))
