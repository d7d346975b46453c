"""The interface of the gradient weightings written after their authors' code (Aligned-MTL, MGDA,
CAGrad, Nash-MTL), on top of torchjd's `Weighting`.

A torchjd weighting maps the Gramian J J^T (T x T) to weights (T,). The authors' methods need two
things more, so these weightings also offer `weigh(gramian, losses) -> (shared (T,), heads (T,))`:
the losses of the step (MGDA's `loss` / `loss+` normalisation) and separate weights for the task
heads (Nash-MTL clips only the shared gradient; its heads keep the unclipped weights).
`GradientBalancer` calls `weigh` when a weighting has it.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor
from torchjd.aggregation import GramianWeightedAggregator, Weighting


class ReferenceWeighting(Weighting):
    """A Gramian weighting that can also read the losses and weigh the heads separately."""

    @abstractmethod
    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(T, T) Gramian, optional (T,) losses -> (weights of the shared gradient, weights of the
        task heads), both (T,) in the Gramian's dtype."""

    def forward(self, gramian: Tensor, /) -> Tensor:
        return self.weigh(gramian)[0]


class ReferenceAggregator(GramianWeightedAggregator):
    """torchjd aggregator around a `ReferenceWeighting` (so that `GradientBalancer` sees a torchjd
    Gramian-weighted aggregator)."""

    gramian_weighting: ReferenceWeighting

    def __init__(self, weighting: ReferenceWeighting) -> None:
        super().__init__(weighting)

    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shared, heads = self.gramian_weighting.weigh(gramian, losses)
        return shared.to(gramian.dtype), heads.to(gramian.dtype)


def as_float32(gramian: Tensor) -> Tensor:
    """The Gramian in float32, the dtype the authors' code computes it in from float32 gradients
    (exact when it was formed in float32 and only stored in float64)."""
    return gramian.detach().to(torch.float32)
