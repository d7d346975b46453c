"""Fixed, hand-tuned loss weights, as the reference papers use them (e.g. InvPT on NYUD:
semseg 1, depth 1, normals 10, edge 50). The dataset configs carry each paper's weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from mtl_vision.balancing.base import Balancer


class FixedWeighting(Balancer):
    """Args:
        tasks: task names.
        weights: {task: weight}; must cover every trained task (entries for other tasks are
            ignored, so one dataset table serves every task subset).
    """

    def __init__(self, *, tasks: Sequence[str], weights: Mapping[str, float]) -> None:
        super().__init__(tasks=tasks)
        missing = [t for t in self.tasks if t not in weights]
        if missing:
            raise ValueError(f"balancer.weights has no weight for tasks {missing}; given: {dict(weights)}")
        bad = {t: weights[t] for t in self.tasks if not float(weights[t]) >= 0}
        if bad:
            raise ValueError(f"balancer.weights must be non-negative numbers, got {bad}")
        self.weights = {t: float(weights[t]) for t in self.tasks}

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, float]:
        return dict(self.weights)
