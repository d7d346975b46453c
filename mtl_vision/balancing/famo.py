"""FAMO: Liu, Liang, Huang, Jiang, Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

FAMO keeps task logits xi, z = softmax(xi), and trains on `sum_t z_t * log(D_t) / c` with
`D_t = L_t - min_loss + eps` and `c = sum_t z_t / D_t` held constant. Its gradient is that of the
linear total `sum_t w_t * L_t`, `w_t = z_t / (c * D_t)` (weights summing to one), which is what
this balancer returns. After a step, the logits follow the log-loss decrease
`delta_t = log D_t(prev) - log D_t(curr)`: their gradient is `J_softmax(xi)^T delta` and they take one
Adam step with L2 weight decay gamma. The Adam state lives in buffers (not in the model
optimiser, not in DDP) and is updated from global losses only.

Reference: the official code, Cranial-XIX/FAMO methods/weight_methods.py `FAMO` and
experiments/nyuv2/trainer.py, commit 0a6ad06dbdd55fce73ec01e3a175c2498cd1e5e9: logits start at 0,
Adam(lr 0.025, weight_decay gamma), the update uses the losses of the same batch recomputed after
the optimiser step (`update: same_batch`, the default here). gamma is 0.001 in their run.sh for
NYUv2, CelebA and QM9 (the default here) and 0.01 for Cityscapes. Their `max_norm=1` clipping of the
shared gradient is called before `loss.backward()` in `WeightMethod.backward`, i.e. on the zeroed
gradients, so it clips nothing: no clipping is the authors' effective behaviour; their stand-alone
famo.py clips after backward, which `trainer.gradient_clip_val=1.0` approximates (all parameters).

Cost of `same_batch`: one extra forward pass without gradients per optimiser step (on the last
micro-batch), about a third of a training step's compute; `next_batch` has none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from mtl_vision.balancing.base import Balancer

_UPDATES = ("next_batch", "same_batch")
_BETAS = (0.9, 0.999)
_ADAM_EPS = 1e-8


class FAMO(Balancer):
    """Args:
        tasks: task names.
        lr: Adam learning rate of the logits (0.025 in the paper).
        gamma: L2 weight decay of the logits (0.001: the authors' NYUv2/CelebA/QM9 value; 0.01 for
            Cityscapes and their parser default).
        min_losses: lower bound of every task loss (0 for non-negative losses).
        eps: added to `L_t - min_losses` before dividing and taking logs.
        update: "same_batch" updates the logits from the losses of the same batch recomputed after
            the step (the official code; one extra forward, asked for through
            `needs_losses_after_step`); "next_batch" uses the next step's losses instead (no extra
            forward; the update runs at the first forward of each optimiser step, so every
            micro-batch of a step uses the same logits).

    Buffers: `logits`, `exp_avg`, `exp_avg_sq` (T,), `adam_step` (), `prev_losses` (T,), `has_prev`
    (), `step_started` (). Losses below `min_losses` are clamped to it, which keeps D_t positive.
    """

    uses_global_losses = True

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        lr: float = 0.025,
        gamma: float = 0.001,
        min_losses: float = 0.0,
        eps: float = 1e-8,
        update: Literal["next_batch", "same_batch"] = "same_batch",
    ) -> None:
        super().__init__(tasks=tasks)
        if not float(lr) > 0:
            raise ValueError(f"balancer.lr must be > 0, got {lr!r}")
        if not float(gamma) >= 0:
            raise ValueError(f"balancer.gamma must be >= 0, got {gamma!r}")
        if not float(eps) > 0:
            raise ValueError(f"balancer.eps must be > 0, got {eps!r}")
        if not math.isfinite(float(min_losses)):
            raise ValueError(f"balancer.min_losses must be a finite number, got {min_losses!r}")
        if update not in _UPDATES:
            raise ValueError(f"balancer.update must be one of {list(_UPDATES)}, got {update!r}")
        self.lr = float(lr)
        self.gamma = float(gamma)
        self.min_losses = float(min_losses)
        self.eps = float(eps)
        self.update = update
        self.needs_losses_after_step = update == "same_batch"
        n = len(self.tasks)
        self.register_buffer("logits", torch.zeros(n))
        self.register_buffer("exp_avg", torch.zeros(n))
        self.register_buffer("exp_avg_sq", torch.zeros(n))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("prev_losses", torch.zeros(n))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("step_started", torch.zeros((), dtype=torch.bool))

    def _shifted(self, losses: Tensor) -> Tensor:
        return (losses - self.min_losses).clamp_min(0) + self.eps

    def _stack(self, losses: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([losses[t].detach() for t in self.tasks]).to(self.logits)

    @torch.no_grad()
    def update_logits(self, prev: Tensor, curr: Tensor) -> None:
        """One Adam step on the logits from the losses before (`prev`) and after (`curr`) a step."""
        delta = torch.log(self._shifted(prev)) - torch.log(self._shifted(curr))
        z = torch.softmax(self.logits, dim=0)
        grad = z * delta - z * torch.dot(z, delta) + self.gamma * self.logits
        beta1, beta2 = _BETAS
        self.adam_step += 1
        step = int(self.adam_step)
        self.exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(_ADAM_EPS)
        self.logits.addcdiv_(self.exp_avg, denom, value=-self.lr / (1 - beta1**step))

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        current = self._stack(losses)
        if self.training:
            with torch.no_grad():
                if self.update == "next_batch" and bool(self.has_prev) and not bool(self.step_started):
                    self.update_logits(self.prev_losses, current)
                self.step_started.fill_(True)
                self.prev_losses.copy_(current)
                self.has_prev.fill_(True)
        z = torch.softmax(self.logits, dim=0)
        shifted = self._shifted(current)
        weights = z / shifted
        weights = weights / weights.sum()
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        if self.update == "same_batch":
            if losses is None:
                raise ValueError("FAMO(update='same_batch') needs the losses recomputed after the step in after_step")
            if bool(self.has_prev):
                self.update_logits(self.prev_losses, self._stack(losses))
                self.has_prev.fill_(False)
        self.step_started.fill_(False)
