"""Parameter-efficient fine-tuning of transformer backbones: MTLoRA (conf/peft/mtlora.yaml).

MTLoRA (Agiza, Neseem, Reda, "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024) freezes a pretrained transformer and trains low-rank updates of its linear
layers: task-agnostic adapters (TA-LoRA) in every block and, in the blocks whose outputs feed the
decoder (the last block of each Swin stage), additional task-specific adapters (TS-LoRA), so each
task reads features adapted for it. Only the adapters and the decoder are trained.

Here a wrapped linear computes `W x + b + s * B A x (+ s_t * B_t A_t x for the current task)`.
Task-specific adapters make the backbone task-conditioned: `Backbone.forward` then runs once per
task (see `task_context`), so a task's adapters also shape the input of later blocks (in the
reference code the next stage reads the task-agnostic path only). `merge_adapters` folds the
adapters of one task into plain `nn.Linear` weights for inference.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mtl_vision.models.backbone import Backbone
from mtl_vision.models.task_context import TaskConditioned, current_task

__all__ = ["LoRALinear", "MTLoRA", "NoPEFT", "TaskLoRALinear", "merge_adapters", "transformer_blocks"]

log = logging.getLogger(__name__)

TARGETS = ("qkv", "proj", "fc1", "fc2")
# where each target linear lives inside a timm transformer block
_PARENT = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}


def _low_rank(rank: int, in_features: int, out_features: int, ref: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """(A (rank, in), B (out, rank)): A as nn.Linear initialises its weight, B zero (update starts at 0)."""
    a = torch.empty(rank, in_features, dtype=ref.dtype, device=ref.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=ref.dtype, device=ref.device)
    return nn.Parameter(a), nn.Parameter(b)


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a task-agnostic low-rank update `scale * B @ A`, scale = alpha / rank.

    Args:
        base: the linear layer to adapt (its parameters are frozen).
        rank: rank of the task-agnostic update (0 = none).
        alpha: scaling numerator; None = rank (scale 1).
    """

    def __init__(self, base: nn.Linear, rank: int = 4, alpha: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if rank < 0:
            raise ValueError(f"LoRA rank must be >= 0, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scale = (alpha if alpha is not None else rank) / rank if rank else 0.0
        if rank:
            self.lora_A, self.lora_B = _low_rank(rank, self.in_features, self.out_features, base.weight)
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)

    def _delta(self, x: Tensor, task: str | None) -> Tensor | None:
        """The low-rank part of the output (None when there is none)."""
        if not self.rank:
            return None
        return (x @ self.lora_A.t()) @ self.lora_B.t() * self.scale

    def _task(self) -> str | None:
        return None

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        delta = self._delta(x, self._task())
        return out if delta is None else out + delta

    def delta_weight(self, task: str | None = None) -> Tensor:
        """The weight update (out, in) that the adapters add for `task`."""
        delta = torch.zeros_like(self.base.weight)
        if self.rank:
            delta = delta + self.scale * (self.lora_B @ self.lora_A)
        return delta

    @torch.no_grad()
    def merge(self, task: str | None = None) -> nn.Linear:
        """A plain (frozen) `nn.Linear` whose weight has the adapters of `task` folded in."""
        base = self.base
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        merged = merged.to(device=base.weight.device, dtype=base.weight.dtype)
        merged.weight.copy_(base.weight + self.delta_weight(task))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        return merged

    @property
    def trainable(self) -> int:
        """Number of adapter parameters that require gradients."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("base.") and p.requires_grad)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}"


class TaskLoRALinear(LoRALinear, TaskConditioned):
    """`LoRALinear` plus one low-rank update per task (MTLoRA's TS-LoRA), chosen by `current_task()`.

    Args:
        tasks: the tasks, one (A_t, B_t) each.
        rank_task: rank of each task-specific update.
        alpha: scaling numerator of both updates (scales alpha/rank and alpha/rank_task); None = rank.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 4,
        alpha: float | None = None,
        *,
        tasks: Sequence[str],
        rank_task: int = 4,
    ) -> None:
        super().__init__(base, rank, alpha)
        if not tasks:
            raise ValueError("TaskLoRALinear needs at least one task")
        if rank_task < 1:
            raise ValueError(f"task-specific LoRA rank must be >= 1, got {rank_task}")
        self.tasks = list(tasks)
        self.rank_task = rank_task
        self.task_scale = (alpha if alpha is not None else rank_task) / rank_task
        self.task_A = nn.ParameterDict()
        self.task_B = nn.ParameterDict()
        for task in self.tasks:
            self.task_A[task], self.task_B[task] = _low_rank(
                rank_task, self.in_features, self.out_features, base.weight
            )

    def _task(self) -> str | None:
        return current_task()

    def _check(self, task: str | None) -> str:
        if task not in self.task_A:
            raise KeyError(f"no task-specific LoRA adapter for task {task!r}; adapters exist for {self.tasks}")
        return task

    def _delta(self, x: Tensor, task: str | None) -> Tensor | None:
        task = self._check(task)
        delta = (x @ self.task_A[task].t()) @ self.task_B[task].t() * self.task_scale
        shared = super()._delta(x, task)
        return delta if shared is None else shared + delta

    def delta_weight(self, task: str | None = None) -> Tensor:
        if task is None:
            raise ValueError(f"this layer has task-specific adapters for {self.tasks}: merge(task=...) needs the task")
        task = self._check(task)
        return super().delta_weight(task) + self.task_scale * (self.task_B[task] @ self.task_A[task])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tasks={self.tasks}, rank_task={self.rank_task}, task_scale={self.task_scale:g}"


def _is_block(module: nn.Module) -> bool:
    """A timm transformer block: attention with qkv/proj linears and an MLP with fc1/fc2."""
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    return (
        isinstance(attn, nn.Module)
        and isinstance(mlp, nn.Module)
        and isinstance(getattr(attn, "qkv", None), (nn.Linear, LoRALinear))
        and isinstance(getattr(mlp, "fc1", None), (nn.Linear, LoRALinear))
    )


def _norm(name: str) -> str:
    # FeatureListNet renames "layers.0" to "layers_0"; compare with dots throughout
    return "." + name.replace("_", ".")


def transformer_blocks(backbone: Backbone) -> list[tuple[str, nn.Module]]:
    """The (name, block) pairs of the timm model's transformer blocks, in forward order
    (ViT `blocks.i`, Swin `layers.s.blocks.i`); ValueError for a backbone without any (CNNs)."""
    blocks = [(name, m) for name, m in backbone.model.named_modules() if _is_block(m)]
    if not blocks:
        raise ValueError(
            f"MTLoRA adapts transformer blocks (ViT `blocks`, Swin `layers[i].blocks`), "
            f"but backbone {backbone.name!r} has none; use a ViT or Swin backbone or peft=none"
        )
    return blocks


def _feature_blocks(backbone: Backbone, blocks: list[tuple[str, nn.Module]]) -> list[int]:
    """Indices of the blocks that feed the returned feature levels: for each level's module
    (`backbone.model.feature_info`), the last block inside it or, if none, registered before it."""
    order = {name: i for i, (name, _) in enumerate(backbone.model.named_modules())}
    chosen: list[int] = []
    for stage in backbone.model.feature_info.module_name():
        want = _norm(stage)
        inside = [i for i, (name, _) in enumerate(blocks) if _norm(name).endswith(want) or want + "." in _norm(name)]
        if inside:
            chosen.append(inside[-1])
            continue
        where = [order[n] for n in order if _norm(n).endswith(want)]
        before = [i for i, (name, _) in enumerate(blocks) if where and order[name] < where[0]]
        if not before:
            raise ValueError(f"MTLoRA: no transformer block feeds feature level {stage!r} of {backbone.name}")
        chosen.append(before[-1])
    return sorted(set(chosen))


class MTLoRA:
    """MTLoRA configuration; `apply(backbone, tasks)` adapts a ViT or Swin backbone in place.

    Args:
        rank_shared: rank of the task-agnostic adapters (TA-LoRA), in every adapted block.
        rank_task: rank of the task-specific adapters (TS-LoRA).
        alpha: LoRA scaling numerator (scale alpha / rank); None = rank (scale 1).
        targets: which linears of each block to adapt: attention `qkv`, `proj`; MLP `fc1`, `fc2`.
        task_specific_blocks: where the task-specific adapters go: "last_of_stage" (the blocks feeding
            the returned feature levels: last block of each Swin stage, the ViT blocks named by
            `out_indices`), a list of block indices (forward order over all blocks), or "none".
        freeze_backbone: freeze every original backbone parameter (norms, embeddings included);
            False keeps `backbone.freeze_stages` as it was, except that the wrapped linears stay frozen.
    """

    def __init__(
        self,
        rank_shared: int = 4,
        rank_task: int = 4,
        alpha: float | None = None,
        targets: Sequence[str] = TARGETS,
        task_specific_blocks: str | Sequence[int] = "last_of_stage",
        freeze_backbone: bool = True,
    ) -> None:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"peft.targets={list(targets)}: choose a non-empty subset of {list(TARGETS)}")
        if rank_shared < 0 or rank_task < 0:
            raise ValueError(f"peft ranks must be >= 0, got rank_shared={rank_shared}, rank_task={rank_task}")
        if isinstance(task_specific_blocks, str) and task_specific_blocks not in ("last_of_stage", "none"):
            raise ValueError(
                f"peft.task_specific_blocks={task_specific_blocks!r}: expected 'last_of_stage', 'none' or a list of block indices"
            )
        self.rank_shared = rank_shared
        self.rank_task = rank_task
        self.alpha = alpha
        self.targets = tuple(targets)
        self.task_specific_blocks = (
            task_specific_blocks if isinstance(task_specific_blocks, str) else [int(i) for i in task_specific_blocks]
        )
        self.freeze_backbone = freeze_backbone

    def _task_block_indices(self, backbone: Backbone, blocks: list[tuple[str, nn.Module]]) -> list[int]:
        if self.rank_task == 0 or self.task_specific_blocks == "none":
            return []
        if self.task_specific_blocks == "last_of_stage":
            return _feature_blocks(backbone, blocks)
        n = len(blocks)
        bad = [i for i in self.task_specific_blocks if not -n <= i < n]
        if bad:
            raise ValueError(
                f"peft.task_specific_blocks={bad} out of range: {backbone.name} has {n} transformer blocks"
            )
        return sorted({i % n for i in self.task_specific_blocks})

    def apply(self, backbone: Backbone, tasks: Sequence[str]) -> None:
        """Wrap the target linears of every transformer block with LoRA adapters and freeze the rest."""
        tasks = list(tasks)
        blocks = transformer_blocks(backbone)
        if any(isinstance(m, LoRALinear) for m in backbone.model.modules()):
            raise ValueError(f"backbone {backbone.name} already has LoRA adapters; apply MTLoRA once")
        task_blocks = set(self._task_block_indices(backbone, blocks))
        if task_blocks and not tasks:
            raise ValueError("MTLoRA task-specific adapters need the list of tasks")
        if self.rank_shared == 0 and not task_blocks:
            raise ValueError("MTLoRA with rank_shared=0 and no task-specific adapters trains nothing in the backbone")
        if self.freeze_backbone:
            backbone.model.requires_grad_(False)
        for i, (_, block) in enumerate(blocks):
            for target in self.targets:
                parent = getattr(block, _PARENT[target])
                linear = getattr(parent, target, None)
                if not isinstance(linear, nn.Linear):
                    continue
                if i in task_blocks:
                    wrapped = TaskLoRALinear(
                        linear, self.rank_shared, self.alpha, tasks=tasks, rank_task=self.rank_task
                    )
                else:
                    wrapped = LoRALinear(linear, self.rank_shared, self.alpha)
                setattr(parent, target, wrapped)
        if task_blocks and backbone.tasks is None:
            backbone.tasks = tasks
        trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
        total = sum(p.numel() for p in backbone.parameters())
        log.info(
            "MTLoRA: trainable %d / total %d parameters (%.2f %%) of backbone %s; task-specific adapters in blocks %s",
            trainable,
            total,
            100.0 * trainable / max(total, 1),
            backbone.name,
            sorted(task_blocks),
        )


class NoPEFT:
    """peft=none: the backbone is trained (or frozen) as `backbone.freeze_stages` says."""

    def apply(self, backbone: Backbone, tasks: Sequence[str]) -> None:
        return None


def merge_adapters(backbone: Backbone, task: str | None = None, *, inplace: bool = False) -> Backbone:
    """The backbone with every LoRA adapter folded into plain `nn.Linear` weights for `task`
    (needed when task-specific adapters exist); a deep copy unless `inplace`. The result is no
    longer task-conditioned: it returns one list of feature maps, those of `task`."""
    out = backbone if inplace else copy.deepcopy(backbone)
    wrapped = [(name, m) for name, m in out.model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        parent_name, _, attr = name.rpartition(".")
        parent = out.model.get_submodule(parent_name) if parent_name else out.model
        setattr(parent, attr, module.merge(task))
    return out
