"""The interfaces of the gradient aggregations written after their authors' code, on top of torchjd.

A torchjd weighting maps the Gramian J J^T (T x T) to weights (T,). The authors' methods need two
things more, so these weightings also offer `weigh(gramian, losses) -> (shared (T,), heads (T,))`:
the losses of the step (MGDA's `loss` / `loss+` normalisation) and separate weights for the task
heads (Nash-MTL clips only the shared gradient; its heads keep the unclipped weights).
`GradientBalancer` calls `weigh` when a weighting has it.

Some methods are not a function of the Gramian: they keep state per shared parameter (DB-MTL's and
MoCo's moving averages of the task gradients, ExcessMTL's accumulated squares) or return a vector
that is no combination of the step's rows. They are `JacobianAggregator`s: `combine(jacobian,
losses) -> (vector, weights, heads)` sees the (T, P) Jacobian of the shared parameters. Their state
is sized by the shared parameters, so they run in `mode: params` only (`modes`), as their authors'
code (LibMTL refuses them with representation gradients).
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from torch import Tensor
from torchjd.aggregation import Aggregator, GramianWeightedAggregator, Weighting


class ReferenceWeighting(Weighting):
    """A Gramian weighting that can also read the losses and weigh the heads separately."""

    @abstractmethod
    def weigh(self, gramian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(T, T) Gramian, optional (T,) losses -> (weights of the shared gradient, weights of the
        task heads), both (T,) in the Gramian's dtype."""

    def weigh_rows(self, jacobian: Tensor, losses: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """As `weigh`, from the (T, P) float32 Jacobian itself, for weightings whose authors form
        their products from the gradients in an order the Gramian cannot reproduce where it
        matters (an ill-conditioned solve); None (the default) = use `weigh`. Called in `mode:
        params`, where the rows are the same on every process."""
        return None

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


class JacobianAggregator(Aggregator):
    """An aggregation that reads the Jacobian itself (see the module docstring).

    `modes`: the `GradientBalancer` modes it supports; `needs_losses`: whether `combine` reads the
    step's task losses (then `losses` is never None)."""

    modes: ClassVar[tuple[str, ...]] = ("params",)
    needs_losses: ClassVar[bool] = False

    @abstractmethod
    def combine(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(T, P) float32 Jacobian, optional (T,) losses -> (update (P,), weights (T,) for logging,
        head weights (T,) or None for the plain sum of the heads' gradients)."""

    def forward(self, matrix: Tensor, /) -> Tensor:
        return self.combine(matrix, None)[0]


def as_float32(gramian: Tensor) -> Tensor:
    """The Gramian in float32, the dtype the authors' code computes it in from float32 gradients
    (exact when it was formed in float32 and only stored in float64)."""
    return gramian.detach().to(torch.float32)
