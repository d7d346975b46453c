"""SDMGrad: Xiao, Ban & Ji, Direction-oriented Multi-objective Learning: Simple and Provable
Stochastic Algorithms, NeurIPS 2023.

As OptMN-Lab/sdmgrad computes it on NYUv2 and Cityscapes (methods/weight_methods.py `SDMGrad`,
experiments/nyuv2/trainer.py, commit 8333f9e; experiments/{nyuv2,cityscapes}/run.sh `--lamda=0.3
--niter=20`; `--max_norm` 1.0 of experiments/utils.py). Their trainer stacks the losses of three
batches, the step's and two of a second loader (the paper's zeta, xi, xi'), and backpropagates each.
Their gradient buffers are `[tensor] * 3`, three names of one matrix, so every product their code
forms uses the gradients of the last batch alone; on one batch this is exactly:

- A = G / s^2, s = mean_t sqrt(G_tt + 1e-4), with the float32 Gramian G = J J^T;
- from the previous step's task weights w (1/T at the start), `niter` steps of SGD (lr 10,
  momentum 0.5, a new optimiser every step) on the gradient A w + lamda A 1/T, each followed by the
  Euclidean projection onto the simplex (in float64, then float32, as theirs);
- the update T (sum_t w_t g_t + lamda mean_t g_t) / (1 + lamda) (`scale: sum`: their
  `overwrite_grad` "to match the sum loss"), clipped to `max_norm` as torch's `clip_grad_norm_`.

Task heads: each of their 3T backward passes leaves its gradient on the heads, so a head gets the
sum of its task's gradients over the three batches. With one batch per step (all that the training
step has) the heads get `head_batches` (3) times their task's gradient, the same expectation (and
exactly theirs when the three batches are one).

LibMTL (LibMTL/weighting/SDMGrad.py, commit 4336804) differs in constants: lr 5, s from the
diagonal clipped at 0 and A = G / (s^2 + 1e-8) (`normalization: libmtl`), no factor T and no
clipping (`scale: mean, max_norm: 0`), and its three buffers are distinct (with three independent
batches, a difference this step cannot reproduce). torchjd's `SDMGradWeighting` is LibMTL's
normalisation with the projection in the matrix's dtype, no factor T and no clipping.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.fairgrad import SCALES, clip_factor
from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

NORMALIZATIONS = ("authors", "libmtl")


def project_onto_simplex(v: Tensor) -> Tensor:
    """The Euclidean projection of v (T,) onto {w >= 0, sum w = 1} (sort and threshold, Duchi et
    al. 2008), computed in float64 and returned in v's dtype."""
    x = v.double()
    if float(x.sum()) == 1.0 and bool((x >= 0).all()):
        return x.to(v.dtype)
    ordered = x.sort(descending=True).values
    partial = ordered.cumsum(0)
    ranks = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    last = int(torch.nonzero(ordered * ranks > partial - 1.0)[-1])
    theta = float(partial[last] - 1.0) / (last + 1)
    return (x - theta).clamp(min=0).to(v.dtype)


class SDMGradWeighting(ReferenceWeighting, Stateful):
    """Args:
    n_tasks: the number of tasks.
    lamda: the pull towards the mean gradient (their `--lamda`; 0.3 in their runs and LibMTL's).
    niter: SGD steps on the task weights per training step (20).
    lr: their SGD's learning rate (10, theirs; 5, LibMTL's).
    momentum: their SGD's momentum (0.5, both).
    normalization: "authors" (s = mean sqrt(G_tt + 1e-4), A = G / s^2; in `mode: params` G is
        formed in their order, see `weigh_rows`) or "libmtl" (diagonal clipped at 0,
        A = G / (s^2 + 1e-8), G = J J^T as LibMTL forms it).
    scale: "sum" multiplies the update by T (theirs), "mean" not (LibMTL).
    max_norm: the norm the shared update is clipped to (1.0, theirs); 0 = no clipping (LibMTL).
    head_batches: the weight of each task's gradient on the heads under `heads: weighted`: their step
        sums the heads' gradients of three batches (3); 1 = the gradient of the step's batch.

    The task weights w carry from step to step (`reset` restarts them at 1/T); the aggregator is
    checkpointed whole.
    """

    def __init__(
        self,
        n_tasks: int,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        normalization: str = "authors",
        scale: str = "sum",
        max_norm: float = 1.0,
        head_batches: int = 3,
    ) -> None:
        super().__init__()
        checks = {
            "n_tasks": (n_tasks, n_tasks >= 1, ">= 1"),
            "lamda": (lamda, lamda >= 0, ">= 0"),
            "niter": (niter, niter >= 1, ">= 1"),
            "lr": (lr, lr > 0, "> 0"),
            "momentum": (momentum, 0 <= momentum < 1, "in [0, 1)"),
            "max_norm": (max_norm, max_norm >= 0, ">= 0 (0: no clipping)"),
            "head_batches": (head_batches, head_batches >= 1, ">= 1"),
        }
        for key, (value, ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"balancer.aggregator.{key} must be {expected}, got {value}")
        if normalization not in NORMALIZATIONS:
            raise ValueError(
                f"balancer.aggregator.normalization must be one of {list(NORMALIZATIONS)}, got {normalization!r}"
            )
        if scale not in SCALES:
            raise ValueError(f"balancer.aggregator.scale must be one of {list(SCALES)}, got {scale!r}")
        self.n_tasks, self.lamda, self.niter = int(n_tasks), float(lamda), int(niter)
        self.lr, self.momentum, self.normalization = float(lr), float(momentum), normalization
        self.scale, self.max_norm, self.head_batches = scale, float(max_norm), int(head_batches)
        self.reset()

    def reset(self) -> None:
        self.w = torch.full((self.n_tasks,), 1.0 / self.n_tasks, dtype=torch.float32)

    def _normalised(self, gramian: Tensor) -> Tensor:
        if self.normalization == "authors":
            return gramian / (gramian.diagonal() + 1e-4).sqrt().mean().pow(2)
        size = gramian.diagonal().clamp(min=0).sqrt().mean()
        return gramian / (size.pow(2) + 1e-8)

    def weigh_rows(self, jacobian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """`weigh` on the Gramian formed as the authors' code forms it: their gradients are the
        columns of a (P, T) buffer, multiplied as `buffer.t().mm(buffer)`. Their inner SGD (lr 10)
        does not converge in `niter` steps, so its result follows the last bits of G: a Gramian
        summed in another order moves the weights by up to ~1e-3 (LibMTL multiplies the (T, P)
        rows, our Gramian's order, so `normalization: libmtl` uses that)."""
        if self.normalization != "authors":
            return None
        columns = jacobian.float().t().contiguous()
        return self.weigh(columns.t().mm(columns))

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g32 = as_float32(gramian).cpu()
        n = g32.shape[0]
        if n != self.n_tasks:
            raise ValueError(f"SDMGrad was built for {self.n_tasks} tasks, got a {n} x {n} Gramian")
        a = self._normalised(g32)
        pull = a.mean(dim=1)
        w, velocity = self.w.clone(), None
        for _ in range(self.niter):  # torch's SGD step (no dampening, no decay), then the projection
            step = torch.mv(a, w) + self.lamda * pull
            velocity = step.clone() if velocity is None else velocity.mul(self.momentum).add(step)
            w = project_onto_simplex(w.add(velocity, alpha=-self.lr))
        self.w = w
        shared = (w + self.lamda / n) / (1 + self.lamda)
        if self.scale == "sum":
            shared = shared * n
        shared = shared * clip_factor(shared, g32, self.max_norm)
        heads = torch.full_like(shared, float(self.head_batches))
        return shared.to(gramian.device), heads.to(gramian.device)


class SDMGrad(ReferenceAggregator, Stateful):
    """The authors' SDMGrad as a torchjd aggregator (see the module docstring)."""

    gramian_weighting: SDMGradWeighting

    def __init__(
        self,
        n_tasks: int,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 10.0,
        momentum: float = 0.5,
        normalization: str = "authors",
        scale: str = "sum",
        max_norm: float = 1.0,
        head_batches: int = 3,
    ) -> None:
        super().__init__(
            SDMGradWeighting(n_tasks, lamda, niter, lr, momentum, normalization, scale, max_norm, head_batches)
        )

    def reset(self) -> None:
        self.gramian_weighting.reset()
