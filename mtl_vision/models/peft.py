"""Parameter-efficient fine-tuning of transformer backbones: MTLoRA (conf/peft/mtlora*.yaml).

MTLoRA (Agiza, Neseem, Reda, "MTLoRA: A Low-Rank Adaptation Approach for Efficient Multi-Task
Learning", CVPR 2024; code scale-lab/MTLoRA) freezes a pretrained transformer and trains low-rank
updates of its linear layers: task-agnostic adapters (TA-LoRA) in every block and, in the last
block of each Swin stage, task-specific adapters (TS-LoRA) on the attention projection and the MLP.

`passes="shared"` (the default) computes the authors' function in ONE backbone pass. The
task-agnostic path runs through every block and feeds the next block and stage; in a block with
task-specific adapters each task branches off it: its attention output is the projection with its
own adapter, its MLP reads its own branch (`W h + b + s_t B_t A_t h_t`, the frozen weight applied to
the shared input, the task's update to the task's), and the branch ends there, as that task's
feature of the stage. On Swin, a stage's features are taken after the next stage's patch merging
(the authors merge at the end of a stage, timm at the start of the next): levels of strides
8, 16, 32, 32 and widths 2C, 4C, 8C, 8C, which `apply` writes into `backbone.channels/strides`.
The backbone then returns `{task: [maps]}`; decoders that declare `per_task_features` decode them
in one call. What stays trainable besides the adapters follows the authors' `mark_only_lora_as_trainable`
as their main.py calls it (`train_original`: patch embedding, norms, relative position biases,
patch-merging reductions that carry no adapter).

Their last block's task-agnostic fc2 update gets no gradient (nothing reads the last stage's
shared output), yet counts as trainable: DDP then needs `find_unused_parameters`.

`passes="per_task"` is an option of ours, not the authors': the backbone runs once per task with
that task's adapters active in every task-specific block (also on qkv), so they shape later blocks
too; `merge_adapters` folds one task's adapters into plain linears for that mode.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence

import torch
from timm.models.swin_transformer import SwinTransformerStage
from torch import Tensor, nn

from mtl_vision.models.backbone import Backbone
from mtl_vision.models.task_context import TaskConditioned, current_task

__all__ = [
    "LoRALinear",
    "MTLoRA",
    "MTLoRALinear",
    "NoPEFT",
    "TaskLoRALinear",
    "merge_adapters",
    "transformer_blocks",
]

log = logging.getLogger(__name__)

TARGETS = ("qkv", "proj", "fc1", "fc2", "downsample")
# where each target linear lives inside a timm transformer block (downsample: a Swin stage's PatchMerging)
_PARENT = {"qkv": "attn", "proj": "attn", "fc1": "mlp", "fc2": "mlp"}
SHARED_MODES = ("matrix", "matrixv2", "addition", "lora_only")
# what the authors' main.py leaves trainable in the backbone besides the adapters (name substrings)
AUTHORS_TRAINABLE = ("patch_embed", "norm", "relative_position_bias_table", "downsample.reduction")


def _low_rank(rank: int, in_features: int, out_features: int, ref: Tensor) -> tuple[nn.Parameter, nn.Parameter]:
    """(A (rank, in), B (out, rank)): A as nn.Linear initialises its weight, B zero (update starts at 0)."""
    a = torch.empty(rank, in_features, dtype=ref.dtype, device=ref.device)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    b = torch.zeros(out_features, rank, dtype=ref.dtype, device=ref.device)
    return nn.Parameter(a), nn.Parameter(b)


class MTLoRALinear(nn.Module):
    """A frozen `nn.Linear` with MTLoRA's task-agnostic and task-specific low-rank updates.

    Args:
        base: the linear layer to adapt (its parameters are frozen).
        rank: rank of the task-agnostic update; 0 = no adapter at all (also no task-specific ones).
        scale: multiplier of the task-agnostic update (the authors' `SHARED_SCALE`, not alpha/rank).
        tasks: tasks with a task-specific update (empty: task-agnostic only).
        task_rank, task_scale: rank and multiplier of each task-specific update.
        dropout: dropout on the input of the task-agnostic update (and of the task updates that read
            the shared input).
        shared_mode: "matrix" (task outputs `W x + b + s_t B_t A_t x_t`), "matrixv2" (plus the
            task-agnostic update), "addition" (no task-agnostic matrices: the shared output is
            `W x + b + LayerNorm(sum_t task output)`), "lora_only" (no task updates). Without tasks
            every mode is "matrix", as in the authors' code.

    `forward(x (..., in)) -> (..., out)`: the task-agnostic output;
    `forward_tasks(x, x_tasks) -> (shared, {task: output} or None)`.
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float = 1.0,
        *,
        tasks: Sequence[str] = (),
        task_rank: int | None = None,
        task_scale: float | None = None,
        dropout: float = 0.0,
        shared_mode: str = "matrix",
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MTLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        if shared_mode not in SHARED_MODES:
            raise ValueError(f"peft.shared_mode={shared_mode!r}: expected one of {list(SHARED_MODES)}")
        if rank < 0:
            raise ValueError(f"MTLoRA rank must be >= 0, got {rank}")
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scale = rank, float(scale)
        self.tasks = list(tasks) if rank and shared_mode != "lora_only" else []
        self.shared_mode = shared_mode if self.tasks else "matrix"
        self.task_rank = rank if task_rank is None else task_rank
        self.task_scale = self.scale if task_scale is None else float(task_scale)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self._deferred = False
        if rank and self.shared_mode in ("matrix", "matrixv2"):
            self.lora_A, self.lora_B = _low_rank(rank, self.in_features, self.out_features, base.weight)
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
        if self.tasks:
            if self.task_rank < 1:
                raise ValueError(f"task-specific LoRA rank must be >= 1, got {self.task_rank}")
            self.task_A, self.task_B = nn.ParameterDict(), nn.ParameterDict()
            for task in self.tasks:
                self.task_A[task], self.task_B[task] = _low_rank(
                    self.task_rank, self.in_features, self.out_features, base.weight
                )
        if self.shared_mode == "addition":
            self.lora_norm = nn.LayerNorm(self.out_features, device=base.weight.device, dtype=base.weight.dtype)

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Within this block `forward` returns its input: the block applies the layer itself
        afterwards (the attention projection of a task-specific block, shared and per task)."""
        self._deferred = True
        try:
            yield
        finally:
            self._deferred = False

    def forward_tasks(self, x: Tensor, x_tasks: Mapping[str, Tensor] | None = None) -> tuple[Tensor, dict | None]:
        """(task-agnostic output, {task: output}) of input `x` and per-task inputs `x_tasks` (None:
        every task update reads `x` after dropout); the dict is None without task adapters."""
        frozen = self.base(x)
        if not self.rank:
            return frozen, None
        x = self.dropout(x)
        deltas = {
            t: (x if x_tasks is None else x_tasks[t]) @ self.task_A[t].t() @ self.task_B[t].t() * self.task_scale
            for t in self.tasks
        }
        if self.shared_mode == "addition":
            tasks = {t: frozen + d for t, d in deltas.items()}
            return frozen + self.lora_norm(torch.stack(list(tasks.values())).sum(0)), tasks
        update = (x @ self.lora_A.t() @ self.lora_B.t()) * self.scale
        if self.shared_mode == "matrixv2":
            return frozen + update, {t: frozen + update + d for t, d in deltas.items()}
        return frozen + update, {t: frozen + d for t, d in deltas.items()} or None

    def forward(self, x: Tensor) -> Tensor:
        if self._deferred:
            return x
        return self.forward_tasks(x)[0]

    def merge(self) -> nn.Linear:
        """A plain (frozen) `nn.Linear` computing the task-agnostic output (task updates dropped;
        only for layers without them)."""
        if self.tasks:
            raise ValueError(
                f"this layer has task-specific adapters for {self.tasks}, which branch off the shared pass: "
                "it cannot become one linear (peft.passes=per_task backbones merge per task)"
            )
        base = self.base
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None)
        merged = merged.to(device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            delta = self.scale * (self.lora_B @ self.lora_A) if self.rank else 0
            merged.weight.copy_(base.weight + delta)
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)

    @property
    def trainable(self) -> int:
        """Number of adapter parameters that require gradients."""
        return sum(p.numel() for name, p in self.named_parameters() if not name.startswith("base.") and p.requires_grad)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, rank={self.rank}, scale={self.scale:g}, "
            f"tasks={self.tasks}, task_rank={self.task_rank}, task_scale={self.task_scale:g}, mode={self.shared_mode}"
        )


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
    linear = (nn.Linear, LoRALinear, MTLoRALinear)
    attn, mlp = getattr(module, "attn", None), getattr(module, "mlp", None)
    return (
        isinstance(attn, nn.Module)
        and isinstance(mlp, nn.Module)
        and isinstance(getattr(attn, "qkv", None), linear)
        and isinstance(getattr(mlp, "fc1", None), linear)
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


def _per_stage(value: float | Sequence, stages: int, key: str) -> list:
    """A per-stage list from one value or a list of length 1 or `stages` (the authors' R, SHARED_SCALE, ...)."""
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    if len(values) == 1:
        values = values * stages
    if len(values) != stages:
        raise ValueError(f"peft.{key}={values}: expected one value or one per stage ({stages} stages)")
    return values


def _stage_of(name: str) -> int:
    """The Swin stage of a module named `layers_2.blocks.1` / `layers.2...` (0 for a ViT)."""
    match = re.search(r"(?:^|\.)layers[._](\d+)", name)
    return int(match[1]) if match else 0


def _branches(block: nn.Module) -> bool:
    """Whether the block has task-specific adapters (on its attention projection)."""
    proj = getattr(block.attn, "proj", None)
    return isinstance(proj, MTLoRALinear) and bool(proj.tasks)


def _branch_block(block: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """A timm Swin or ViT block with task-specific adapters: (its task-agnostic output, {task:
    output of the task's branch}); x (N, H, W, C) for Swin, (N, L, C) for a ViT. The attention runs
    once; its projection, a per-token linear map that commutes with Swin's window reverse and roll,
    is applied afterwards, shared and per task."""
    attn, mlp = block.attn, block.mlp
    with attn.proj.deferred():
        mixed = block._attn(block.norm1(x)) if hasattr(block, "_attn") else attn(block.norm1(x))
    shared, tasks = attn.proj.forward_tasks(mixed)
    ls1, ls2 = getattr(block, "ls1", nn.Identity()), getattr(block, "ls2", nn.Identity())
    x_tasks = {t: x + block.drop_path1(ls1(v)) for t, v in tasks.items()}
    x = x + block.drop_path1(ls1(shared))
    hidden, hidden_tasks = mlp.fc1.forward_tasks(block.norm2(x), {t: block.norm2(v) for t, v in x_tasks.items()})

    def after_fc1(h: Tensor) -> Tensor:
        return mlp.norm(mlp.drop1(mlp.act(h)))

    out, out_tasks = mlp.fc2.forward_tasks(after_fc1(hidden), {t: after_fc1(h) for t, h in hidden_tasks.items()})
    x_tasks = {t: x_tasks[t] + block.drop_path2(ls2(mlp.drop2(v))) for t, v in out_tasks.items()}
    return x + block.drop_path2(ls2(mlp.drop2(out))), x_tasks


def _run_blocks(blocks: nn.Module, x: Tensor, tasks: Sequence[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """(shared output, {task: branch}) of a sequence of blocks; only the last block's branches are
    kept (the authors' stage returns them), a last block without branches gives every task the shared output."""
    branches: dict[str, Tensor] | None = None
    for block in blocks:
        if _branches(block):
            x, branches = _branch_block(block, x)
        else:
            x, branches = block(x), None
    return x, branches if branches is not None else {t: x for t in tasks}


def _each(branches: dict[str, Tensor], fn) -> dict[str, Tensor]:
    """{task: fn(branch)}, computed once per distinct tensor (tasks without a branch share one)."""
    done: dict[int, Tensor] = {}
    for value in branches.values():
        if id(value) not in done:
            done[id(value)] = fn(value)
    return {t: done[id(v)] for t, v in branches.items()}


def swin_task_features(backbone: Backbone, image: Tensor) -> dict[str, list[Tensor]]:
    """One pass of an MTLoRA Swin: {task: [the authors' stage outputs, NCHW]}, each stage's last
    block's task branch after the next stage's patch merging (the last stage's as it is)."""
    tasks = list(backbone.tasks or [])
    features: dict[str, list[Tensor]] = {t: [] for t in tasks}
    branches: dict[str, Tensor] | None = None
    x = image
    for module in backbone.model.children():
        if not isinstance(module, SwinTransformerStage):
            x = module(x)
            continue
        x = module.downsample(x)
        if branches is not None:
            for t, merged in _each(branches, module.downsample).items():
                features[t].append(merged)
        x, branches = _run_blocks(module.blocks, x, tasks)
    for t in tasks:
        features[t].append(branches[t])
    levels = zip(*(features[t] for t in tasks), strict=True)
    maps = [_each(dict(zip(tasks, level)), lambda f: f.permute(0, 3, 1, 2).contiguous()) for level in levels]
    return {t: [level[t] for level in maps] for t in tasks}


def vit_task_features(backbone: Backbone, image: Tensor) -> dict[str, list[Tensor]]:
    """One pass of an MTLoRA ViT: {task: [maps at out_indices, NCHW]}, a level read from the task's
    branch where its block has task-specific adapters (as timm's forward_intermediates shapes them)."""
    tasks = list(backbone.tasks or [])
    vit = backbone.model.model
    depth = len(vit.blocks)
    indices = [int(i) % depth for i in backbone.model.out_indices]
    n, _, height, width = image.shape
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(image))))
    levels: dict[str, list[Tensor]] = {t: [] for t in tasks}
    for i, block in enumerate(vit.blocks[: max(indices) + 1]):
        x, branches = _run_blocks([block], x, tasks)
        if i in indices:
            for t in tasks:
                levels[t].append(branches[t])
    grid = vit.patch_embed.dynamic_feat_size((height, width))
    prefix = vit.num_prefix_tokens

    def to_map(tokens: Tensor, last: bool) -> Tensor:
        tokens = vit.norm(tokens) if last and backbone.final_norm else tokens
        return tokens[:, prefix:].reshape(n, *grid, -1).permute(0, 3, 1, 2).contiguous()

    return {t: [to_map(y, j == len(maps) - 1) for j, y in enumerate(maps)] for t, maps in levels.items()}


class MTLoRA:
    """MTLoRA configuration; `apply(backbone, tasks)` adapts a Swin (or ViT) backbone in place.

    Args:
        rank_shared: rank of the task-agnostic adapters (the authors' R), one or one per stage.
        rank_task: rank of the task-specific adapters (R_PER_TASK; None = rank_shared), one or per stage.
        shared_scale: multiplier of the task-agnostic updates (SHARED_SCALE), one or per stage.
        task_scale: multiplier of the task-specific updates (their SCALE_PER_TASK, which defaults to
            SHARED_SCALE; None = shared_scale), one or per stage.
        dropout: dropout on the adapters' input (DROPOUT), one or per stage.
        shared_mode: how task-specific layers form their shared output (`MTLoRALinear`; SHARED_MODE).
        targets: adapted linears: attention `qkv`, `proj`; MLP `fc1`, `fc2`; Swin `downsample`
            (the patch-merging reduction; MTLoRA+, DOWNSAMPLER_ENABLED). Task-specific blocks need
            proj, fc1 and fc2; qkv is task-agnostic everywhere, as in the authors' code.
        task_specific_blocks: "last_of_stage" (the blocks feeding the returned levels: the last block
            of each Swin stage, the ViT blocks named by `out_indices`), block indices, or "none".
        train_original: substrings of the backbone's own parameter names that stay trainable (the
            authors' main.py: patch embedding, norms, relative position bias tables, reductions);
            the weights inside adapted linears are always frozen. Empty = freeze everything else.
        passes: "shared" (one pass, the authors' function) or "per_task" (ours: one pass per task,
            see the module docstring).
    """

    def __init__(
        self,
        rank_shared: int | Sequence[int] = 4,
        rank_task: int | Sequence[int] | None = None,
        shared_scale: float | Sequence[float] = 1.0,
        task_scale: float | Sequence[float] | None = None,
        dropout: float | Sequence[float] = 0.0,
        shared_mode: str = "matrix",
        targets: Sequence[str] = ("qkv", "proj", "fc1", "fc2"),
        task_specific_blocks: str | Sequence[int] = "last_of_stage",
        train_original: Sequence[str] = AUTHORS_TRAINABLE,
        passes: str = "shared",
    ) -> None:
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise ValueError(f"peft.targets={list(targets)}: choose a non-empty subset of {list(TARGETS)}")
        if shared_mode not in SHARED_MODES:
            raise ValueError(f"peft.shared_mode={shared_mode!r}: expected one of {list(SHARED_MODES)}")
        if passes not in ("shared", "per_task"):
            raise ValueError(f"peft.passes={passes!r}: expected shared or per_task")
        if isinstance(task_specific_blocks, str) and task_specific_blocks not in ("last_of_stage", "none"):
            raise ValueError(
                f"peft.task_specific_blocks={task_specific_blocks!r}: expected 'last_of_stage', 'none' or a list of block indices"
            )
        self.rank_shared, self.rank_task = rank_shared, rank_task
        self.shared_scale, self.task_scale, self.dropout = shared_scale, task_scale, dropout
        self.shared_mode = shared_mode
        self.targets = tuple(targets)
        self.task_specific_blocks = (
            task_specific_blocks if isinstance(task_specific_blocks, str) else [int(i) for i in task_specific_blocks]
        )
        self.train_original = tuple(train_original)
        self.passes = passes

    def _task_block_indices(self, backbone: Backbone, blocks: list[tuple[str, nn.Module]]) -> list[int]:
        if self.task_specific_blocks == "none" or self.shared_mode == "lora_only":
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
        """Wrap the target linears with adapters, freeze the rest but `train_original`, and (shared
        passes) install the single-pass forward that returns {task: maps}."""
        tasks = list(tasks)
        blocks = transformer_blocks(backbone)
        if any(isinstance(m, (LoRALinear, MTLoRALinear)) for m in backbone.model.modules()):
            raise ValueError(f"backbone {backbone.name} already has LoRA adapters; apply MTLoRA once")
        stages = [m for m in backbone.model.children() if isinstance(m, SwinTransformerStage)]
        swin = bool(stages)
        if "downsample" in self.targets and not swin:
            raise ValueError(f"peft.targets has downsample (Swin patch merging), but {backbone.name} is no Swin")
        n_stages = len(stages) if swin else 1
        ranks = _per_stage(self.rank_shared, n_stages, "rank_shared")
        task_ranks = _per_stage(self.rank_task if self.rank_task is not None else ranks, n_stages, "rank_task")
        scales = _per_stage(self.shared_scale, n_stages, "shared_scale")
        task_scales = _per_stage(self.task_scale if self.task_scale is not None else scales, n_stages, "task_scale")
        dropouts = _per_stage(self.dropout, n_stages, "dropout")
        if min(ranks) < 0 or min(task_ranks) < 0:
            raise ValueError(f"peft ranks must be >= 0, got rank_shared={ranks}, rank_task={task_ranks}")
        task_blocks = set(self._task_block_indices(backbone, blocks))
        if task_blocks and not tasks:
            raise ValueError("MTLoRA task-specific adapters need the list of tasks")
        if max(ranks) == 0 and not (task_blocks and self.passes == "per_task"):
            raise ValueError("MTLoRA with rank_shared=0 trains no adapter in the backbone")
        if task_blocks and self.passes == "shared" and not {"proj", "fc1", "fc2"} <= set(self.targets):
            raise ValueError(f"peft.targets={list(self.targets)}: task-specific blocks need proj, fc1 and fc2")
        if swin and self.passes == "shared" and len(backbone.channels) != len(stages):
            raise ValueError(f"MTLoRA on {backbone.name} reads every stage: leave backbone.out_indices unset")
        backbone.model.requires_grad_(False)
        for name, p in backbone.model.named_parameters():
            if any(key in name for key in self.train_original):
                p.requires_grad_(True)
        for i, (name, block) in enumerate(blocks):
            s = _stage_of(name)
            for target in self.targets:
                if target == "downsample":
                    continue
                parent = getattr(block, _PARENT[target])
                linear = getattr(parent, target, None)
                if not isinstance(linear, nn.Linear):
                    continue
                specific = i in task_blocks and (target != "qkv" or self.passes == "per_task")
                setattr(
                    parent,
                    target,
                    self._wrap(
                        linear,
                        ranks[s],
                        scales[s],
                        task_ranks[s],
                        task_scales[s],
                        dropouts[s],
                        tasks if specific else (),
                    ),
                )
            if i in task_blocks and self.passes == "shared" and block.attn.proj_drop.p > 0:
                raise ValueError(
                    f"MTLoRA task-specific block {name} needs attention proj_drop 0 (the authors' drop_rate)"
                )
        if "downsample" in self.targets:
            # timm's stage i starts with the merging that ends the authors' stage i-1 (its rank and scale)
            for i, stage in enumerate(stages[1:], start=0):
                merge = stage.downsample
                merge.reduction = MTLoRALinear(merge.reduction, ranks[i], scales[i], dropout=dropouts[i])
        if self.passes == "shared":
            backbone.tasks = tasks
            backbone.task_features = swin_task_features if swin else vit_task_features
            if swin:
                backbone.channels = [*backbone.channels[1:], backbone.channels[-1]]
                backbone.strides = [*backbone.strides[1:], backbone.strides[-1]]
        elif task_blocks and backbone.tasks is None:
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

    def _wrap(
        self, linear: nn.Linear, rank: int, scale: float, task_rank: int, task_scale: float, dropout: float, tasks
    ) -> nn.Module:
        if self.passes == "per_task":
            # our per-task LoRA layers scale both updates by alpha / rank
            alpha = scale * rank if rank else task_scale * task_rank
            if tasks and not math.isclose(alpha / task_rank, task_scale):
                raise ValueError(
                    "peft.passes=per_task scales every update by alpha/rank: it needs "
                    "shared_scale * rank_shared == task_scale * rank_task"
                )
            if tasks:
                return TaskLoRALinear(linear, rank, alpha, tasks=tasks, rank_task=task_rank)
            return LoRALinear(linear, rank, alpha)
        return MTLoRALinear(
            linear,
            rank,
            scale,
            tasks=tasks,
            task_rank=task_rank,
            task_scale=task_scale,
            dropout=dropout,
            shared_mode=self.shared_mode,
        )


class NoPEFT:
    """peft=none: the backbone is trained (or frozen) as `backbone.freeze_stages` says."""

    def apply(self, backbone: Backbone, tasks: Sequence[str]) -> None:
        return None


def merge_adapters(backbone: Backbone, task: str | None = None, *, inplace: bool = False) -> Backbone:
    """The backbone with its adapters folded into plain `nn.Linear` weights (a deep copy unless
    `inplace`). Per-task passes: those of `task` (needed where task-specific adapters exist); the
    result returns one list of feature maps, those of `task`. Shared passes: only task-agnostic
    adapters fold (a task's branch cannot become a plain layer); the single-pass forward stays."""
    out = backbone if inplace else copy.deepcopy(backbone)
    wrapped = [(name, m) for name, m in out.model.named_modules() if isinstance(m, (LoRALinear, MTLoRALinear))]
    for name, module in wrapped:
        parent_name, _, attr = name.rpartition(".")
        parent = out.model.get_submodule(parent_name) if parent_name else out.model
        setattr(parent, attr, module.merge() if isinstance(module, MTLoRALinear) else module.merge(task))
    return out
