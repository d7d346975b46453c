"""STCH: Lin, Zhang, Yang, Liu, Wang, Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024.

The total is a smoothed maximum of the log-losses relative to a nadir vector n,
`T * mu * log(sum_t exp((x_t - m) / mu))` with `x_t = log(L_t / n_t + 1e-20)` and `m = max_t x_t`
held constant (so the value is `T * (mu * logsumexp(x / mu) - m)`; its gradient is that of the
smoothed maximum). Before it there is a warm-up on `sum_t log(L_t + 1e-20)`: `warmup` periods of it
alone, then one more period in which the global losses are also averaged into n; STCH from the
period after. A period is a training epoch (`warmup_unit: epoch`, the authors') or an optimiser step
(`step`).

Reference: the authors' code, Xi-L/STCH STCH_MTL/LibMTL/weighting/STCH.py and the epoch loop of
STCH_MTL/LibMTL/trainer.py, commit a510c1e635a8db2697e2cc3671ec40fbe383d28e; mu 1.0 and 4 warm-up
epochs from STCH_MTL/LibMTL/config.py (`--STCH_mu`, `--STCH_warmup_epoch`), which their NYUv2,
Office and QM9 commands leave at the defaults. LibMTL's LibMTL/weighting/STCH.py (4336804) is the
same computation (equal to 0 on the fixtures), so no variant is needed for it.

Distributed training: the total is not linear in the losses, so it is evaluated on the losses
averaged over processes (`uses_global_losses`) and linearised around them: every process returns
`value(L̄) + sum_t w_t (L_t - L_t.detach())` with `w_t = d value / d L_t` at L̄. DDP's gradient
average then equals one process's gradient on the global batch; the value is the global one. On
one process L̄ = L: the total and d total / d L are the authors' bit for bit (the fixtures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mtl_vision.balancing.base import Balancer
from mtl_vision.tasks import check_task_keys

_UNITS = ("epoch", "step")
_EPS = 1e-20  # the authors' guard inside every log


class STCH(Balancer):
    """Args:
        tasks: task names.
        mu: smoothing of the Tchebycheff maximum, > 0 (1.0, the authors'); small mu approaches
            `max_t log(L_t / n_t)`, large mu the mean of the log-losses.
        warmup: periods of log-loss warm-up before the one that averages the nadir vector (4 epochs,
            the authors'); 0 averages it over the first period.
        warmup_unit: "epoch" (the authors': periods end at `on_train_epoch_end`) or "step" (periods
            end at `after_step`, for runs shorter than the warm-up epochs).

    Buffers: `periods` () completed periods, `loss_sum` (T,) and `loss_count` () of the averaging
    period, `nadir` (T,) and `has_nadir` (). All are updated from global losses in training mode
    only, so they are identical on every process and checkpointed. `last_weights` are
    d total / d L_t (their code returns ones). With gradient accumulation each micro-batch is one
    evaluation of the total, as a batch of that size would be.
    """

    uses_global_losses = True

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        mu: float = 1.0,
        warmup: int = 4,
        warmup_unit: Literal["epoch", "step"] = "epoch",
    ) -> None:
        super().__init__(tasks=tasks)
        if not float(mu) > 0:
            raise ValueError(f"balancer.mu must be > 0, got {mu!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"balancer.warmup must be an integer >= 0 (periods of log-loss warm-up), got {warmup!r}")
        if warmup_unit not in _UNITS:
            raise ValueError(f"balancer.warmup_unit must be one of {list(_UNITS)}, got {warmup_unit!r}")
        self.mu = float(mu)
        self.warmup = warmup
        self.warmup_unit = warmup_unit
        n = len(self.tasks)
        self.register_buffer("periods", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_sum", torch.zeros(n))
        self.register_buffer("loss_count", torch.zeros(()))
        self.register_buffer("nadir", torch.ones(n))
        self.register_buffer("has_nadir", torch.zeros((), dtype=torch.bool))

    def _averaging(self) -> bool:
        return not bool(self.has_nadir) and int(self.periods) >= self.warmup

    def objective(self, losses: Tensor) -> Tensor:
        """The scalar total of the (T,) losses in the current phase, differentiable in them."""
        if not bool(self.has_nadir):
            return torch.log(losses + _EPS).sum()
        logs = torch.log(losses / self.nadir + _EPS)
        shifted = logs - logs.detach().max()
        return self.mu * torch.log(torch.exp(shifted / self.mu).sum()) * len(self.tasks)

    def _value_and_weights(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The total at the (detached) losses and its gradient in them, (T,)."""
        point = torch.stack([losses[t] for t in self.tasks]).to(self.loss_sum).requires_grad_(True)
        with torch.enable_grad():
            value = self.objective(point)
            (weights,) = torch.autograd.grad(value, point)
        return value.detach(), weights

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weights = self._value_and_weights(losses)[1]
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        check_task_keys(losses, self.tasks, what=f"{type(self).__name__} losses")
        reference = self.reference_losses(losses)
        if self.training and torch.is_grad_enabled() and self._averaging():
            with torch.no_grad():
                self.loss_sum += torch.stack([reference[t] for t in self.tasks]).to(self.loss_sum)
                self.loss_count += 1
        value, weights = self._value_and_weights(reference)
        total = value + sum(weights[i] * (losses[t] - losses[t].detach()) for i, t in enumerate(self.tasks))
        self.last_weights = {t: weights[i] for i, t in enumerate(self.tasks)}
        return total

    @torch.no_grad()
    def _end_period(self) -> None:
        if self._averaging() and float(self.loss_count) > 0:
            self.nadir.copy_(self.loss_sum / self.loss_count)
            self.has_nadir.fill_(True)
        self.periods += 1

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        if self.warmup_unit == "step":
            self._end_period()

    def on_train_epoch_end(self) -> None:
        if self.warmup_unit == "epoch":
            self._end_period()
