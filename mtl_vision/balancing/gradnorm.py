"""GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018.

Learnable weights w_t are pulled so that the gradient norms `G_t = w_t * ||dL_t/dW||` on a shared
layer W match `Gbar * r_t^alpha`, where r_t is task t's relative inverse training rate
`(L_t / L_t(0)) / mean_j(L_j / L_j(0))`. The model trains on `sum_t w_t * L_t` (w detached); w
trains on the gradient loss `sum_t |G_t - target_t|` (target detached) and is renormalised to sum
to T after every optimiser step. Since w_t only scales G_t, d(grad loss)/dw_t is
`sign(G_t - target_t) * ||dL_t/dW||` and no double backward is needed.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.distributed import all_reduce_mean
from mtl_vision.tasks import check_task_keys

_MIN_WEIGHT = 1e-6


class GradNorm(Balancer):
    """Args:
        tasks: task names.
        alpha: restoring-force strength (1.5 in the paper for NYUv2).
        layer: dotted name of the shared parameter W in the model (as in `model.named_parameters()`,
            e.g. "backbone.model.layer4.1.conv2.weight"); None takes the last weight (ndim > 1)
            of `model.backbone` that requires grad.

    `weights` is a (T,) parameter trained by the model optimiser. Per-task gradients on W, (T, |W|),
    are averaged over processes and the losses' reference values are global, so w's gradient is
    the same on every process. `bind(model)` must be called before the first training call. The
    returned total includes the gradient loss; outside training (eval mode or no grad) it is the
    plain weighted sum.
    """

    uses_global_losses = True

    def __init__(self, *, tasks: Sequence[str], alpha: float = 1.5, layer: str | None = None) -> None:
        super().__init__(tasks=tasks)
        if not float(alpha) >= 0:
            raise ValueError(f"balancer.alpha must be >= 0, got {alpha!r}")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"balancer.layer must be a parameter name or null, got {layer!r}")
        self.alpha = float(alpha)
        self.layer = layer
        self.layer_name: str | None = None
        # A plain list, so the model's parameter is not registered as one of the balancer's.
        self._shared: list[Tensor] = []
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.register_buffer("initial_losses", torch.ones(len(self.tasks)))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))

    def bind(self, model: nn.Module) -> None:
        if self.layer is None:
            backbone = getattr(model, "backbone", None)
            if not isinstance(backbone, nn.Module):
                raise ValueError(
                    f"GradNorm: balancer.layer is null but {type(model).__name__} has no `backbone` module; "
                    "give balancer.layer a parameter name"
                )
            candidates = [(n, p) for n, p in backbone.named_parameters() if p.ndim > 1 and p.requires_grad]
            if not candidates:
                raise ValueError("GradNorm: the backbone has no trainable weight with ndim > 1; set balancer.layer")
            name, param = candidates[-1]
            name = f"backbone.{name}"
        else:
            params = dict(model.named_parameters())
            if self.layer not in params:
                close = difflib.get_close_matches(self.layer, list(params), n=5, cutoff=0.0)
                raise ValueError(
                    f"GradNorm: balancer.layer={self.layer!r} is not a model parameter; close names: {close}"
                )
            name, param = self.layer, params[self.layer]
            if not param.requires_grad:
                raise ValueError(f"GradNorm: balancer.layer={name!r} does not require grad (frozen?)")
        self.layer_name = name
        self._shared = [param]

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weights = self.weights.detach()
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        check_task_keys(losses, self.tasks, what=f"{type(self).__name__} losses")
        weights = self.task_weights(losses)
        total = sum(weights[t] * losses[t] for t in self.tasks)
        self.last_weights = {t: weights[t].float() for t in self.tasks}
        if not (self.training and torch.is_grad_enabled()):
            return total
        if not self._shared:
            raise RuntimeError("GradNorm: call bind(model) before training, so it can find the shared layer")
        reference = self.reference_losses(losses)
        current = torch.stack([reference[t] for t in self.tasks]).to(self.initial_losses)
        if not bool(self.has_initial):
            with torch.no_grad():
                self.initial_losses.copy_(current)
                self.has_initial.fill_(True)
        shared = self._shared[0]
        rows = []
        for t in self.tasks:
            grad = None
            if losses[t].requires_grad:
                (grad,) = torch.autograd.grad(losses[t], shared, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(shared).flatten() if grad is None else grad.flatten())
        norms = all_reduce_mean(torch.stack(rows).float()).norm(dim=1).to(self.weights)
        grad_norms = self.weights * norms
        with torch.no_grad():
            ratio = current / self.initial_losses.clamp_min(1e-12)
            relative = ratio / ratio.mean().clamp_min(1e-12)
            target = grad_norms.mean() * relative**self.alpha
        return total + (grad_norms - target).abs().sum()

    @torch.no_grad()
    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        self.weights.clamp_(min=_MIN_WEIGHT)
        self.weights.mul_(len(self.tasks) / self.weights.sum())
