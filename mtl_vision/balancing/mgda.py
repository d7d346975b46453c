"""MGDA: Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018.

As isl-org/MultiObjectiveOptimization computes it (multi_task/min_norm_solvers.py
`MinNormSolver.find_min_norm_element` and `gradient_normalizers`, multi_task/train_multi_task.py,
commit bf5bbb3): the task gradients are first divided by a normaliser (`l2`: their norm, `loss`:
the loss, `loss+`: loss times norm, `none`; their shipped config sample.json uses `loss+`, the
paper none); the min-norm point of their convex hull starts from the best pair (closed form, with
the weights clipped to 0.999/0.001 at the ends) and moves by projected gradient steps with an exact
line search until the L1 change of the weights is below 1e-5 (their MAX_ITER is never counted, so
they iterate to convergence; here at most `max_iter` steps). The update is sum_t w_t g_t of the
UNnormalised gradients, and the heads get w_t times their gradient (they back-propagate
sum_t w_t L_t). The inner products are float32 (their torch dot products), the rest float64
(their numpy), as their code computes under the torch of its time (0.3/0.4, where `.sum()` gave a
Python float; scripts/balancer_fixtures/mgda.py says how it is run under torch 2).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

NORMALIZATIONS = ("l2", "loss", "loss+", "none")
STOP = 1e-5


def _pair(v11, v12, v22):
    """min over c of |c x1 + (1-c) x2|^2 from the three inner products -> (c, cost)."""
    if v12 >= v11:
        return 0.999, v11
    if v12 >= v22:
        return 0.001, v22
    c = -1.0 * ((v12 - v22) / (v11 + v22 - 2 * v12))
    return c, v22 + c * (v12 - v22)


def _to_simplex(y: np.ndarray) -> np.ndarray:
    """Euclidean projection of y onto the probability simplex (their sort-and-threshold rule)."""
    m = len(y)
    ordered = np.flip(np.sort(y), axis=0)
    total, shift = 0.0, (np.sum(y) - 1.0) / m
    for i in range(m - 1):
        total += ordered[i]
        candidate = (total - 1) / (i + 1.0)
        if candidate > ordered[i + 1]:
            shift = candidate
            break
    return np.maximum(y - shift, np.zeros(y.shape))


def _step(current: np.ndarray, direction: np.ndarray, n: int) -> np.ndarray:
    """The farthest point along the projected direction that stays in the box, projected."""
    proj = direction - (np.sum(direction) / n)
    to_zero = -1.0 * current[proj < 0] / proj[proj < 0]
    to_one = (1.0 - current[proj > 0]) / (proj[proj > 0])
    t = 1
    if len(to_zero[to_zero > 1e-7]) > 0:
        t = np.min(to_zero[to_zero > 1e-7])
    if len(to_one[to_one > 1e-7]) > 0:
        t = min(t, np.min(to_one[to_one > 1e-7]))
    return _to_simplex(proj * t + current)


def min_norm_weights(gramian32: Tensor, max_iter: int = 100_000) -> np.ndarray:
    """(T, T) float32 Gramian -> (T,) float64 weights of the min-norm point of the hull."""
    n = gramian32.shape[0]
    mat = gramian32.cpu().double().numpy()  # float32 inner products, float64 from here on
    best = None
    for i in range(n):
        for j in range(i + 1, n):
            c, cost = _pair(float(mat[i, i]), float(mat[i, j]), float(mat[j, j]))
            if best is None or cost < best[2]:
                best = ((i, j), c, cost)
    (i, j), c, _ = best
    sol = np.zeros(n)
    sol[i] = c
    sol[j] = 1 - c
    if n < 3:
        return sol
    for _ in range(max_iter):
        new = _step(sol, -1.0 * np.dot(mat, sol), n)
        v11 = v12 = v22 = 0.0
        for a in range(n):
            for b in range(n):
                v11 += sol[a] * sol[b] * mat[a, b]
                v12 += sol[a] * new[b] * mat[a, b]
                v22 += new[a] * new[b] * mat[a, b]
        nc, _ = _pair(v11, v12, v22)
        candidate = nc * sol + (1 - nc) * new
        if np.sum(np.abs(candidate - sol)) < STOP:
            return sol
        sol = candidate
    return sol


class MGDAWeighting(ReferenceWeighting):
    """Args:
    normalization: "loss+" (the authors' config), "l2", "loss" or "none" (the paper's).
    max_iter: bound on the projected-gradient steps (the authors' loop has none).
    """

    def __init__(self, normalization: str = "loss+", max_iter: int = 100_000) -> None:
        super().__init__()
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"balancer.aggregator.normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}"
            )
        self.normalization = normalization
        self.max_iter = int(max_iter)

    def normalizers(self, gramian32: Tensor, losses: Tensor | None) -> Tensor:
        """(T,) float32 divisors of the task gradients."""
        if self.normalization == "none":
            return torch.ones(len(gramian32), dtype=torch.float32)
        if self.normalization in ("loss", "loss+") and losses is None:
            raise ValueError(f"balancer.aggregator.normalization={self.normalization!r} needs the task losses")
        norms = gramian32.diagonal().cpu().sqrt()
        if self.normalization == "l2":
            return norms
        loss = losses.detach().cpu().to(torch.float32)
        return loss if self.normalization == "loss" else loss * norms

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g = as_float32(gramian)
        div = self.normalizers(g, losses).to(g.device)
        scaled = g / (div.view(-1, 1) * div.view(1, -1))
        weights = torch.from_numpy(min_norm_weights(scaled, self.max_iter)).to(torch.float32).to(g.device)
        return weights, weights


def mgda(normalization: str = "loss+", max_iter: int = 100_000) -> ReferenceAggregator:
    """The authors' MGDA as a torchjd aggregator (see the module docstring)."""
    return ReferenceAggregator(MGDAWeighting(normalization=normalization, max_iter=max_iter))
