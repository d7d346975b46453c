"""The balancer interface: how per-task losses become one training signal.

Two kinds share this base class. A *weighting* balancer (EW, fixed, uncertainty, DWA, ...) turns
the task losses into one scalar and trains with Lightning's automatic optimisation. A *gradient*
balancer (PCGrad, CAGrad, Nash-MTL, ...) needs the per-task gradients and declares it with
`needs_task_gradients = True`; the training module asks that capability, never a name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from mtl_vision.tasks import check_task_keys, check_tasks


class Balancer(nn.Module, ABC):
    """Args:
        tasks: task names, in order.

    `forward({task: scalar loss}) -> scalar total`; `last_weights` holds the (detached) weights of
    the latest call, for logging as `train/weights/<task>`.
    """

    needs_task_gradients: ClassVar[bool] = False

    def __init__(self, *, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks, where=type(self).__name__)
        self.last_weights: dict[str, Tensor] = {}

    @abstractmethod
    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        """Weights of this step, {task: scalar}."""

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        check_task_keys(losses, self.tasks, what=f"{type(self).__name__} losses")
        weights = self.task_weights(losses)
        total = sum(weights[t] * losses[t] for t in self.tasks)
        self.last_weights = {t: torch.as_tensor(weights[t]).detach().float() for t in self.tasks}
        return total
