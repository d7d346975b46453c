"""Equal weighting: the plain sum of the task losses (the "EW" baseline of LibMTL and most papers)."""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from mtl_vision.balancing.base import Balancer


class EqualWeighting(Balancer):
    """Every task loss weighted 1."""

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return {t: 1.0 for t in self.tasks}
