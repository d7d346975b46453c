"""GradNorm: Chen, Badrinarayanan, Lee, Rabinovich, "GradNorm: Gradient Normalization for Adaptive
Loss Balancing in Deep Multitask Networks", ICML 2018.

The authors released no code; the default follows LibMTL's implementation
(median-research-group/LibMTL, LibMTL/weighting/GradNorm.py and the epoch loop of
LibMTL/trainer.py, commit 4336804847eaa5e0b924b743d76beec7ac3fdc97). Weights w_t are pulled so
that the gradient norms `G_t = w_t * ||dL_t/dW||` on the shared parameters W match
`mean_j(G_j) * r_t^alpha`, r_t the relative inverse training rate
`(L_t / L_t(0)) / mean_j(L_j / L_j(0))`. The model trains on `sum_t w_t * L_t` (w detached); the
weights' parameter trains on the gradient loss `sum_t |G_t - target_t|` (target detached). Since w_t
only scales G_t, no double backward is needed: the per-task gradients on W are computed once with
`autograd.grad` (T extra backward passes over W's part of the graph, the cost LibMTL pays too).

Variants: `weights: softmax` (LibMTL: `w = T * softmax(s)`, s a parameter starting at 1) or
`renormalised` (the paper's w trained directly, clamped > 0 and rescaled to sum to T after every
step); `initial: first_epoch` (LibMTL: equal weights and no weight training during epoch 0,
L_t(0) = the task's mean training loss of epoch 0) or `first_step` (the paper: L_t(0) = the
first step's loss, weights trained from the first step); `layer`: `shared` (LibMTL: every
trainable parameter under `shared`), null (the last backbone weight, the paper's "last shared
layer") or a parameter name; `heads: plain` (LibMTL: it back-propagates every task loss plainly
to collect the task gradients and then overwrites only the shared parameters' gradient with
sum_t w_t g_t, so the other parameters keep sum_t dL_t) or `weighted` (the paper: everything
trains on sum_t w_t L_t). `heads: plain` needs `layer: shared`: the shared parameters' weighted
gradient is added as a linear term <sum_t (w_t - 1) g_t, W> built from the per-task gradients it
has computed anyway, while the loss itself is summed unweighted.

Mixed precision: the training module sets `grad_scale` to the step's GradScaler scale; the task
losses are multiplied by it before `autograd.grad`, so fp16 activation gradients do not underflow,
and the gradients are divided by it in float32 afterwards, which gives the fp32 norms.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtl_vision.balancing.base import Balancer
from mtl_vision.balancing.distributed import all_reduce_mean
from mtl_vision.tasks import check_task_keys

_MIN_WEIGHT = 1e-6
_WEIGHTS = ("softmax", "renormalised")
_INITIAL = ("first_epoch", "first_step")
_HEADS = ("plain", "weighted")


class GradNorm(Balancer):
    """Args:
        tasks: task names.
        alpha: restoring-force strength (1.5, LibMTL's default and the paper's NYUv2 value).
        weights: "softmax" (LibMTL) or "renormalised" (the paper), see the module docstring.
        initial: "first_epoch" (LibMTL) or "first_step" (the paper): where L_t(0) comes from.
        layer: "shared" (all trainable parameters under `shared`, LibMTL), null (the last weight
            with ndim > 1 of `model.backbone`), or a dotted name from `model.named_parameters()`.
        shared: module prefixes of the model whose parameters are shared (for `layer: shared`).
        heads: "plain" (LibMTL: parameters outside `shared` get sum_t dL_t) or "weighted" (the
            paper: sum_t w_t dL_t), see the module docstring.

    Parameter: `logits` (T,) for "softmax", `weights` (T,) for "renormalised", trained by the model
    optimiser. Buffers: `initial_losses` (T,), `has_initial` (), and for "first_epoch" the epoch-0
    sums `loss_sum` (T,), `loss_count` (). Per-task gradients on W are averaged over processes one
    task at a time (only their norms are kept), and the losses are global, so the weights' gradient
    is the same on every process. `bind(model)` must be called before training. The returned total
    includes the gradient loss; outside training (eval mode or no grad) it is the weighted sum.
    """

    uses_global_losses = True

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        alpha: float = 1.5,
        weights: Literal["softmax", "renormalised"] = "softmax",
        initial: Literal["first_epoch", "first_step"] = "first_epoch",
        layer: str | None = "shared",
        shared: Sequence[str] = ("backbone",),
        heads: Literal["plain", "weighted"] = "plain",
    ) -> None:
        super().__init__(tasks=tasks)
        if not float(alpha) >= 0:
            raise ValueError(f"balancer.alpha must be >= 0, got {alpha!r}")
        if weights not in _WEIGHTS:
            raise ValueError(f"balancer.weights must be one of {list(_WEIGHTS)}, got {weights!r}")
        if initial not in _INITIAL:
            raise ValueError(f"balancer.initial must be one of {list(_INITIAL)}, got {initial!r}")
        if layer is not None and not isinstance(layer, str):
            raise ValueError(f"balancer.layer must be 'shared', a parameter name or null, got {layer!r}")
        if heads not in _HEADS:
            raise ValueError(f"balancer.heads must be one of {list(_HEADS)}, got {heads!r}")
        if heads == "plain" and layer != "shared":
            raise ValueError(
                f"balancer.heads=plain gives the shared parameters their weighted gradient from the per-task gradients "
                f"on all of them, so it needs balancer.layer=shared (got {layer!r}); use balancer.heads=weighted"
            )
        self.heads = heads
        shared = [shared] if isinstance(shared, str) else [str(s).strip(".") for s in shared]
        if layer == "shared" and not shared:
            raise ValueError("balancer.shared is empty: name at least one module prefix, e.g. [backbone]")
        self.alpha = float(alpha)
        self.parametrisation = weights
        self.initial = initial
        self.layer = layer
        self.shared = shared
        self.layer_name: str | None = None
        self.grad_scale = 1.0  # the AMP loss scale of the current step, set by the training module
        # A plain list, so the model's parameters are not registered as the balancer's.
        self._shared: list[Tensor] = []
        n = len(self.tasks)
        if weights == "softmax":
            self.logits = nn.Parameter(torch.ones(n))
        else:
            self.weights = nn.Parameter(torch.ones(n))
        self.register_buffer("initial_losses", torch.ones(n))
        self.register_buffer("has_initial", torch.zeros((), dtype=torch.bool))
        if initial == "first_epoch":
            self.register_buffer("loss_sum", torch.zeros(n))
            self.register_buffer("loss_count", torch.zeros(()))

    # -- the shared parameters -------------------------------------------------------------------
    def bind(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        if self.layer == "shared":
            chosen = [
                (n, p)
                for n, p in params.items()
                if p.requires_grad and any(n == s or n.startswith(f"{s}.") for s in self.shared)
            ]
            if not chosen:
                raise ValueError(
                    f"GradNorm: balancer.shared={self.shared} holds no trainable parameter of {type(model).__name__}; "
                    f"top-level modules: {sorted({n.split('.')[0] for n in params})}"
                )
            self.layer_name = ",".join(self.shared)
            self._shared = [p for _, p in chosen]
            return
        if self.layer is None:
            backbone = getattr(model, "backbone", None)
            if not isinstance(backbone, nn.Module):
                raise ValueError(
                    f"GradNorm: balancer.layer is null but {type(model).__name__} has no `backbone` module; "
                    "give balancer.layer a parameter name or 'shared'"
                )
            candidates = [(n, p) for n, p in backbone.named_parameters() if p.ndim > 1 and p.requires_grad]
            if not candidates:
                raise ValueError("GradNorm: the backbone has no trainable weight with ndim > 1; set balancer.layer")
            name, param = candidates[-1]
            name = f"backbone.{name}"
        else:
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

    # -- weights ---------------------------------------------------------------------------------
    def _weights(self) -> Tensor:
        """The (T,) weights as a function of the balancer's parameter (not detached)."""
        if self.parametrisation == "softmax":
            return len(self.tasks) * torch.softmax(self.logits, dim=0)
        return self.weights

    def _warming_up(self) -> bool:
        return self.initial == "first_epoch" and not bool(self.has_initial)

    def task_weights(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        weights = self._weights().detach()
        if self._warming_up():
            weights = torch.ones_like(weights)
        return {t: weights[i] for i, t in enumerate(self.tasks)}

    def _task_gradient_norms(
        self, losses: Mapping[str, Tensor], mix: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor] | None]:
        """(T,) float32 norms of the process-averaged gradients of each task loss on W, computed
        from the loss times `grad_scale` and unscaled in float32; with `mix` (T,) also the local
        sum_t mix_t dL_t/dW per parameter of W (float32, unscaled), else None."""
        scale = float(self.grad_scale)
        norms = []
        mixed = None if mix is None else [torch.zeros_like(p, dtype=torch.float32) for p in self._shared]
        for i, t in enumerate(self.tasks):
            grads: Sequence[Tensor | None] = [None] * len(self._shared)
            if losses[t].requires_grad:
                grads = torch.autograd.grad(
                    losses[t].float() * scale, self._shared, retain_graph=True, allow_unused=True
                )
            grads = [(torch.zeros_like(p) if g is None else g).float() / scale for g, p in zip(grads, self._shared)]
            norms.append(all_reduce_mean(torch.cat([g.flatten() for g in grads])).norm())
            if mixed is not None:
                for acc, g in zip(mixed, grads, strict=True):
                    acc.add_(g, alpha=float(mix[i]))
        return torch.stack(norms), mixed

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        check_task_keys(losses, self.tasks, what=f"{type(self).__name__} losses")
        weights = self.task_weights(losses)
        total = sum(weights[t] * losses[t] for t in self.tasks)
        self.last_weights = {t: weights[t].float() for t in self.tasks}
        if not (self.training and torch.is_grad_enabled()):
            return total
        if self.heads == "plain" and not self._warming_up():
            # the value stays sum_t w_t L_t; the gradient is sum_t dL_t everywhere, plus the
            # linear term below on W (see the module docstring)
            total = sum(losses[t] for t in self.tasks) + (total - sum(losses[t] for t in self.tasks)).detach()
        if not self._shared:
            raise RuntimeError("GradNorm: call bind(model) before training, so it can find the shared parameters")
        reference = self.reference_losses(losses)
        current = torch.stack([reference[t] for t in self.tasks]).to(self.initial_losses)
        if self._warming_up():
            with torch.no_grad():
                self.loss_sum += current
                self.loss_count += 1
            # a zero term keeps the weights' parameter in the graph, so DDP sees it used; its zero
            # gradient leaves the softmax weights equal (decay shrinks equal logits equally)
            return total + 0.0 * self._weights().sum()
        if not bool(self.has_initial):  # initial == "first_step"
            with torch.no_grad():
                self.initial_losses.copy_(current)
                self.has_initial.fill_(True)
        weights = self._weights()
        mix = (weights.detach() - 1.0) if self.heads == "plain" else None
        norms, mixed = self._task_gradient_norms(losses, mix)
        grad_norms = weights * norms.to(weights)
        with torch.no_grad():
            ratio = current / self.initial_losses.clamp_min(1e-12)
            relative = ratio / ratio.mean().clamp_min(1e-12)
            target = grad_norms.mean() * relative**self.alpha
        total = total + (grad_norms - target).abs().sum()
        if mixed is not None:  # d/dW = sum_t (w_t - 1) g_t, value 0: W's gradient becomes sum_t w_t g_t
            linear = sum((m.to(p.dtype) * p).sum() for m, p in zip(mixed, self._shared, strict=True))
            total = total + (linear - linear.detach())
        return total

    @torch.no_grad()
    def after_step(self, losses: Mapping[str, Tensor] | None = None) -> None:
        if self.parametrisation == "renormalised":
            self.weights.clamp_(min=_MIN_WEIGHT)
            self.weights.mul_(len(self.tasks) / self.weights.sum())

    @torch.no_grad()
    def on_train_epoch_end(self) -> None:
        if self._warming_up() and float(self.loss_count) > 0:
            self.initial_losses.copy_(self.loss_sum / self.loss_count)
            self.has_initial.fill_(True)
