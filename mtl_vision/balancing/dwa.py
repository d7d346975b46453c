"""Dynamic weight average: Liu, Johns, Davison, "End-to-End Multi-Task Learning with Attention"
(MTAN), CVPR 2019.

With `L_t(k)` the mean training loss of task t over window k (an epoch, as in the paper, or a fixed
number of optimiser steps), the weights of window k are `w_t = T * softmax(r / temperature)_t`,
`r_t = L_t(k-1) / L_t(k-2)`, and 1 for every task until two windows are complete: as lorenmt/mtan
im2im_pred/utils.py `multi_task_trainer` (commit c36c30baa18968dec74fe9039abcfd4f132edfa1) and
LibMTL LibMTL/weighting/DWA.py (commit 4336804847eaa5e0b924b743d76beec7ac3fdc97) with epoch windows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from mtl_vision.balancing.base import Balancer


class DynamicWeightAverage(Balancer):
    """Args:
        tasks: task names.
        temperature: softmax temperature (2 in the paper); larger is closer to equal weights.
        every_n_steps: window length in optimiser steps; None uses training epochs (the paper).

    Buffers (checkpointed, identical on every process since they see only global losses):
    `loss_sum` (T,) and `loss_count` () of the current window, `history` (2, T) with the means of
    windows k-2 and k-1, `windows` () the number of completed windows (capped at 2), `steps` ().
    Losses are accumulated only in training mode, so a validation call leaves the history alone.
    """

    uses_global_losses = True

    def __init__(self, *, tasks: Sequence[str], temperature: float = 2.0, every_n_steps: int | None = None) -> None:
        super().__init__(tasks=tasks)
        if not float(temperature) > 0:
            raise ValueError(f"balancer.temperature must be > 0, got {temperature!r}")
        if every_n_steps is not None and (
            isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1
        ):
            raise ValueError(f"balancer.every_n_steps must be a positive integer or null, got {every_n_steps!r}")
        self.temperature = float(temperature)
        self.every_n_steps = every_n_steps
        n = len(self.tasks)
        self.register_buffer("loss_sum", torch.zeros(n))
        self.register_buffer("loss_count", torch.zeros(()))
        self.register_buffer("history", torch.ones(2, n))
        self.register_buffer("windows", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        current = torch.stack([losses[t] for t in self.tasks]).to(self.loss_sum)
        if self.training:
            with torch.no_grad():
                self.loss_sum += current
                self.loss_count += 1
        n = len(self.tasks)
        if int(self.windows) < 2:
            weights = torch.ones(n, device=current.device)
        else:
            # A zero mean loss in window k-2 would divide by zero; the clamp keeps r finite.
            ratio = self.history[1] / self.history[0].clamp_min(1e-12)
            weights = n * torch.softmax(ratio / self.temperature, dim=0)
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    @torch.no_grad()
    def _close_window(self) -> None:
        if float(self.loss_count) == 0:
            return
        self.history[0] = self.history[1]
        self.history[1] = self.loss_sum / self.loss_count
        self.loss_sum.zero_()
        self.loss_count.zero_()
        self.windows.fill_(min(int(self.windows) + 1, 2))

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        if self.every_n_steps is None:
            return
        self.steps += 1
        if int(self.steps) % self.every_n_steps == 0:
            self._close_window()

    def on_train_epoch_end(self) -> None:
        if self.every_n_steps is None:
            self._close_window()
