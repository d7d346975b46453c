"""ExcessMTL: He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi, Zhao, "Robust Multi-Task Learning with Excess
Risks", ICML 2024.

Each task's excess risk is estimated as E_t = sum_j g_tj^2 / sqrt(S_tj + 1e-7), with S the running
sum of the squared gradients (an AdaGrad-style diagonal Hessian, current step included); the task
weights take an exponentiated-gradient step on E_t relative to the first step's, alpha_t <-
alpha_t exp(eta E_t / E_t(1)), renormalised. Shared parameters and heads get sum_t alpha_t g_t.

Reference (the default): the authors' code, uiuctml/ExcessMTL LibMTL/LibMTL/weighting/ExcessMTL.py
(commit b179956021c9ac26f93f986a35d034ffea38f790; LibMTL's LibMTL/weighting/ExcessMTL.py at 4336804
is the same code): the weights start at 1 and are renormalised to sum T, the first step only records
E_t(1) (weights 1), the weighted loss is back-propagated (`heads: weighted`). eta: `--robust_step_size`,
1e-2 by default (their LibMTL/config.py; their README's Office-Home command uses 1).

This is torchjd's `ExcessMTL` with `n_warmup_steps=1` and its weights times T (`scale: sum`).
torchjd's default `n_warmup_steps=0` moves the weights already at the first step, by the raw E_t(1),
which grows with the number of parameters (on the fixtures: updates off by 67-100%); torchjd keeps
the weights on the simplex, from 1/T, as the paper writes, which scales the weights, the update and
the heads' gradients by 1/T (their ratios are the same; SGD then moves T times less). torchjd also
divides by E_t(1) + 1e-7 where the authors divide by E_t(1) (the exponent changes by a relative
1e-7 / E_t(1): negligible unless a task's gradient all but vanishes at the first step, where the
authors divide by zero), and updates the weights as a softmax of their logarithms (the same numbers
up to rounding). `warmup_steps` > 1 averages E_t(1) over that many first steps (the paper's
Appendix C.1 suggests 3 epochs); the authors use 1. The squared sums are per task and shared
parameter, so ExcessMTL runs in `mode: params` only (LibMTL's rep_grad variant, on batch-summed
feature gradients, is not offered).
"""

from __future__ import annotations

from torch import Tensor
from torchjd.aggregation import ExcessMTL as TorchJDExcessMTL
from torchjd.aggregation import ExcessMTLWeighting as TorchJDExcessMTLWeighting

SCALES = ("sum", "mean")


class _ScaledExcessMTLWeighting(TorchJDExcessMTLWeighting):
    """torchjd's ExcessMTL weighting, times T with `scale: sum` (the authors' weights, sum T)."""

    def __init__(self, robust_step_size: float, n_warmup_steps: int, scale: str) -> None:
        super().__init__(robust_step_size, n_warmup_steps)
        self.scale = scale
        # torchjd keeps its state in buffers that start as None, so a checkpoint's state_dict would
        # name tensors a fresh balancer (mtl-eval) lacks; the state travels in the pickled
        # aggregator instead (GradientBalancer.checkpoint_state)
        self._non_persistent_buffers_set.update(self._buffers)

    def forward(self, matrix: Tensor, /) -> Tensor:
        weights = super().forward(matrix)
        return weights * matrix.shape[0] if self.scale == "sum" else weights.clone()


class ExcessMTL(TorchJDExcessMTL):
    """Args:
    robust_step_size: eta, the exponentiated step (the authors' `--robust_step_size`, 1e-2), > 0.
    warmup_steps: first steps that only collect E_t(1) (their mean) with equal weights (1, the
        authors'; 0 is torchjd's default, which steps already on the first call).
    scale: "sum" (weights sum to T, from 1: the authors', LibMTL) or "mean" (sum 1, from 1/T: torchjd,
        the paper).

    State (torchjd's): the squared-gradient sums (T, P), E_t(1), the weights, the step count."""

    def __init__(self, robust_step_size: float = 1e-2, warmup_steps: int = 1, scale: str = "sum") -> None:
        if not robust_step_size > 0:
            raise ValueError(f"balancer.aggregator.robust_step_size must be > 0, got {robust_step_size}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"balancer.aggregator.warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if scale not in SCALES:
            raise ValueError(f"balancer.aggregator.scale must be one of {list(SCALES)}, got {scale!r}")
        super().__init__(robust_step_size, warmup_steps)
        self.weighting = _ScaledExcessMTLWeighting(robust_step_size, warmup_steps, scale)

    @property
    def warmup_steps(self) -> int:
        return self.n_warmup_steps

    @property
    def scale(self) -> str:
        return self.weighting.scale
