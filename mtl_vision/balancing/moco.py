"""MoCo: Fernando, Shen, Liu, Chaudhury, Murugesan, Chen, "Mitigating Gradient Bias in
Multi-objective Learning: A Provably Convergent Approach", ICLR 2023.

MoCo tracks each task's gradient with a moving average y_t and moves simplex weights lambda down the
gradient of |sum_t lambda_t y_t|^2 / 2; the update is the combination of the tracked gradients:

    g_t <- g_t / (|g_t| + 1e-8) * L_t                     (normalize: loss; none keeps g_t)
    y_t <- y_t - beta_k (y_t - g_t)                        beta_k = beta / k^beta_sigma
    lambda <- softmax(lambda - gamma_k (Y Y^T + rho I) lambda)   gamma_k = gamma / k^gamma_sigma
    update = s * Y^T lambda                                (s = T for scale: sum, 1 for mean)

from y = 0 and lambda = 1/T. The heads keep the plain sum of their task gradients.

Reference (the default): the authors' code, heshandevaka/MoCo CAGrad/utils.py (`tracking` inside
`multi_task_rg_trainer`, commit 88ec9e2ed8e903bd7b786ec2495503bb9a828ef0). There k is 1 + the
training epoch (`unit: epoch`); y and lambda start afresh at every step of the first epoch (their
trainer re-initialises them under `if index == 0` inside the batch loop); the normalisation is their
`--smgdc_method raw_loss`; the update is multiplied by the number of tasks "to match the sum loss".
LibMTL's LibMTL/weighting/MoCo.py (commit 4336804, "implemented based on the author's sharing code")
counts optimiser steps (`unit: step`, k = 1, 2, ...; the first period is the first step, so nothing
restarts), always normalises, adds rho and does not multiply by T (`scale: mean`). Both use the
current batch's losses. float32, as theirs. The averages are one row per task and shared parameter,
so MoCo runs in `mode: params` only (LibMTL refuses representation gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchjd import Stateful

from mtl_vision.balancing.reference import JacobianAggregator

NORMALIZE = ("loss", "none")
SCALES = ("sum", "mean")
UNITS = ("epoch", "step")


class MoCo(JacobianAggregator, Stateful):
    """Args:
    beta: rate of the gradient tracking y (the authors' `--beta`; 0.99 in their NYUv2 run_moco.sh).
    beta_sigma: its decay, beta / k^beta_sigma (`--sigma2`; 0 on NYUv2, 0.5 on Cityscapes).
    gamma: rate of the weights lambda (the authors' `--delta`, LibMTL's `MoCo_gamma`; 0.1).
    gamma_sigma: its decay, gamma / k^gamma_sigma (`--sigma3`; 0 on NYUv2, 0.5 on Cityscapes).
    rho: l2 regularisation of the lambda step (LibMTL's `MoCo_rho`; the authors' code has none: 0).
    normalize: "loss" (rows scaled to norm L_t: the authors' `raw_loss`, LibMTL always) or "none".
    scale: "sum" (the update times T, the authors') or "mean" (LibMTL).
    unit: what k counts, "epoch" (the authors': 1 + completed epochs, y and lambda restarting at
        every step of epoch 0; epochs end at `on_train_epoch_end`) or "step" (LibMTL: optimiser steps).

    State: `y` (T, P) float32, `lambd` (T,), `periods` (completed epochs or steps)."""

    def __init__(
        self,
        beta: float = 0.99,
        beta_sigma: float = 0.0,
        gamma: float = 0.1,
        gamma_sigma: float = 0.0,
        rho: float = 0.0,
        normalize: str = "loss",
        scale: str = "sum",
        unit: str = "epoch",
    ) -> None:
        super().__init__()
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"balancer.aggregator.beta must lie in (0, 1], got {beta}")
        for key, value in (("beta_sigma", beta_sigma), ("gamma", gamma), ("gamma_sigma", gamma_sigma), ("rho", rho)):
            if not value >= 0:
                raise ValueError(f"balancer.aggregator.{key} must be >= 0, got {value}")
        for key, value, allowed in (
            ("normalize", normalize, NORMALIZE),
            ("scale", scale, SCALES),
            ("unit", unit, UNITS),
        ):
            if value not in allowed:
                raise ValueError(f"balancer.aggregator.{key} must be one of {list(allowed)}, got {value!r}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.normalize, self.scale, self.unit = normalize, scale, unit
        self.needs_losses = normalize == "loss"  # type: ignore[misc]  # per instance: only `loss` reads them
        self.reset()

    def reset(self) -> None:
        self.periods = 0
        self.y: Tensor | None = None
        self.lambd: Tensor | None = None

    def on_train_epoch_end(self) -> None:
        """An epoch ended: with `unit: epoch`, k grows by one (and the restarts of epoch 0 stop)."""
        if self.unit == "epoch":
            self.periods += 1

    def combine(self, jacobian: Tensor, losses: Tensor | None) -> tuple[Tensor, Tensor, None]:
        tasks = jacobian.shape[0]
        if self.y is not None and self.y.shape != jacobian.shape:
            raise ValueError(
                f"MoCo's tracked gradients have shape {tuple(self.y.shape)}, this step's Jacobian "
                f"{tuple(jacobian.shape)}: the tasks or the shared parameters changed mid-run"
            )
        if self.y is None or self.periods == 0:  # the authors restart at every step of epoch 0
            self.y = torch.zeros_like(jacobian)
            self.lambd = torch.full((tasks,), 1.0 / tasks, dtype=jacobian.dtype, device=jacobian.device)
        # y - beta_k (y - g), in place on one (T, P) temporary: the same float32 operations as theirs
        if self.normalize == "loss":
            if losses is None:
                raise ValueError("MoCo with normalize=loss needs the step's task losses")
            step = jacobian / (jacobian.norm(dim=1, keepdim=True) + 1e-8)
            step.mul_(losses.to(jacobian).view(-1, 1))
        else:
            step = jacobian.clone()
        k = 1 + self.periods
        beta = self.beta / k**self.beta_sigma
        gamma = self.gamma / k**self.gamma_sigma
        y = self.y.to(jacobian)
        y = y.sub_(torch.sub(y, step, out=step).mul_(beta))
        lambd = self.lambd.to(jacobian)
        grad = gamma * (y @ (lambd @ y))  # gamma_k Y Y^T lambda, without forming Y Y^T
        if self.rho:
            grad = grad + gamma * self.rho * lambd
        lambd = torch.softmax(lambd - grad, dim=0)
        self.y, self.lambd = y, lambd
        if self.unit == "step":
            self.periods += 1
        factor = float(tasks) if self.scale == "sum" else 1.0
        return (lambd @ y) * factor, lambd * factor, None
