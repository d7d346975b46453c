"""The training step of gradient balancers (manual optimisation): per-task gradients, averaged
across processes once per optimiser step, aggregated identically on every rank, written to `.grad`.

Calling backward once per task under DDP would make DDP all-reduce (and bucket) the gradients of
every task separately, or fail on parameters one task does not use. Here DDP's reducer is never
engaged (Lightning turns it off under manual optimisation and the gradients come from
`torch.autograd.grad`); instead one all-reduce per optimiser step carries everything the update
needs:

- `mode: params`: the per-task gradients of the shared parameters (a T x P Jacobian), the summed
  gradient of the other parameters and a flag per parameter telling whether any process used it.
  The mean over processes is exactly the Jacobian of the global batch's mean losses, so every rank
  aggregates the same matrix. Gradient accumulation sums the micro-batch Jacobians before
  aggregating, so it is exact as well.
- `mode: features`: per micro-batch, the Gramian of the per-task gradients of the backbone's
  output (T x T) is summed across processes; the weights follow from it on every rank alike, each
  rank backpropagates the weighted feature gradient of its own samples, and the parameter
  gradients are averaged once per step. With `gramian: batch_sum` the weights come instead from
  the Gramian of the feature gradients summed over the batch (LibMTL's representation gradients),
  whose (T x per-sample features) sums are summed across processes. With gradient accumulation each micro-batch is weighted
  from its own Gramian (the features of earlier micro-batches are gone by then).

Mixed precision: task losses are multiplied by the GradScaler's scale before differentiation and
the gradients are cast to float32 before they are unscaled; the aggregation (Gramian, solves,
weighted sums) runs in float32 with autocast off, and a feature gradient is scaled in float32
before it is cast to the features' dtype; the final gradient is written scaled, so that
Lightning's precision plugin unscales it, skips the step on inf/NaN and updates the scale exactly
as GradScaler does in automatic optimisation. Without a scaler a non-finite gradient skips the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtl_vision.balancing.distributed import all_reduce_max, all_reduce_mean, all_reduce_sum, world_size
from mtl_vision.balancing.gradient import GradientBalancer


@dataclass
class _Accumulated:
    """Gradients summed over the micro-batches of one optimiser step (unscaled)."""

    jacobian: Tensor | None = None  # params mode: (T, P_shared) per-task gradients of the shared parameters
    grads: list[Tensor | None] = field(default_factory=list)  # per parameter: plain (and aggregated, features)
    micro_batches: int = 0
    finite: bool = True
    weights: list[Tensor] = field(default_factory=list)
    gramians: list[Tensor] = field(default_factory=list)
    losses: Tensor | None = None  # (T,) detached task losses summed over micro-batches (divided)
    heads: Tensor | None = None  # params mode, `heads: weighted`: (T, P_plain) per-task plain gradients
    head_used: Tensor | None = None  # (number of plain parameters,) 1 where a task gradient exists


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return a if b is None else b if a is None else a + b


def _flat(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    parts = [
        torch.zeros(p.numel(), device=p.device, dtype=torch.float32) if g is None else g.reshape(-1).float()
        for g, p in zip(grads, params, strict=True)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


class TaskGradientStep:
    """Runs the forward/backward of one micro-batch and, at the step boundary, writes `.grad`.

    Args:
        model: the multi-task model (`encode`, `decode`, `backbone`).
        balancer: the gradient balancer (shared set, mode, aggregation).
        tasks: task order of the losses.
    """

    def __init__(self, model: nn.Module, balancer: GradientBalancer, tasks: Sequence[str]) -> None:
        self.model = model
        self.balancer = balancer
        self.tasks = list(tasks)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shared_idx: list[int] | None = None  # decided at the first step (params mode)
        self.acc = _Accumulated()
        # One backward per task through a task-stacked backbone pass also runs through the other
        # tasks' rows (zero gradients, full cost): per-task passes are faster here (vit_small with
        # moe_layers=[9,11], 4 tasks: 8.7 s against 10.95 s a step) and compute the same function.
        backbone = getattr(model, "backbone", None)
        if getattr(backbone, "task_passes", None) == "stacked":
            backbone.task_passes = "per_task"

    # -- split of the parameters ------------------------------------------------------------------
    def _decide_shared(self, per_task: list[list[Tensor | None]]) -> None:
        """Shared = under a shared prefix and used by two or more tasks (on any process, so that
        every rank picks the same set even when MoE routing differs between them)."""
        users = torch.tensor([[float(g is not None) for g in grads] for grads in per_task]).sum(0)
        users = all_reduce_max(users.to(self.params[0].device)).cpu()
        self.shared_idx = [i for i, n in enumerate(self.names) if self.balancer.is_shared(n) and float(users[i]) >= 2]
        if not self.shared_idx:
            raise ValueError(
                f"no parameter under balancer.shared={self.balancer.shared} is used by two or more tasks, "
                "so there is nothing to aggregate; name the modules the tasks share"
            )
        chosen = set(self.shared_idx)
        self.plain_idx = [i for i in range(len(self.params)) if i not in chosen]
        shared = [(self.names[i], self.params[i].numel()) for i in self.shared_idx]
        self.balancer.bind_columns([n for n, _ in shared], [size for _, size in shared])

    def _backbone_split(self) -> None:
        """Features mode: shared = every trainable backbone parameter, and the decoder's modules
        that take part in the encoding (`encoder_modules`: TaskPrompter's prompts), whose only
        gradient comes through the features."""
        inside = tuple(f"decoder.{m}." for m in getattr(getattr(self.model, "decoder", None), "encoder_modules", ()))
        self.shared_idx = [
            i for i, n in enumerate(self.names) if self.balancer.is_shared(n) or (inside and n.startswith(inside))
        ]
        chosen = set(self.shared_idx)
        self.plain_idx = [i for i in range(len(self.params)) if i not in chosen]

    # -- one micro-batch --------------------------------------------------------------------------
    def micro_batch(
        self,
        image: Tensor,
        compute_losses: Callable[[dict], dict[str, Tensor]],
        extra_loss: Callable[[], Tensor | None],
        *,
        scale: float,
        divide: int,
    ) -> tuple[dict, dict[str, Tensor], Tensor | None]:
        """Forward and per-task backward of one micro-batch; returns (predictions, losses, extra).

        `compute_losses(preds) -> {task: loss}`; `extra_loss()` -> the auxiliary loss of
        mixture-of-experts layers produced by the forward (plain gradient, not aggregated), or
        None; `divide` = the number of micro-batches per optimiser step.
        """
        if self.balancer.mode == "features":
            return self._features(image, compute_losses, extra_loss, scale=scale, divide=divide)
        return self._params(image, compute_losses, extra_loss, scale=scale, divide=divide)

    def _grads(self, loss: Tensor, inputs: Sequence[Tensor], *, scale: float, retain: bool) -> list[Tensor | None]:
        if scale == 1.0:
            return list(torch.autograd.grad(loss, list(inputs), retain_graph=retain, allow_unused=True))
        grads = torch.autograd.grad(loss * scale, list(inputs), retain_graph=retain, allow_unused=True)
        return [None if g is None else g.float() / scale for g in grads]  # unscaled in float32

    def _accumulate(self, grads: dict[int, Tensor | None]) -> None:
        """Add per-parameter gradients {parameter index: gradient or None} to this step's sums."""
        if not self.acc.grads:
            self.acc.grads = [None] * len(self.params)
        for i, g in grads.items():
            self.acc.grads[i] = _add(self.acc.grads[i], g)

    def _params(self, image, compute_losses, extra_loss, *, scale, divide):
        preds = self.model(image)
        losses = compute_losses(preds)
        extra = extra_loss()
        per_task = []
        for k, task in enumerate(self.tasks):
            last = k == len(self.tasks) - 1 and extra is None
            per_task.append(self._grads(losses[task] / divide, self.params, scale=scale, retain=not last))
        if self.shared_idx is None:
            self._decide_shared(per_task)
        shared = torch.stack(
            [_flat([g[i] for i in self.shared_idx], [self.params[i] for i in self.shared_idx]) for g in per_task]
        )
        self.acc.jacobian = _add(self.acc.jacobian, shared)
        self.acc.losses = _add(self.acc.losses, self._loss_vector(losses) / divide)
        if self.balancer.weighs_heads:  # weighted once the step's weights are known
            plain_params = [self.params[i] for i in self.plain_idx]
            heads = torch.stack([_flat([g[i] for i in self.plain_idx], plain_params) for g in per_task])
            used = torch.tensor([float(any(g[i] is not None for g in per_task)) for i in self.plain_idx])
            self.acc.heads = _add(self.acc.heads, heads)
            self.acc.head_used = used if self.acc.head_used is None else torch.maximum(self.acc.head_used, used)
            plain: dict[int, Tensor | None] = {}
        else:
            plain = {i: self._sum([g[i] for g in per_task]) for i in self.plain_idx}
        if extra is not None:  # the auxiliary loss: a plain gradient on every parameter, shared ones included
            extra_grads = self._grads(extra / divide, self.params, scale=scale, retain=False)
            plain = {i: _add(plain.get(i), extra_grads[i]) for i in range(len(self.params))}
        self._accumulate(plain)
        self.acc.micro_batches += 1
        return preds, losses, extra

    def _features(self, image, compute_losses, extra_loss, *, scale, divide):
        if self.shared_idx is None:
            self._backbone_split()
        features = self.model.encode(image)  # a list: GradientBalancer.bind refuses task-conditioned backbones
        detached = [f.detach().requires_grad_() for f in features]
        preds = self.model.decode(detached, tuple(image.shape[-2:]))
        losses = compute_losses(preds)
        extra = extra_loss()
        plain_params = [self.params[i] for i in self.plain_idx]
        inputs = [*detached, *plain_params]
        rows, per_task, sums = [], [], []
        batch_sum = self.balancer.gramian == "batch_sum"
        for task in self.tasks:
            grads = self._grads(losses[task] / divide, inputs, scale=scale, retain=True)
            rows.append(_flat(grads[: len(detached)], detached))
            per_task.append(grads[len(detached) :])
            if batch_sum:  # each map's gradient summed over the batch (LibMTL's rep_grad Gramian)
                sums.append(torch.cat([
                    (torch.zeros_like(f[0]) if g is None else g.sum(0)).float().reshape(-1)
                    for g, f in zip(grads[: len(detached)], detached, strict=True)
                ]))  # fmt: skip
        jacobian = torch.stack(rows)  # (T, local feature entries), float32
        if self.balancer.needs_losses:  # the step's losses: for the balancer's own parameters (IMTL-L)
            self.acc.losses = _add(self.acc.losses, self._loss_vector(losses) / divide)
        with torch.autocast(jacobian.device.type, enabled=False):
            if batch_sum:
                # the global batch's per-sample gradients are the processes' divided by R, so its
                # batch sum is sum_r S_r / R
                summed = all_reduce_sum(torch.stack(sums)) / world_size()
                gramian = (summed @ summed.T).double()
            else:
                # the global batch's mean loss is the mean of the processes' mean losses, so its
                # feature Jacobian is [J_1 ... J_R] / R and its Gramian sum_r G_r / R^2
                gramian = all_reduce_sum((jacobian @ jacobian.T).double()) / world_size() ** 2
            finite = bool(torch.isfinite(gramian).all())
            heads = None
            if finite:
                global_losses = self._loss_vector(losses) if self.balancer.needs_losses else None
                if global_losses is not None and world_size() > 1:
                    global_losses = all_reduce_mean(global_losses)
                vector, weights, heads = self._aggregate_features(jacobian, gramian, global_losses)
                self.acc.weights.append(weights)
                self.acc.gramians.append(gramian)
            else:
                vector = jacobian.sum(0)
                self.acc.finite = False
            plain_grads = [
                self._sum([None if g[k] is None else g[k] * (1.0 if heads is None else float(heads[t]))
                           for t, g in enumerate(per_task)])
                for k in range(len(plain_params))
            ]  # fmt: skip
        feature_grads = list(torch.split(vector, [f.numel() for f in detached]))
        feature_grads = [g.view_as(f) for g, f in zip(feature_grads, features, strict=True)]
        if extra is not None:
            extra_grads = self._grads(extra / divide, [*detached, *self.params], scale=scale, retain=True)
            extra_features, extra_params = extra_grads[: len(detached)], extra_grads[len(detached) :]
            feature_grads = [g if e is None else g + e for g, e in zip(feature_grads, extra_features, strict=True)]
            plain_grads = [self._sum([p, extra_params[i]]) for p, i in zip(plain_grads, self.plain_idx, strict=True)]
            backbone_extra = [extra_params[i] for i in self.shared_idx]
        else:
            backbone_extra = [None] * len(self.shared_idx)
        shared_params = [self.params[i] for i in self.shared_idx]
        # scaled in float32, then cast to the features' dtype (fp16 under 16-mixed)
        outputs = [
            (g if scale == 1.0 else g.float() * scale).to(f.dtype) for g, f in zip(feature_grads, features, strict=True)
        ]
        shared = torch.autograd.grad(features, shared_params, grad_outputs=outputs, allow_unused=True)
        if scale != 1.0:
            shared = [None if g is None else g.float() / scale for g in shared]
        self._accumulate({i: _add(g, e) for i, g, e in zip(self.shared_idx, shared, backbone_extra, strict=True)})
        self._accumulate(dict(zip(self.plain_idx, plain_grads, strict=True)))
        self.acc.micro_batches += 1
        return preds, losses, extra

    def _aggregate_features(
        self, jacobian: Tensor, gramian: Tensor, losses: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        # Gramian weightings: the weights of the global Gramian applied to the local rows;
        # element-wise aggregators (GradDrop) act on each feature entry alone, so each process
        # applies them to its own samples' columns
        return self.balancer.aggregate_with_heads(jacobian, gramian, losses)

    def _loss_vector(self, losses: dict[str, Tensor]) -> Tensor:
        """(T,) detached float32 task losses, in task order."""
        return torch.stack([losses[t].detach().float() for t in self.tasks])

    @staticmethod
    def _sum(values: Sequence[Tensor | None]) -> Tensor | None:
        present = [v for v in values if v is not None]
        if not present:
            return None
        return present[0] if len(present) == 1 else sum(present[1:], present[0])

    # -- the step boundary ------------------------------------------------------------------------
    def _synchronise(self, acc: _Accumulated) -> tuple[Tensor | None, list[Tensor | None]]:
        """Mean over processes of the Jacobian, of every gradient, of the losses and of the per-task
        head gradients, in one all-reduce; a flag per parameter says whether any process used it
        (the head flags are averaged: > 0 = used somewhere). No copy at all on a single process."""
        grads = acc.grads or [None] * len(self.params)
        if world_size() == 1:
            return acc.jacobian, list(grads)
        extras = [t for t in (acc.losses, acc.heads, acc.head_used) if t is not None]
        if extras:
            device = self.params[0].device
            flat = all_reduce_mean(torch.cat([t.reshape(-1).to(device) for t in extras]))
            synced_extras = iter(torch.split(flat, [t.numel() for t in extras]))
            acc.losses = None if acc.losses is None else next(synced_extras).view_as(acc.losses)
            acc.heads = None if acc.heads is None else next(synced_extras).view_as(acc.heads)
            acc.head_used = None if acc.head_used is None else next(synced_extras)
        used = torch.tensor([float(g is not None) for g in grads], device=self.params[0].device)
        parts = [] if acc.jacobian is None else [acc.jacobian.reshape(-1)]
        parts += [
            torch.zeros(p.numel(), device=p.device) if g is None else g.reshape(-1).float()
            for g, p in zip(grads, self.params, strict=True)
        ]
        parts.append(used)
        synced = torch.split(all_reduce_mean(torch.cat(parts)), [t.numel() for t in parts])
        jacobian = None if acc.jacobian is None else synced[0].view_as(acc.jacobian)
        flat = synced[len(parts) - len(self.params) - 1 : -1]
        used = synced[-1].tolist()
        grads = [g.view_as(p) if flag > 0 else None for g, p, flag in zip(flat, self.params, used, strict=True)]
        return jacobian, grads

    def write_gradients(self, *, scale: float) -> tuple[bool, dict[str, Tensor], dict[str, float]]:
        """Average across processes, aggregate (params mode), write `.grad` (times `scale`).

        Returns (finite, {task: weight}, gradient statistics). Resets the accumulation."""
        acc, self.acc = self.acc, _Accumulated()
        if acc.micro_batches == 0:
            raise RuntimeError("write_gradients called before any micro-batch")
        with torch.autocast(self.params[0].device.type, enabled=False):  # float32 aggregation
            jacobian, grads = self._synchronise(acc)
            present = [g.sum() for g in grads if g is not None] + ([jacobian.sum()] if jacobian is not None else [])
            present += [acc.heads.sum()] if acc.heads is not None else []
            finite = acc.finite and bool(torch.isfinite(torch.stack(present).sum()))  # one pass, no mask tensors
            weights_list, gramians = acc.weights, acc.gramians
            if jacobian is not None:  # params mode: aggregate the step's (global) Jacobian
                jacobian = jacobian.float()
                gramian = (jacobian @ jacobian.T).double()
                heads = None
                if finite:
                    vector, weights, heads = self.balancer.aggregate_with_heads(jacobian, gramian, acc.losses)
                else:
                    vector, weights = jacobian.sum(0), None
                weights_list, gramians = ([weights], [gramian]) if finite else ([], [])
                shared_params = [self.params[i] for i in self.shared_idx]
                for i, g in zip(self.shared_idx, torch.split(vector, [p.numel() for p in shared_params]), strict=True):
                    grads[i] = _add(g.view_as(self.params[i]), grads[i])
                if acc.heads is not None:  # `heads: weighted`: sum_t w_t g_t on the other parameters
                    mixed = acc.heads.sum(0) if heads is None else heads.to(acc.heads) @ acc.heads
                    plain_params = [self.params[k] for k in self.plain_idx]
                    parts = torch.split(mixed, [p.numel() for p in plain_params])
                    for i, g, used in zip(self.plain_idx, parts, acc.head_used.tolist(), strict=True):
                        if used > 0:
                            grads[i] = _add(g.view_as(self.params[i]), grads[i])
            # the balancer's own parameters (IMTL-L's loss scales), from the step's global losses
            own = self.balancer.own_gradients(acc.losses) if finite else []
        for p, g in [*zip(self.params, grads, strict=True), *own]:
            # a parameter no process used in this step keeps no gradient, as in automatic optimisation
            p.grad = None if g is None else g if scale == 1.0 and g.dtype == p.dtype else (g * scale).to(p.dtype)
        stats: dict[str, float] = {}
        weights: dict[str, Tensor] = {}
        if weights_list:
            mean_w = torch.stack(weights_list).mean(0)
            mean_g = torch.stack(gramians).mean(0)
            self.balancer.record(mean_w, mean_g)
            weights, stats = self.balancer.last_weights, self.balancer.last_stats
        return finite, weights, stats
