"""GradVac: Wang, Tsvetkov, Firat, Cao, Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models, ICLR 2021.

The authors released no code; this follows LibMTL (LibMTL/weighting/GradVac.py `GradVac.backward`,
commit 4336804), which torchjd's `GradVac` also follows for the whole model. Per group of shared
parameters k and ordered task pair (i, j), with g_i^pc task i's gradient as modified so far (it
starts as g_i) and the other tasks j visited in a random order per i:
rho = <g_i^pc, g_j> / (|g_i^pc| |g_j| + 1e-8); when rho < phi_ij (the target, 0 at the start),
g_i^pc += g_j |g_i^pc| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2)) / (|g_j| sqrt(1 - phi^2) + 1e-8);
then phi_ij <- (1 - beta) phi_ij + beta rho (the rho before the change). The update is sum_i g_i^pc.

g_i^pc stays a combination sum_k c_ik g_k of the step's gradients, so everything follows from the
Gramian (|g_i^pc|^2 = c_i G c_i, <g_i^pc, g_j> = (c_i G)_j), as torchjd computes it: the whole model
is a Gramian weighting (both modes, exact under DDP). LibMTL's `GradVac_group_type` 1 (`all_layer`:
one group per module of the shared parameters) and 2 (`all_matrix`: one group per parameter tensor)
need the columns of each group: they read the Jacobian (`mode: params` only, as in LibMTL, which
refuses GradVac with representation gradients). LibMTL counts a layer as a leaf module of its
encoder; a module's own parameters here form its group whether or not it has children (LibMTL's
boundaries skip such parameters, e.g. a ViT's `cls_token`, and shift the later groups).

Differences to LibMTL, both harmless: the square roots clamp 1 - rho^2 at 0 (LibMTL's would give NaN
for a rounding |rho| > 1); the task orders come from torch's generator seeded by (seed, step) (the
same draws as torchjd's: `torch.randperm` per task), not Python's `random.shuffle`. The targets phi
are state: checkpointed with the aggregator, updated from global values only, so equal on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.reference import JacobianAggregator, ReferenceAggregator, ReferenceWeighting

GROUP_TYPES = ("whole_model", "all_layer", "all_matrix")
EPS = 1e-8  # LibMTL's


def _check(beta: float, group_type: str) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"balancer.aggregator.beta must be in [0, 1], got {beta}")
    if group_type not in GROUP_TYPES:
        raise ValueError(f"balancer.aggregator.group_type must be one of {list(GROUP_TYPES)}, got {group_type!r}")


class _Orders:
    """The random visiting orders of one step: for each task i, the other tasks shuffled."""

    def draw_order(self, others: list[int]) -> list[int]:
        """`others` in a random order (torch's global generator, seeded per step by the balancer)."""
        return [others[k] for k in torch.randperm(len(others)).tolist()]

    def orders(self, n: int) -> list[list[int]]:
        return [self.draw_order([j for j in range(n) if j != i]) for i in range(n)]


def vaccinate(gramians: Tensor, targets: Tensor, orders: Sequence[Sequence[int]], beta: float) -> Tensor:
    """(K, T, T) Gramians of K groups, their (K, T, T) targets phi (updated in place), the visiting
    orders (shared by the groups) -> the coefficients C (K, T, T) with g_i^pc = sum_k C[i, k] g_k in
    each group, in the Gramians' dtype. The groups are independent, so they run side by side."""
    groups, n = gramians.shape[0], gramians.shape[-1]
    coefficients = torch.eye(n, dtype=gramians.dtype).repeat(groups, 1, 1)
    norms = gramians.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()  # (K, T)
    for i in range(n):
        dots = torch.einsum("kt,ktj->kj", coefficients[:, i], gramians)  # <g_i^pc, g_j> for every j
        for j in orders[i]:
            norm_i = (dots * coefficients[:, i]).sum(-1).clamp(min=0).sqrt()
            rho = dots[:, j] / (norm_i * norms[:, j] + EPS)
            phi = targets[:, i, j].clone()
            root_phi = (1 - phi * phi).clamp(min=0).sqrt()
            w = norm_i * (phi * (1 - rho * rho).clamp(min=0).sqrt() - rho * root_phi) / (norms[:, j] * root_phi + EPS)
            w = torch.where(rho < phi, w, torch.zeros_like(w))  # only below the target
            coefficients[:, i, j] += w
            dots = dots + w.unsqueeze(-1) * gramians[:, j]
            targets[:, i, j] = (1 - beta) * phi + beta * rho
    return coefficients


class GradVacWeighting(ReferenceWeighting, _Orders):
    """The whole-model GradVac as a Gramian weighting (float64 Gramian, CPU).

    Args:
        beta: the decay of the targets' moving average (LibMTL's `GradVac_beta`, 0.5).
    """

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__()
        _check(beta, "whole_model")
        self.beta = float(beta)
        self.targets: Tensor | None = None  # (T, T) float64, created at the first step

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g = gramian.detach().double().cpu()
        if self.targets is None or self.targets.shape != g.shape:
            self.targets = torch.zeros_like(g)
        targets = self.targets.unsqueeze(0)  # a view: updated in place
        weights = vaccinate(g.unsqueeze(0), targets, self.orders(len(g)), self.beta)[0].sum(0).to(gramian)
        return weights, torch.ones_like(weights)


class GradVac(ReferenceAggregator, Stateful):
    """torchjd aggregator around `GradVacWeighting`; Stateful, so checkpoints carry its targets."""

    gramian_weighting: GradVacWeighting

    def __init__(self, beta: float = 0.5) -> None:
        super().__init__(GradVacWeighting(beta=beta))

    def reset(self) -> None:
        self.gramian_weighting.targets = None


class GroupedGradVac(JacobianAggregator, Stateful, _Orders):
    """GradVac per group of columns of the Jacobian of the shared parameters (LibMTL's group types
    1 and 2); `mode: params` only. The task-gradient step tells it the columns (`bind_columns`).

    Args:
        beta: as `GradVacWeighting`.
        group_type: "all_layer" (one group per module) or "all_matrix" (one per parameter tensor).
    """

    modes: ClassVar[tuple[str, ...]] = ("params",)

    def __init__(self, beta: float = 0.5, group_type: str = "all_layer") -> None:
        super().__init__()
        _check(beta, group_type)
        if group_type == "whole_model":
            raise ValueError("GroupedGradVac groups the columns; use gradvac(group_type='whole_model') for one group")
        self.beta, self.group_type = float(beta), group_type
        self.sizes: list[int] | None = None  # columns per group
        self.targets: Tensor | None = None  # (groups, T, T) float64

    def bind_columns(self, names: Sequence[str], sizes: Sequence[int]) -> None:
        """The shared parameters' names and sizes, in the Jacobian's column order."""
        if self.group_type == "all_matrix":
            groups = [int(s) for s in sizes]
        else:
            groups, owners = [], []
            for name, size in zip(names, sizes, strict=True):
                owner = name.rsplit(".", 1)[0] if "." in name else ""
                if owners and owners[-1] == owner:
                    groups[-1] += int(size)
                else:
                    owners.append(owner)
                    groups.append(int(size))
        if self.sizes is not None and self.sizes != groups:
            raise ValueError(
                f"GradVac ({self.group_type}): the shared parameters changed from {len(self.sizes)} groups "
                f"to {len(groups)}; the targets of one run need one set of groups"
            )
        self.sizes = groups

    def combine(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        if self.sizes is None or sum(self.sizes) != jacobian.shape[1]:
            raise ValueError(
                f"balancer.aggregator.group_type={self.group_type} needs the shared parameters' columns "
                f"(TaskGradientStep in balancer.mode=params binds them); got a Jacobian of {jacobian.shape[1]} columns "
                f"and {'no groups' if self.sizes is None else f'groups of {sum(self.sizes)} columns'}"
            )
        n = jacobian.shape[0]
        if self.targets is None or self.targets.shape != (len(self.sizes), n, n):
            self.targets = torch.zeros(len(self.sizes), n, n, dtype=torch.float64)
        orders = self.orders(n)  # one order per task, the same for every group (as LibMTL)
        blocks = torch.split(jacobian, self.sizes, dim=1)
        gramians = torch.stack([(b @ b.T).double() for b in blocks]).cpu()  # float32 products, as LibMTL's
        coefficients = vaccinate(gramians, self.targets, orders, self.beta).sum(1)  # (K, T) weights per group
        parts = [w.to(b) @ b for w, b in zip(coefficients, blocks, strict=True)]
        share = torch.tensor(self.sizes, dtype=torch.float64) / jacobian.shape[1]
        weights = share @ coefficients  # logged: the groups' weights averaged by their sizes
        return torch.cat(parts), weights.float(), None

    def reset(self) -> None:
        self.targets = None


def gradvac(beta: float = 0.5, group_type: str = "whole_model") -> ReferenceAggregator | JacobianAggregator:
    """LibMTL's GradVac as a torchjd aggregator (see the module docstring): the Gramian weighting for
    `whole_model`, the per-group Jacobian aggregation for `all_layer` and `all_matrix`."""
    _check(beta, group_type)
    if group_type == "whole_model":
        return GradVac(beta=beta)
    return GroupedGradVac(beta=beta, group_type=group_type)
