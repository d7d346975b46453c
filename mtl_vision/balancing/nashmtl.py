"""Nash-MTL: Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022.

As AvivNavon/nash-mtl computes it (methods/weight_methods.py `NashMTL`, commit cce1840; LibMTL's
Nash_MTL is the same): the Gramian G = J J^T (float32) is divided by its Frobenius norm; the
weights alpha solve G alpha = 1/alpha by `optim_niter` convex-concave steps (cvxpy, ECOS, warm
started from the previous step's alpha, stopping when |G alpha - 1/alpha| < 1e-3 or alpha moves
less than 1e-6), recomputed every `update_weights_every` steps. The authors back-propagate
sum_t alpha_t L_t, so the task heads get alpha_t times their gradient (`heads: weighted` in the
balancer), then clip the shared parameters' gradient to `max_norm` with torch's clip_grad_norm_
(factor max_norm / (|g| + 1e-6) when below 1): only the shared weights are clipped.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32


class NashMTLWeighting(ReferenceWeighting, Stateful):
    """Args:
    n_tasks: the number of tasks.
    max_norm: the norm the shared gradient is clipped to (0: no clipping); 1.0 as theirs.
    update_weights_every: solve every this many steps, reuse the weights in between (1, theirs).
    optim_niter: convex-concave iterations per solve (20, theirs).
    """

    def __init__(self, n_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20):
        super().__init__()
        if n_tasks < 1 or max_norm < 0 or update_weights_every < 1 or optim_niter < 1:
            raise ValueError(
                "balancer.aggregator needs n_tasks >= 1, max_norm >= 0, update_weights_every >= 1, optim_niter >= 1; "
                f"got {n_tasks}, {max_norm}, {update_weights_every}, {optim_niter}"
            )
        self.n_tasks, self.max_norm = int(n_tasks), float(max_norm)
        self.update_weights_every, self.optim_niter = int(update_weights_every), int(optim_niter)
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.prvs_alpha = np.ones(self.n_tasks, dtype=np.float32)
        self._problem = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_problem"] = None  # rebuilt on demand: every solve sets all its parameters
        return state

    def _build(self) -> None:
        n = self.n_tasks
        alpha = cp.Variable(shape=(n,), nonneg=True)
        previous = cp.Parameter(shape=(n,), value=self.prvs_alpha)
        gtg = cp.Parameter(shape=(n, n), value=np.eye(n))
        norm = cp.Parameter(shape=(1,), value=np.array([1.0]))
        g_alpha = gtg @ alpha
        slope = 1 / previous + (1 / (gtg @ previous)) @ gtg  # gradient of the concave part at `previous`
        constraints = [-cp.log(alpha[i] * norm) - cp.log(g_alpha[i]) <= 0 for i in range(n)]
        objective = cp.Minimize(cp.sum(g_alpha) + slope @ (alpha - previous) / norm)
        self._problem = (cp.Problem(objective, constraints), alpha, previous, gtg, norm)

    def _solve(self, gtg: np.ndarray, factor: np.ndarray) -> np.ndarray:
        if self._problem is None:
            self._build()
        problem, alpha, previous, g_param, norm = self._problem
        g_param.value = gtg
        norm.value = factor
        current = self.prvs_alpha
        for _ in range(self.optim_niter):
            alpha.value = current
            previous.value = current
            try:
                problem.solve(solver=cp.ECOS, warm_start=True, max_iters=100)
            except (cp.error.SolverError, ValueError):
                alpha.value = previous.value
            if (
                alpha.value is None
                or np.linalg.norm(gtg @ current - 1 / (current + 1e-10)) < 1e-3
                or np.linalg.norm(alpha.value - previous.value) < 1e-6
            ):
                break
            current = alpha.value
        if current is not None:
            self.prvs_alpha = current
        return self.prvs_alpha

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g32 = as_float32(gramian).cpu()
        if self.step % self.update_weights_every == 0:
            factor = torch.norm(g32).numpy().reshape((1,))
            alpha = self._solve((g32 / factor.item()).numpy(), factor)
        else:
            alpha = self.prvs_alpha
        self.step += 1
        heads = torch.from_numpy(np.asarray(alpha)).to(torch.float32)
        shared = heads
        if self.max_norm > 0:
            norm = (heads @ g32 @ heads).clamp(min=0).sqrt()
            shared = heads * (self.max_norm / (norm + 1e-6)).clamp(max=1.0)
        return shared.to(gramian.device), heads.to(gramian.device)


class NashMTL(ReferenceAggregator, Stateful):
    """The authors' Nash-MTL as a torchjd aggregator (see the module docstring)."""

    gramian_weighting: NashMTLWeighting

    def __init__(self, n_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20):
        super().__init__(NashMTLWeighting(n_tasks, max_norm, update_weights_every, optim_niter))

    def reset(self) -> None:
        self.gramian_weighting.reset()
