"""Sparse top-k mixture-of-experts MLP with one router per task (M3ViT / Mod-Squad style).

`TaskMoE(dim, hidden_dim, num_experts, top_k, tasks)` holds `num_experts` two-layer MLPs
(Linear - GELU - Linear) as batched weight tensors and one linear router per task. A call
`moe(x, task)` routes every token of `x` (shape `(..., dim)`) with the router of `task`;
`moe(x, tasks)` with a sequence of tasks treats `x` (shape `(len(tasks) * N, ..., dim)`) as that
many equal consecutive chunks along its first dimension, chunk t routed by the router of
`tasks[t]`, and is exactly `len(tasks)` calls `moe(chunk_t, tasks[t])` (capacity, losses and
statistics per chunk) computed in one dispatch.

* routing: softmax over the experts (computed in float32), the `top_k` largest probabilities are
  kept and renormalised so the gates of a token's chosen experts sum to one. With
  `router_noise > 0` Gaussian noise of that standard deviation is added to the router logits in
  training mode only.
* dispatch without host synchronisation (no `.item()`, `.tolist()`, `nonzero()` or branch on a
  tensor's value; every shape follows from the input's shape), in one of two ways (`dispatch`):
  `"fixed"`, fixed-capacity dispatch (GShard / Switch Transformer): every kept assignment gets a
  slot in an `(num_experts, chunks * capacity, dim)` buffer, all experts run as one batched matmul
  (`torch.baddbmm`) and each token reads its slots back; `num_experts * capacity ~
  capacity_factor * tokens * top_k` expert MLP rows whatever `num_experts` is, empty slots compute
  on zeros and pass no gradient. `"grouped"`: the assignments are sorted by expert and the experts
  run as one grouped matmul over their contiguous blocks (`torch.nn.functional.grouped_mm`, block
  offsets kept on the device), exactly `tokens * top_k` rows; dropped assignments sit at the end
  of the last block and get a zero gate. Without a capacity limit only the grouped dispatch is
  sound (a fixed buffer would need every expert to hold all tokens). `"auto"` (default): fixed on
  accelerators when there is a capacity limit, else grouped; on the CPU (the host itself, nothing
  waits on a sync) the grouped matmul saves the buffer's padding. PyTorch's grouped kernel covers
  bf16/fp16 on CUDA; for CUDA float32 its fallback reads the offsets on the host. Experts that
  got no token get zero gradients either way. `experts_used(task)` lists the experts a task's
  tokens were routed to (from the statistics since `reset_expert_stats()`), which is what a pruned
  single-task deployment has to keep.
* capacity: with `capacity_factor=c` each expert accepts at most `ceil(c * tokens * top_k /
  num_experts)` assignments per call (`tokens` = tokens of that call, or of that task's chunk).
  Assignments are admitted in priority order: every token's first choice before any second
  choice, and within one rank in token order (GShard style), so a token's preferred expert is the
  last to be dropped. A dropped assignment simply contributes nothing: the token keeps the (not
  renormalised) gated outputs of its other experts, and a token whose assignments were all dropped
  gets zeros, so the residual connection of the caller passes it through unchanged.
  `capacity_factor=None` disables the limit.

Auxiliary losses (differentiable, summed by `pop_aux_loss()` over the forwards since its last
call, which clears them):

* load balancing, per task call or chunk (Switch Transformer / GShard): `num_experts * sum_e f_e * P_e`,
  `f_e` the fraction of the call's `tokens * top_k` assignments routed to expert `e` (before
  capacity drops), `P_e` the mean router probability of `e` over the call's tokens. It is 1 for a
  perfectly uniform routing and `num_experts` when everything goes to one expert.
* mutual information (Mod-Squad), weighted by `mi_loss_weight` relative to the balancing loss:
  the router probabilities of all task calls since the last pop are accumulated per task into
  `P(e | t)` (mean over the task's tokens), tasks are weighted uniformly (`P(t) = 1 / #tasks
  seen`), and the loss is `-MI(T; E) = -(H(E) - H(E | T))`: it rewards experts that are shared
  evenly overall but used selectively by each task. It is added once per pop.

Losses are only queued while autograd is enabled (so evaluation loops without pops do not grow
memory); `last_balance_loss` always holds the balancing loss of the latest forward (summed over
its chunks when it had several tasks).

Expert health statistics (no gradient) accumulate over every forward until
`reset_expert_stats()`, see `expert_stats()`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DISPATCH", "Routing", "TaskMoE"]

DISPATCH = ("auto", "fixed", "grouped")


class Routing:
    """Routing decision of one call: flattened tokens `T` in `groups` equal consecutive chunks (one per
    task), `top_k` assignments per token.

    `probs` (T, E) float32 softmax router probabilities; `experts` (T, k) chosen expert ids, best
    first; `gates` (T, k) renormalised gates of the chosen experts; `kept` (T, k) bool, False where
    the assignment overflowed the expert's capacity; `slot` (T, k) int64, with a capacity limit the
    assignment's place in its expert's queue of its chunk in priority order (kept = slot < capacity),
    else None.
    """

    def __init__(
        self, probs: Tensor, experts: Tensor, gates: Tensor, kept: Tensor, slot: Tensor | None = None, groups: int = 1
    ):
        self.probs = probs
        self.experts = experts
        self.gates = gates
        self.kept = kept
        self.slot = slot
        self.groups = groups

    def dense_gates(self) -> Tensor:
        """(T, E) combination weights: the gate of each kept assignment, zero elsewhere."""
        dense = self.probs.new_zeros(self.probs.shape)
        return dense.scatter_add(1, self.experts, self.gates * self.kept.to(self.gates.dtype))


def _count(index: Tensor, bins: int, weights: Tensor | None = None) -> Tensor:
    """(bins,) int64 occurrences of each value of the int64 `index` (weighted by `weights`); a scatter,
    not `torch.bincount`, which reads the maximum on the host on CUDA."""
    ones = torch.ones_like(index) if weights is None else weights.to(torch.int64)
    return torch.zeros(bins, dtype=torch.int64, device=index.device).scatter_add_(0, index, ones)


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
        dispatch: str = "auto",
    ):
        super().__init__()
        if dispatch not in DISPATCH:
            raise ValueError(f"TaskMoE dispatch={dispatch!r}: expected one of {list(DISPATCH)}")
        if dispatch == "fixed" and capacity_factor is None:
            raise ValueError("TaskMoE dispatch='fixed' needs a capacity_factor (the buffer holds capacity slots)")
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
        self.dispatch = dispatch

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
            f"tasks={self.tasks}, capacity_factor={self.capacity_factor}, mi_loss_weight={self.mi_loss_weight}, "
            f"dispatch={self.dispatch}"
        )

    # ------------------------------------------------------------------ routing
    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert accepts in a call with `num_tokens` tokens (None: no limit)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def _tasks(self, task: str | Sequence[str]) -> tuple[str, ...]:
        tasks = (task,) if isinstance(task, str) else tuple(task)
        if not tasks:
            raise ValueError("TaskMoE: a call needs a task, got an empty sequence of tasks")
        for t in tasks:
            if t not in self.routers:
                raise KeyError(f"TaskMoE has no router for task {t!r}; tasks: {self.tasks}")
        return tasks

    def route(self, x: Tensor, task: str | Sequence[str]) -> Routing:
        """Routing of the flattened tokens `x` (T, dim) by the router of `task`, or, for a sequence of
        tasks, of its `len(tasks)` equal consecutive chunks, chunk t by the router of `tasks[t]`."""
        tasks = self._tasks(task)
        groups = len(tasks)
        if x.shape[0] % groups:
            raise ValueError(f"TaskMoE: {x.shape[0]} tokens do not split into {groups} equal chunks, one per task")
        n = x.shape[0] // groups
        with torch.autocast(device_type=x.device.type, enabled=False):
            xf = x.float()
            chunks = (xf,) if groups == 1 else xf.reshape(groups, n, self.dim).unbind(0)
            logits = [
                F.linear(c, self.routers[t].weight.float(), self.routers[t].bias.float())
                for c, t in zip(chunks, tasks, strict=True)
            ]
            logits = logits[0] if groups == 1 else torch.cat(logits)
        if self.training and self.router_noise > 0:
            logits = logits + torch.randn_like(logits) * self.router_noise
        probs = logits.softmax(dim=-1)
        top_p, experts = probs.topk(self.top_k, dim=-1)
        gates = top_p / top_p.sum(dim=-1, keepdim=True)

        cap = self.capacity(n)
        if cap is None:
            return Routing(probs, experts, gates, torch.ones_like(experts, dtype=torch.bool), groups=groups)
        # Priority within each chunk: rank-major (all first choices, then second choices, ...), token
        # order within a rank. Queue = (chunk, expert); a stable sort by queue keeps that order.
        k, num_e = self.top_k, self.num_experts
        chunk_of = torch.arange(groups, device=x.device).view(groups, 1, 1)
        queue = (experts.view(groups, n, k).transpose(1, 2) + chunk_of * num_e).reshape(-1)
        order = torch.sort(queue, stable=True).indices
        counts = _count(queue, groups * num_e)
        starts = counts.cumsum(0) - counts
        pos_sorted = torch.arange(queue.numel(), device=x.device) - starts.index_select(0, queue.index_select(0, order))
        pos = torch.empty_like(queue).scatter_(0, order, pos_sorted)
        slot = pos.view(groups, k, n).transpose(1, 2).reshape(-1, k)
        return Routing(probs, experts, gates, slot < cap, slot=slot, groups=groups)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, task: str | Sequence[str]) -> Tensor:
        """`x` (..., dim) routed by `task` -> same shape; or `x` (tasks * N, ..., dim) for a sequence of
        tasks, chunk t of the first dimension routed by `tasks[t]` (see the module docstring)."""
        shape = x.shape
        if shape[-1] != self.dim:
            raise ValueError(f"expected last dimension {self.dim}, got shape {tuple(shape)}")
        tasks = self._tasks(task)
        if len(tasks) > 1 and (x.dim() < 2 or shape[0] % len(tasks)):
            raise ValueError(
                f"TaskMoE: input of shape {tuple(shape)} does not split into {len(tasks)} equal chunks "
                f"along its first dimension, one per task of {list(tasks)}"
            )
        tokens = x.reshape(-1, self.dim)
        routing = self.route(tokens, tasks)
        cap = self.capacity(tokens.shape[0] // len(tasks))
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if tokens.shape[0] == 0:
            out = tokens.new_zeros(0, self.dim, dtype=out_dtype)
        elif cap is not None and self._dispatch_kind(x.device) == "fixed":
            out = self._dispatch_fixed(tokens, routing, cap)
        else:
            out = self._dispatch_grouped(tokens, routing, out_dtype)
        self._record(tasks, routing, tokens.shape[0] // len(tasks))
        return out.to(x.dtype).reshape(shape)

    def _dispatch_kind(self, device: torch.device) -> str:
        """"fixed" or "grouped"; `dispatch="auto"`: fixed-capacity on accelerators when there is a
        capacity limit, else grouped (on the CPU, the host itself, nothing waits for a sync, and the
        grouped matmul computes exactly the kept rows instead of the padded buffer)."""
        if self.dispatch != "auto":
            return self.dispatch
        return "fixed" if self.capacity_factor is not None and device.type != "cpu" else "grouped"

    def _combine(self, ys: Tensor, routing: Routing, masked: bool = False) -> Tensor:
        """(T, dim) gated sum of the (T, k, dim) expert outputs of every token's assignments (`masked`:
        the gates of dropped assignments zeroed)."""
        gates = routing.gates * routing.kept.to(routing.gates.dtype) if masked else routing.gates
        return (ys * gates.to(ys.dtype).unsqueeze(-1)).sum(dim=1)

    def _dispatch_fixed(self, tokens: Tensor, routing: Routing, cap: int) -> Tensor:
        """Fixed-capacity dispatch: kept assignments into an (E, chunks * capacity, dim) buffer, one
        batched matmul per layer, outputs read back per assignment (dropped ones read a zero row)."""
        num_tokens, k, num_e = tokens.shape[0], self.top_k, self.num_experts
        groups = routing.groups
        width = groups * cap  # slots per expert: one queue of `cap` per chunk
        chunk = torch.arange(num_tokens, device=tokens.device) // (num_tokens // groups)
        row = routing.experts * width + chunk.unsqueeze(1) * cap + routing.slot
        trash = num_e * width
        row = torch.where(routing.kept, row, trash).reshape(-1)  # (T * k,) buffer row of each assignment
        # which token fills each buffer row (num_tokens = the zero row: an empty slot)
        source = torch.full((trash + 1,), num_tokens, dtype=torch.int64, device=tokens.device)
        source.scatter_(0, row, torch.arange(num_tokens, device=tokens.device).repeat_interleave(k))
        padded = torch.cat([tokens, tokens.new_zeros(1, self.dim)])
        xs = padded.index_select(0, source[:trash]).view(num_e, width, self.dim)
        h = F.gelu(torch.baddbmm(self.b1.unsqueeze(1), xs, self.w1))
        y = torch.baddbmm(self.b2.unsqueeze(1), h, self.w2).reshape(trash, self.dim)
        ys = torch.cat([y, y.new_zeros(1, self.dim)]).index_select(0, row)
        return self._combine(ys.view(num_tokens, k, self.dim), routing)

    def _dispatch_grouped(self, tokens: Tensor, routing: Routing, dtype: torch.dtype) -> Tensor:
        """Grouped dispatch: the kept assignments sorted by expert, the experts as one grouped matmul over
        their contiguous blocks (offsets on the device), outputs put back in assignment order. Dropped
        assignments are sorted last, into the last expert's block, and their gates are zeroed."""
        num_tokens, k, num_e = tokens.shape[0], self.top_k, self.num_experts
        flat_e, flat_kept = routing.experts.reshape(-1), routing.kept.reshape(-1)
        limited = routing.slot is not None
        order = torch.sort(torch.where(flat_kept, flat_e, num_e) if limited else flat_e, stable=True).indices
        sorted_e = flat_e.index_select(0, order)
        blocks = torch.where(flat_kept, flat_e, num_e - 1) if limited else flat_e
        offsets = _count(blocks, num_e).cumsum(0).to(torch.int32)
        w1, b1, w2, b2 = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        xs = tokens.index_select(0, order // k).to(dtype)
        with torch.autocast(device_type=tokens.device.type, enabled=False):
            h = F.grouped_mm(xs, w1, offs=offsets)
            h += b1.index_select(0, sorted_e)  # in place: saves an (assignments, hidden) buffer
            y = F.grouped_mm(F.gelu(h), w2, offs=offsets)
            y += b2.index_select(0, sorted_e)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # a dropped assignment's row holds a finite output of the last expert: its gate is zeroed instead
        return self._combine(y.index_select(0, inverse).view(num_tokens, k, self.dim), routing, masked=limited)

    # ------------------------------------------------------------------ losses
    def _record(self, tasks: Sequence[str], routing: Routing, num_tokens: int) -> None:
        """Balancing losses, MI sums and statistics of a call; `num_tokens` per task chunk."""
        probs, num_e, groups = routing.probs, self.num_experts, len(tasks)
        chunk_of = torch.arange(groups, device=probs.device).unsqueeze(1) * num_e
        queue = (routing.experts.view(groups, -1) + chunk_of).reshape(-1)
        routed = _count(queue, groups * num_e).view(groups, num_e).to(probs.dtype)
        frac = routed / max(num_tokens * self.top_k, 1)
        chunk_probs = probs.view(groups, num_tokens, num_e)
        mean_p = chunk_probs.mean(dim=1) if num_tokens else probs.new_zeros(groups, num_e)
        balance = num_e * (frac * mean_p).sum(dim=-1)  # (groups,): one loss per task call
        self.last_balance_loss = balance[0] if groups == 1 else balance.sum()
        if torch.is_grad_enabled():
            self._pending_losses.extend(balance.unbind(0))
            if self.mi_loss_weight and num_tokens:
                sums = chunk_probs.sum(dim=1)
                for g, task in enumerate(tasks):
                    acc = self._mi_sums.setdefault(task, [probs.new_zeros(num_e), 0])
                    acc[0] = acc[0] + sums[g]
                    acc[1] += num_tokens
        with torch.no_grad():
            kept = _count(queue, groups * num_e, routing.kept.reshape(-1)).view(groups, num_e)
            entropy = torch.special.entr(chunk_probs).sum(dim=(1, 2)).double()
            for g, task in enumerate(tasks):
                i = self.tasks.index(task)
                self._stat_routed[i] += routed[g].double()
                self._stat_kept[i] += kept[g].double()
                self._stat_entropy[i] += entropy[g]
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
