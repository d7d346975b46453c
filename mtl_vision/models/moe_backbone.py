"""Task-routed MoE layers inside a timm transformer backbone (M3ViT / Mod-Squad), by sparse upcycling.

`apply_moe_layers(backbone, layers, tasks, ...)` replaces the MLP of the chosen transformer blocks
with a `TaskMoEMlp`: a sparse top-k `TaskMoE` with one router per task. Every expert starts as a
copy of the block's dense MLP (sparse upcycling, Komatsuzaki et al. 2023), so a pretrained ViT
initially computes exactly its dense function whatever the routing (the gates of a token sum to
one), up to tokens dropped by the capacity limit. Only the routers start from scratch.

`TaskMoEMlp` is `TaskConditioned`: it routes with `current_task()`, or, on a batch with the tasks
stacked (`stacks_tasks`, `current_tasks()`), every task's chunk with its own router in one dispatch,
so a ViT backbone runs once up to the first MoE block and then once on all tasks stacked (see
`Backbone.forward`). Dropout inside the dense MLP (zero in the usual ViT configs) is not
carried over.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_vision.models.moe import TaskMoE
from mtl_vision.models.task_context import TaskConditioned, current_task, current_tasks

__all__ = ["TaskMoEMlp", "apply_moe_layers", "transformer_blocks"]


class TaskMoEMlp(TaskConditioned):
    """Drop-in replacement of a timm block's `mlp`: `forward(x (..., C)) -> same shape`, routed by the
    router of `current_task()`; inside `stacked_task_scope(tasks)`, `x` is (len(tasks) * N, ..., C) and
    chunk t is routed by the router of `tasks[t]`. The MoE bookkeeping methods delegate to the
    wrapped `TaskMoE`."""

    stacks_tasks = True

    def __init__(self, moe: TaskMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: Tensor) -> Tensor:
        tasks = current_tasks()
        return self.moe(x, tasks if tasks is not None else current_task())

    def pop_aux_loss(self) -> Tensor | None:
        return self.moe.pop_aux_loss()

    def expert_stats(self) -> dict[str, float]:
        return self.moe.expert_stats()

    def reset_expert_stats(self) -> None:
        self.moe.reset_expert_stats()


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a timm model in forward order: the children of every container named
    `blocks` whose children have an `mlp` (ViT: one container; Swin: one per stage, concatenated)."""
    blocks: list[nn.Module] = []
    for name, module in model.named_modules():
        if name.split(".")[-1] == "blocks" and isinstance(module, (nn.Sequential, nn.ModuleList)):
            children = list(module.children())
            if children and all(hasattr(b, "mlp") for b in children):
                blocks.extend(children)
    return blocks


def _dense_weights(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear] | None:
    """fc1, fc2 of a timm `Mlp` that a TaskMoE expert computes exactly (Linear-GELU-Linear), else None."""
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    act, norm = getattr(mlp, "act", None), getattr(mlp, "norm", nn.Identity())
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    if not (isinstance(act, nn.GELU) and act.approximate == "none" and isinstance(norm, nn.Identity)):
        return None
    return fc1, fc2


def apply_moe_layers(
    backbone: nn.Module,
    layers: list[int],
    tasks: Sequence[str],
    num_experts: int = 16,
    top_k: int = 2,
    capacity_factor: float | None = 1.25,
    mi_loss_weight: float = 0.0,
    hidden_ratio: float | None = None,
    router_noise: float = 0.0,
    dispatch: str = "auto",
) -> list[TaskMoEMlp]:
    """Replace `blocks[i].mlp` of the transformer inside `backbone.model` for every i in `layers`.

    Every expert is initialised from the dense MLP (sparse upcycling) when that MLP is a plain
    Linear-GELU-Linear and `hidden_ratio` is None or keeps its hidden width; otherwise the experts
    get `TaskMoE`'s default initialisation. The experts inherit `requires_grad` of the dense MLP
    (a frozen backbone keeps frozen experts; the new routers always train). `dispatch`: see `TaskMoE`.
    Returns the new layers.
    """
    name = getattr(backbone, "name", type(backbone).__name__)
    model = getattr(backbone, "model", backbone)
    blocks = transformer_blocks(model)
    if not blocks:
        raise ValueError(f"backbone.moe_layers: backbone {name} has no transformer blocks to put MoE layers into")
    bad = [i for i in layers if not -len(blocks) <= i < len(blocks)]
    if bad:
        raise ValueError(
            f"backbone.moe_layers {list(layers)}: {bad} out of range, {name} has {len(blocks)} transformer blocks"
        )
    if not tasks:
        raise ValueError(f"backbone.moe_layers: backbone {name} needs the trained tasks to build one router per task")
    indices = sorted({i % len(blocks) for i in layers})
    new = []
    for i in indices:
        block = blocks[i]
        dense = block.mlp
        if isinstance(dense, TaskMoEMlp):
            raise ValueError(f"backbone.moe_layers: block {i} of {name} already is an MoE layer")  # noqa: TRY004
        weights = _dense_weights(dense)
        if weights is None and hidden_ratio is None:
            raise ValueError(
                f"backbone.moe_layers: block {i} of {name} has an MLP that is not Linear-GELU-Linear "
                f"({type(dense).__name__}); set backbone.moe.hidden_ratio to build experts from scratch"
            )
        dim = weights[0].in_features if weights else _width(block)
        hidden = weights[0].out_features if hidden_ratio is None else max(1, round(dim * hidden_ratio))
        ref = next(dense.parameters(), None)
        moe = TaskMoE(
            dim,
            hidden,
            num_experts,
            top_k,
            tasks,
            capacity_factor=capacity_factor,
            mi_loss_weight=mi_loss_weight,
            router_noise=router_noise,
            dispatch=dispatch,
        )
        if ref is not None:
            moe = moe.to(device=ref.device, dtype=ref.dtype)
        if weights is not None and weights[0].out_features == hidden:
            fc1, fc2 = weights
            with torch.no_grad():
                moe.w1.copy_(fc1.weight.t().unsqueeze(0).expand_as(moe.w1))
                moe.w2.copy_(fc2.weight.t().unsqueeze(0).expand_as(moe.w2))
                moe.b1.copy_(
                    fc1.bias.unsqueeze(0).expand_as(moe.b1) if fc1.bias is not None else torch.zeros_like(moe.b1)
                )
                moe.b2.copy_(
                    fc2.bias.unsqueeze(0).expand_as(moe.b2) if fc2.bias is not None else torch.zeros_like(moe.b2)
                )
        if ref is not None and not ref.requires_grad:
            for p in (moe.w1, moe.b1, moe.w2, moe.b2):
                p.requires_grad_(False)
        block.mlp = TaskMoEMlp(moe)
        new.append(block.mlp)
    return new


def _width(block: nn.Module) -> int:
    """Token width of a transformer block, from its first LayerNorm."""
    for m in block.modules():
        if isinstance(m, nn.LayerNorm):
            return int(m.normalized_shape[-1])
    raise ValueError(f"cannot tell the width of {type(block).__name__}")
