"""ConFIG: Liu, Chu, Thuerey, ConFIG: Towards Conflict-free Training of Physics Informed Neural
Networks, ICLR 2025.

As tum-pbs/ConFIG computes it (conflictfree/grad_operator.py `ConFIGOperator` with its defaults,
`ConFIG_update` / `ConFIG_update_double`, length_model.py `ProjectionLength`, weight_model.py
`EqualWeight`; commit 9486243), which their multi-task experiments use (experiments/MTL/methods/
weight_methods.py `ConFIG`: the operator's defaults on the shared parameters, the heads the gradient of
the summed loss): with the unit gradients u_i = g_i / |g_i| (0 for a zero gradient), the direction d
is the least-norm solution of u_i . d = 1 for every i, and the update is (sum_i g_i . d/|d|) d/|d|.

d lies in the span of the gradients, d = J^T D^-1 C^+ 1 with D = diag(|g_i|) and C the cosine matrix
D^-1 G D^-1, so the update is a Gramian weighting (both modes, exact under DDP): weights
a (1^T G a) / (a^T G a) with a = D^-1 C^+ 1. Their code solves it with `torch.linalg.lstsq` on the
unit rows (T >= 3) or with the closed form of two gradients (T = 2), equal in exact arithmetic.
The pseudo-inverse drops the eigenvalues of C below T * eps(float32) * max(eigenvalue) (the precision
of a Gramian formed in float32): on a nearly rank-deficient set this gives the least-squares
direction their CPU run gives (LAPACK gelsy, whose cut-off eps(float32) * max(T, P) on the singular
values grows with the number of parameters P: at P = 1e7 it leaves rank 1 even of well-conditioned
gradients, so their CPU code is no reference there; on CUDA `lstsq` makes no cut at all).

M-ConFIG (`momentum: true`; their `MConFIG`, conflictfree/momentum_operator.py
`PseudoMomentumOperator` around `ConFIGOperator`): each step updates the first moment m_i of
`num_updates` tasks, taken in turn (their `OrderedSliceSelector`), returns 0 until every task has
been seen once, then applies ConFIG to the bias-corrected moments m_i / (1 - beta_1^{t_i}) and divides
the result by sqrt(s_hat) + 1e-8, s the second moment of a pseudo-gradient recovered from the
step's ConFIG result (their trainer pairs it with SGD). Its state is per shared parameter
((T + 2) x P numbers), so it runs in `mode: params` only. The authors' saving, back-propagating only
the selected tasks, would need the task-gradient step to differentiate those tasks alone; here all
T gradients are formed and the others unused (the update is theirs, the cost ConFIG's).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.reference import JacobianAggregator, ReferenceAggregator, ReferenceWeighting

EPS32 = torch.finfo(torch.float32).eps


class ConFIGWeighting(ReferenceWeighting):
    """The authors' ConFIG update as weights of the task gradients, from the Gramian (float64, CPU)."""

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g = gramian.detach().double().cpu()
        n = g.shape[0]
        norms = g.diagonal().clamp(min=0).sqrt()
        inv = torch.where(norms > 0, 1 / norms.clamp(min=torch.finfo(g.dtype).tiny), torch.zeros_like(norms))
        cosines = inv.view(-1, 1) * g * inv.view(1, -1)
        values, vectors = torch.linalg.eigh(cosines)
        keep = values > values.max().clamp(min=0) * n * EPS32
        direction = inv * ((vectors[:, keep] / values[keep]) @ (vectors[:, keep].T @ torch.ones_like(norms)))
        squared = direction @ g @ direction  # |d|^2
        if not bool(squared > 0):  # no direction (all gradients zero): their unit_vector gives 0
            weights = torch.zeros_like(norms)
        else:
            weights = direction * (g @ direction).sum() / squared
        weights = weights.to(gramian)
        return weights, torch.ones_like(weights)


class MomentumConFIG(JacobianAggregator, Stateful):
    """M-ConFIG on the Jacobian of the shared parameters (see the module docstring).

    Args:
        num_updates: tasks whose moment is updated per step (their `--num_updates`, 1).
        beta_1, beta_2: the moments' decays (their `PseudoMomentumOperator` defaults, 0.9 and 0.999).
    """

    modes: ClassVar[tuple[str, ...]] = ("params",)

    def __init__(self, num_updates: int = 1, beta_1: float = 0.9, beta_2: float = 0.999) -> None:
        super().__init__()
        if num_updates < 1:
            raise ValueError(f"balancer.aggregator.num_updates must be >= 1, got {num_updates}")
        for key, value in (("beta_1", beta_1), ("beta_2", beta_2)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"balancer.aggregator.{key} must be in [0, 1), got {value}")
        self.num_updates, self.beta_1, self.beta_2 = int(num_updates), float(beta_1), float(beta_2)
        self.weighting = ConFIGWeighting()
        self.reset()

    def reset(self) -> None:
        self.m: Tensor | None = None  # (T, P) first moments
        self.s: Tensor | None = None  # (P,) second moment of the pseudo-gradient
        self.fake_m: Tensor | None = None  # (P,) the previous step's pseudo first moment
        self.t = 0
        self.seen: list[int] = []  # per task, how many times its moment was updated
        self.start = 0  # the next task in turn

    def _select(self, n: int) -> list[int]:
        if self.num_updates > n:
            raise ValueError(f"balancer.aggregator.num_updates={self.num_updates} exceeds the {n} tasks")
        chosen = [(self.start + k) % n for k in range(self.num_updates)]
        self.start = (self.start + self.num_updates) % n
        return chosen

    def combine(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        n = jacobian.shape[0]
        if self.m is None or self.m.shape != jacobian.shape:
            self.m = torch.zeros_like(jacobian)
            self.s, self.fake_m = torch.zeros_like(jacobian[0]), torch.zeros_like(jacobian[0])
            self.seen = [0] * n
        for i in self._select(n):
            self.seen[i] += 1
            self.m[i] = self.beta_1 * self.m[i] + (1 - self.beta_1) * jacobian[i]
        if min(self.seen) == 0:
            return torch.zeros_like(jacobian[0]), torch.zeros(n, device=jacobian.device), None
        self.t += 1
        corrections = torch.tensor(
            [1 - self.beta_1**k for k in self.seen], dtype=jacobian.dtype, device=jacobian.device
        )
        moments = self.m / corrections.view(-1, 1)
        weights = self.weighting.weigh((moments @ moments.T).double())[0].to(moments)
        update = weights @ moments
        fake_m = update * (1 - self.beta_1**self.t)
        fake_grad = (fake_m - self.beta_1 * self.fake_m) / (1 - self.beta_1)
        self.fake_m = fake_m
        self.s = self.beta_2 * self.s + (1 - self.beta_2) * fake_grad**2
        s_hat = self.s / (1 - self.beta_2**self.t)
        return update / (s_hat.sqrt() + 1e-8), weights, None


def config(
    momentum: bool = False, num_updates: int = 1, beta_1: float = 0.9, beta_2: float = 0.999
) -> ReferenceAggregator | JacobianAggregator:
    """The authors' ConFIG as a torchjd aggregator, or M-ConFIG with `momentum` (module docstring)."""
    if momentum:
        return MomentumConFIG(num_updates=num_updates, beta_1=beta_1, beta_2=beta_2)
    return ReferenceAggregator(ConFIGWeighting())
