"""Sparse top-k mixture-of-experts MLP with one router per task (M3ViT / Mod-Squad style).

`TaskMoE(dim, hidden_dim, num_experts, top_k, tasks)` holds `num_experts` two-layer MLPs
(Linear - GELU - Linear) as batched weight tensors and one linear router per task. A call
`moe(x, task)` routes every token of `x` (shape `(..., dim)`) with the router of `task`:

* routing: softmax over the experts (computed in float32), the `top_k` largest probabilities are
  kept and renormalised so the gates of a token's chosen experts sum to one. With
  `router_noise > 0` Gaussian noise of that standard deviation is added to the router logits in
  training mode only.
* dispatch is truly sparse: the (token, expert) assignments are sorted by expert, the tokens are
  gathered once, and each expert runs only on its own contiguous block of tokens; experts that got
  no token are not touched at all (no compute and no gradient other than zeros). The cost is
  therefore `tokens * top_k` expert MLP evaluations whatever `num_experts` is, plus the routing
  and one small kernel launch per non-empty expert. The same holds for single-task inference:
  `forward(x, task)` only evaluates the experts that task's tokens are routed to, and
  `experts_used(task)` lists them (from the statistics since `reset_expert_stats()`), which is
  what a pruned single-task deployment has to keep.
* capacity: with `capacity_factor=c` each expert accepts at most `ceil(c * tokens * top_k /
  num_experts)` assignments per call (`tokens` = tokens of that call). Assignments are admitted in
  priority order: every token's first choice before any second choice, and within one rank in
  token order (GShard style), so a token's preferred expert is the last to be dropped. A dropped
  assignment simply contributes nothing: the token keeps the (not renormalised) gated outputs of
  its other experts, and a token whose assignments were all dropped gets zeros, so the residual
  connection of the caller passes it through unchanged. `capacity_factor=None` disables the limit.

Auxiliary losses (differentiable, summed by `pop_aux_loss()` over the forwards since its last
call, which clears them):

* load balancing, per task call (Switch Transformer / GShard): `num_experts * sum_e f_e * P_e`,
  `f_e` the fraction of the call's `tokens * top_k` assignments routed to expert `e` (before
  capacity drops), `P_e` the mean router probability of `e` over the call's tokens. It is 1 for a
  perfectly uniform routing and `num_experts` when everything goes to one expert.
* mutual information (Mod-Squad), weighted by `mi_loss_weight` relative to the balancing loss:
  the router probabilities of all task calls since the last pop are accumulated per task into
  `P(e | t)` (mean over the task's tokens), tasks are weighted uniformly (`P(t) = 1 / #tasks
  seen`), and the loss is `-MI(T; E) = -(H(E) - H(E | T))`: it rewards experts that are shared
  evenly overall but used selectively by each task. It is added once per pop.

Losses are only queued while autograd is enabled (so evaluation loops without pops do not grow
memory); `last_balance_loss` always holds the balancing loss of the latest forward.

Expert health statistics (no gradient) accumulate over every forward until
`reset_expert_stats()`, see `expert_stats()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Routing", "TaskMoE"]


class Routing:
    """Routing decision of one call: flattened tokens `T`, `top_k` assignments per token.

    `probs` (T, E) float32 softmax router probabilities; `experts` (T, k) chosen expert ids, best
    first; `gates` (T, k) renormalised gates of the chosen experts; `kept` (T, k) bool, False where
    the assignment overflowed the expert's capacity.
    """

    def __init__(self, probs: Tensor, experts: Tensor, gates: Tensor, kept: Tensor):
        self.probs = probs
        self.experts = experts
        self.gates = gates
        self.kept = kept

    def dense_gates(self) -> Tensor:
        """(T, E) combination weights: the gate of each kept assignment, zero elsewhere."""
        dense = self.probs.new_zeros(self.probs.shape)
        return dense.scatter_add(1, self.experts, self.gates * self.kept.to(self.gates.dtype))


class TaskMoE(nn.Module):
    """Top-k mixture of MLP experts with a router per task; see the module docstring."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        top_k: int,
        tasks: Sequence[str],
        capacity_factor: float | None = 1.25,
        mi_loss_weight: float = 0.0,
        router_noise: float = 0.0,
    ):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        if not tasks:
            raise ValueError("TaskMoE needs at least one task")
        self.dim, self.hidden_dim = dim, hidden_dim
        self.num_experts, self.top_k = num_experts, top_k
        self.tasks = list(tasks)
        self.capacity_factor = capacity_factor
        self.mi_loss_weight = mi_loss_weight
        self.router_noise = router_noise

        self.routers = nn.ModuleDict({t: nn.Linear(dim, num_experts) for t in self.tasks})
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_experts, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b2 = nn.Parameter(torch.empty(num_experts, dim))
        self.reset_expert_parameters()

        self.last_balance_loss: Tensor | None = None
        self._pending_losses: list[Tensor] = []
        self._mi_sums: dict[str, list[Tensor]] = {}  # task -> [sum of router probs (E,), token count]
        n = len(self.tasks)
        self.register_buffer("_stat_routed", torch.zeros(n, num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_kept", torch.zeros(n, num_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_entropy", torch.zeros(n, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_tokens", torch.zeros(n, dtype=torch.float64), persistent=False)

    def reset_expert_parameters(self) -> None:
        """nn.Linear's default initialisation, applied to every expert."""
        for w, b, fan_in in ((self.w1, self.b1, self.dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, top_k={self.top_k}, "
            f"tasks={self.tasks}, capacity_factor={self.capacity_factor}, mi_loss_weight={self.mi_loss_weight}"
        )

    # ------------------------------------------------------------------ routing
    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert accepts in a call with `num_tokens` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def route(self, x: Tensor, task: str) -> Routing:
        """Routing of the flattened tokens `x` (T, dim) by the router of `task`."""
        if task not in self.routers:
            raise KeyError(f"TaskMoE has no router for task {task!r}; tasks: {self.tasks}")
        router = self.routers[task]
        with torch.autocast(device_type=x.device.type, enabled=False):
            logits = F.linear(x.float(), router.weight.float(), router.bias.float())
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        probs = logits.softmax(dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)

        kept = torch.ones_like(experts, dtype=torch.bool)
        cap = self.capacity(x.shape[0])
        if cap is not None:
            # Priority: rank-major (all first choices, then second choices, ...), token order within a rank.
            flat = experts.t().reshape(-1)
            order = torch.sort(flat, stable=True).indices
            sorted_e = flat[order]
            counts = torch.bincount(flat, minlength=self.num_experts)
            starts = counts.cumsum(0) - counts
            pos = torch.arange(flat.numel(), device=flat.device) - starts[sorted_e]
            kept_rank_major = torch.empty_like(flat, dtype=torch.bool)
            kept_rank_major[order] = pos < cap
            kept = kept_rank_major.view(self.top_k, -1).t()
        return Routing(probs, experts, gates, kept)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: str) -> Tensor:
        shape = x.shape
        if shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(shape)}")
        tokens = x.reshape(-1, self.dim)
        num_tokens, k, num_e = tokens.shape[0], self.top_k, self.num_experts
        routing = self.route(tokens, task)

        # Group the kept assignments by expert (stable sort keeps the token order within an expert).
        flat_e = routing.experts.reshape(-1)
        flat_keep = routing.kept.reshape(-1)
        flat_tok = torch.arange(num_tokens, device=x.device).repeat_interleave(k)
        idx = flat_keep.nonzero().squeeze(1) if self.capacity_factor is not None else None
        sel_e = flat_e if idx is None else flat_e[idx]
        order = torch.sort(sel_e, stable=True).indices
        if idx is not None:
            order = idx[order]
        tok = flat_tok[order]
        gate = routing.gates.reshape(-1)[order]
        kept_counts = torch.bincount(flat_e[order], minlength=num_e)

        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        out = tokens.new_zeros(num_tokens, self.dim, dtype=out_dtype)
        if tok.numel():
            xs = tokens.index_select(0, tok)
            w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
            ys = []
            for e, chunk in enumerate(xs.split(kept_counts.tolist())):
                if chunk.shape[0] == 0:
                    continue  # this expert is not evaluated at all
                h = F.gelu(torch.addmm(b1[e], chunk, w1[e]))
                ys.append(torch.addmm(b2[e], h, w2[e]))
            y = torch.cat(ys) if len(ys) > 1 else ys[0]
            y = y * gate.unsqueeze(1).to(y.dtype)
            out = out.to(y.dtype).index_add(0, tok, y)

        self._record(task, routing, num_tokens)
        return out.to(x.dtype).reshape(shape)

    # ------------------------------------------------------------------ losses
    def _record(self, task: str, routing: Routing, num_tokens: int) -> None:
        probs, num_e = routing.probs, self.num_experts
        routed = torch.bincount(routing.experts.reshape(-1), minlength=num_e).to(probs.dtype)
        frac = routed / max(routing.experts.numel(), 1)
        mean_p = probs.mean(dim=0) if num_tokens else probs.new_zeros(num_e)
        balance = num_e * (frac * mean_p).sum()
        self.last_balance_loss = balance
        if torch.is_grad_enabled():
            self._pending_losses.append(balance)
            if self.mi_loss_weight and num_tokens:
                acc = self._mi_sums.setdefault(task, [probs.new_zeros(num_e), 0])
                acc[0] = acc[0] + probs.sum(dim=0)
                acc[1] += num_tokens
        with torch.no_grad():
            i = self.tasks.index(task)
            self._stat_routed[i] += routed.double()
            kept = torch.bincount(routing.experts[routing.kept], minlength=num_e)
            self._stat_kept[i] += kept.double()
            self._stat_entropy[i] += torch.special.entr(probs).sum().double()
            self._stat_tokens[i] += num_tokens

    @staticmethod
    def mutual_information_loss(cond_probs: Tensor, eps: float = 1e-9) -> Tensor:
        """`-MI(T; E)` from `cond_probs` (tasks, E): row t is P(e | t); tasks are weighted uniformly."""
        p_e_t = cond_probs.clamp_min(eps)
        p_t = 1.0 / cond_probs.shape[0]
        p_e = p_e_t.mean(dim=0)
        mi = p_t * (p_e_t * (p_e_t.log() - p_e.log())).sum()
        return -mi

    def pop_aux_loss(self) -> Tensor | None:
        """Sum of the balancing losses of the forwards since the last pop, plus `mi_loss_weight` times the
        mutual-information loss over the tasks seen since then; clears them. None if nothing was recorded."""
        losses = self._pending_losses
        total = torch.stack(losses).sum() if losses else None
        if self.mi_loss_weight and self._mi_sums:
            cond = torch.stack([s / n for s, n in self._mi_sums.values()])
            mi = self.mi_loss_weight * self.mutual_information_loss(cond)
            total = mi if total is None else total + mi
        self._pending_losses = []
        self._mi_sums = {}
        return total

    # ------------------------------------------------------------------ statistics
    def reset_expert_stats(self) -> None:
        for buf in (self._stat_routed, self._stat_kept, self._stat_entropy, self._stat_tokens):
            buf.zero_()

    def experts_used(self, task: str) -> list[int]:
        """Experts that processed at least one token of `task` since the last `reset_expert_stats()`."""
        i = self.tasks.index(task)
        return [int(e) for e in (self._stat_kept[i] > 0).nonzero().flatten().tolist()]

    def expert_stats(self) -> dict[str, float]:
        """Statistics since the last `reset_expert_stats()`, over the tasks that were called.

        `usage/<task>/<e>`: share of the task's assignments routed to expert e (sums to 1 per task);
        `dead_share/<task>`: share of experts that got no assignment of the task; `dead_share`: share of
        experts that got no assignment from any task; `gate_entropy/<task>`: mean entropy (nats) of the
        full router distribution per token (log(num_experts) when uniform); `dropped_share/<task>` and
        `dropped_share`: share of assignments dropped by the capacity limit.
        """
        routed, kept = self._stat_routed.cpu(), self._stat_kept.cpu()
        entropy, tokens = self._stat_entropy.cpu(), self._stat_tokens.cpu()
        stats: dict[str, float] = {}
        seen = tokens > 0
        for i, task in enumerate(self.tasks):
            if not seen[i]:
                continue
            total = routed[i].sum().item()
            for e in range(self.num_experts):
                stats[f"usage/{task}/{e}"] = routed[i, e].item() / total
            stats[f"dead_share/{task}"] = (routed[i] == 0).double().mean().item()
            stats[f"gate_entropy/{task}"] = entropy[i].item() / tokens[i].item()
            stats[f"dropped_share/{task}"] = 1.0 - kept[i].sum().item() / total
        if seen.any():
            stats["dead_share"] = (routed[seen].sum(0) == 0).double().mean().item()
            stats["dropped_share"] = 1.0 - kept[seen].sum().item() / routed[seen].sum().item()
        return stats
