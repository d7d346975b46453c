"""FairGrad: Ban & Ji, Fair Resource Allocation in Multi-Task Learning, ICML 2024.

As OptMN-Lab/fairgrad computes it on NYUv2 and Cityscapes (methods/weight_methods.py `FairGrad`,
commit 2b8cba1; experiments/{nyuv2,cityscapes}/run.sh `--alpha=2.0`; `--max_norm` 1.0 of
experiments/utils.py): the weights w > 0 solve G w = w^(-1/alpha) for the float32 Gramian G
(scipy's `least_squares` from 1/T on the bounds (0, inf): torchjd's `FairGradWeighting`, which
computes exactly this); the shared update is T * sum_t w_t g_t (`scale: sum`, their
`overwrite_grad` "to match the sum loss"), then clipped to norm `max_norm` as torch's
`clip_grad_norm_` does (factor max_norm / (|g| + 1e-6) when below 1). Each task's backward leaves
its plain gradient on the task heads (`heads: plain`).

LibMTL (LibMTL/weighting/FairGrad.py, commit 4336804) back-propagates sum_t w_t L_t instead: no
factor T, no clipping, heads weighted by w (`scale: mean, max_norm: 0, heads: weighted`; its
default alpha is 1.0). torchjd's `FairGrad` aggregator is the LibMTL shared update.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd.aggregation import FairGradWeighting as _TorchjdFairGrad

from mtl_vision.balancing.reference import ReferenceAggregator, ReferenceWeighting, as_float32

SCALES = ("sum", "mean")


def clip_factor(weights: Tensor, gramian: Tensor, max_norm: float) -> Tensor:
    """The factor torch's `clip_grad_norm_` applies to the update sum_t weights_t g_t (weights (T,),
    Gramian (T, T) of the rows g_t, same dtype): min(1, max_norm / (|update| + 1e-6)); 1 for
    max_norm 0 (no clipping)."""
    if max_norm <= 0:
        return torch.ones((), dtype=weights.dtype, device=weights.device)
    norm = (weights @ gramian @ weights).clamp(min=0).sqrt()
    return (max_norm / (norm + 1e-6)).clamp(max=1.0)


class FairGradWeighting(ReferenceWeighting):
    """Args:
    alpha: the alpha of alpha-fairness (2.0 in their NYUv2 and Cityscapes runs; LibMTL's default 1.0;
        0 gives equal weights, as torchjd defines it).
    scale: "sum" multiplies the update by T (theirs), "mean" not (LibMTL).
    max_norm: the norm the shared update is clipped to (1.0, theirs); 0 = no clipping (LibMTL).

    `weigh` returns the shared weights (times T and the clip factor) and, for the heads, w itself
    (what LibMTL's weighted loss gives them; `heads: plain` ignores it, as the authors).
    """

    def __init__(self, alpha: float = 2.0, scale: str = "sum", max_norm: float = 1.0) -> None:
        super().__init__()
        if alpha < 0:
            raise ValueError(f"balancer.aggregator.alpha must be >= 0, got {alpha}")
        if scale not in SCALES:
            raise ValueError(f"balancer.aggregator.scale must be one of {list(SCALES)}, got {scale!r}")
        if max_norm < 0:
            raise ValueError(f"balancer.aggregator.max_norm must be >= 0 (0: no clipping), got {max_norm}")
        self.alpha, self.scale, self.max_norm = float(alpha), scale, float(max_norm)
        self.solver = _TorchjdFairGrad(alpha=self.alpha)

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        g32 = as_float32(gramian).cpu()  # their Gramian: float32, on the CPU for scipy
        w = self.solver(g32)
        shared = w * g32.shape[0] if self.scale == "sum" else w
        shared = shared * clip_factor(shared, g32, self.max_norm)
        return shared.to(gramian.device), w.to(gramian.device)


def fairgrad(alpha: float = 2.0, scale: str = "sum", max_norm: float = 1.0) -> ReferenceAggregator:
    """The authors' FairGrad as a torchjd aggregator (see the module docstring)."""
    return ReferenceAggregator(FairGradWeighting(alpha=alpha, scale=scale, max_norm=max_norm))
