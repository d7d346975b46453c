"""The balancer interface: how per-task losses become one training signal.

Two kinds share this base class. A *weighting* balancer (EW, fixed, uncertainty, DWA, GradNorm,
RLW, GLS, FAMO) turns the task losses into one scalar and trains with Lightning's automatic
optimisation. A *gradient* balancer (PCGrad, CAGrad, Nash-MTL, UPGrad, ...) needs the per-task
gradients and declares it with `needs_task_gradients = True`; the training module asks that
capability, never a name (see `balancing.gradient` and `engine.task_gradients`).

Distributed training: each process sees the mean losses of its own share of the batch, and DDP
averages the gradients. A weighting balancer keeps that exact when its total is linear in the
local losses, `sum_t w_t * L_t (+ terms of its own parameters)`, with weights computed from
values that are the same on every process. Balancers whose weights depend on the losses declare
`uses_global_losses = True`: `forward` then hands `task_weights` the losses averaged over
processes (one small all-reduce), which is what a single process would see on the global batch.
State (DWA history, FAMO logits, step counters) lives in buffers, so it is checkpointed, and is
updated from global values only, so it stays identical on every rank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mtl_vision.balancing.distributed import all_reduce_mean
from mtl_vision.tasks import check_task_keys, check_tasks


class Balancer(nn.Module, ABC):
    """Args:
        tasks: task names, in order.

    `forward({task: scalar loss}) -> scalar total`; `last_weights` holds the (detached) weights of
    the latest call, for logging as `train/weights/<task>`. Hooks the training module calls:
    `bind(model)` once before training, `after_step(losses)` after every optimiser step (with the
    losses recomputed on the same batch when `needs_losses_after_step`), `on_train_epoch_end()`.
    """

    needs_task_gradients: ClassVar[bool] = False
    uses_global_losses: ClassVar[bool] = False
    needs_losses_after_step: ClassVar[bool] = False

    def __init__(self, *, tasks: Sequence[str]) -> None:
        super().__init__()
        self.tasks = check_tasks(tasks, where=type(self).__name__)
        self.last_weights: dict[str, Tensor] = {}

    @abstractmethod
    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor | float]:
        """Weights of this step, {task: scalar}. `losses` are detached; averaged over processes
        when the balancer declares `uses_global_losses`."""

    def regularizer(self, losses: Mapping[str, Tensor]) -> Tensor | None:
        """A term of the balancer's own parameters added to the total (uncertainty's log-variances,
        GradNorm's gradient loss); None when there is none."""
        return None

    def reference_losses(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Detached losses as the balancer should see them: averaged over processes when it
        declares `uses_global_losses` (one all-reduce of a task-sized vector)."""
        stacked = torch.stack([losses[t].detach().float() for t in self.tasks])
        if self.uses_global_losses:
            stacked = all_reduce_mean(stacked)
        return {t: stacked[i] for i, t in enumerate(self.tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        check_task_keys(losses, self.tasks, what=f"{type(self).__name__} losses")
        reference = self.reference_losses(losses)
        weights = self.task_weights(reference)
        total = sum(weights[t] * losses[t] for t in self.tasks)
        extra = self.regularizer(reference)
        if extra is not None:
            total = total + extra
        self.last_weights = {t: torch.as_tensor(weights[t]).detach().float() for t in self.tasks}
        return total

    def bind(self, model: nn.Module) -> None:
        """Called once with the multi-task model before training; balancers that look at its
        parameters (GradNorm's layer, a gradient balancer's shared set) resolve them here."""

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        """Called after every optimiser step; `losses` (detached, global) are the losses of the
        same batch recomputed with the new weights when `needs_losses_after_step`, else None."""

    def on_train_epoch_end(self) -> None:
        """Called at the end of every training epoch."""

    def checkpoint_state(self) -> Any:
        """State outside parameters and buffers (a solver's warm start, say) that a checkpoint must
        carry for an exact resume; None when there is none."""
        return None

    def load_checkpoint_state(self, state: Any) -> None:
        """Restore what `checkpoint_state` returned."""
        raise NotImplementedError(f"{type(self).__name__} keeps no checkpoint state, got {type(state).__name__}")
