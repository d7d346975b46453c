"""Task-routed mixture-of-experts decoder (M3ViT / Mod-Squad style, applied to the decoder).

The backbone levels are fused to one map of `channels` (`FuseScales`), whose positions are then
treated as tokens. `depth` pre-norm residual blocks are shared by all tasks, but every block's MLP
is a sparse `TaskMoE` with one router per task, so each task picks its own top-k experts per token
out of a shared pool:

    x = x + dwconv3x3(x)                 (cheap spatial token mixer, optional: `token_mixer`)
    x = x + TaskMoE(LayerNorm(x), task)

The blocks run on every task's copy of the fused map, stacked in the batch (each MoE layer routes
all tasks' tokens, each with its task's router, in one dispatch: `tokens * tasks * top_k` expert
MLP rows), then a per-task `task_head` predicts. `forward_task(features, task)` computes one task
only (what `MultiTaskModel` asks for on a task-conditioned backbone's per-task features).

The auxiliary losses (load balancing, optionally mutual information) and the expert statistics of
the MoE layers are exposed by `pop_aux_loss`, `expert_stats` and `reset_expert_stats`; the training
module collects them from every module that has these methods.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl_vision.models.decoders.common import FuseScales, task_head
from mtl_vision.models.moe import TaskMoE

__all__ = ["MoEBlock", "MoEDecoder"]


class MoEBlock(nn.Module):
    """Pre-norm residual block over a (N, C, H, W) map: optional depthwise 3x3 mixer, then LayerNorm ->
    TaskMoE(task) -> residual. `forward(x, task) -> same shape`; with a sequence of tasks, `x` holds
    their maps stacked along the batch (see `TaskMoE`)."""

    def __init__(self, channels: int, moe: TaskMoE, token_mixer: bool = True) -> None:
        super().__init__()
        self.mixer = nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if token_mixer else None
        self.norm = nn.LayerNorm(channels)
        self.moe = moe

    def forward(self, x: Tensor, task: str | Sequence[str]) -> Tensor:
        if self.mixer is not None:
            x = x + self.mixer(x)
        tokens = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        tokens = tokens + self.moe(self.norm(tokens), task)
        return tokens.permute(0, 3, 1, 2).contiguous()


class MoEDecoder(nn.Module):
    """Multi-scale fusion, `depth` shared blocks with task-routed MoE MLPs, then a head per task.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: width of the fused map (the token dimension of the MoE layers) and of the heads.
        num_experts: experts per MoE layer (shared by all tasks).
        top_k: experts each token is routed to.
        hidden_ratio: hidden width of every expert MLP as a multiple of `channels`.
        depth: number of MoE blocks.
        capacity_factor: expert capacity (see `TaskMoE`); None disables the limit.
        mi_loss_weight: weight of the mutual-information loss relative to load balancing.
        router_noise: std of the Gaussian noise added to the router logits while training.
        token_mixer: a depthwise 3x3 convolution before each MoE layer (spatial context).
        min_stride: backbone levels finer than this are not used.
        dispatch: how the MoE layers dispatch tokens to experts (see `TaskMoE`).

    `forward(features)` returns {task: (N, task_channels[task], H/s, W/s)}, s = `output_stride`.
    """

    aux_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 128,
        num_experts: int = 16,
        top_k: int = 2,
        hidden_ratio: float = 2.0,
        depth: int = 2,
        capacity_factor: float | None = 1.25,
        mi_loss_weight: float = 0.0,
        router_noise: float = 0.0,
        token_mixer: bool = True,
        min_stride: int = 4,
        dispatch: str = "auto",
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"decoder.depth must be >= 1, got {depth}")
        self.tasks = list(task_channels)
        self.fuse = FuseScales(in_channels, strides, channels, min_stride=min_stride)
        self.output_stride = self.fuse.output_stride
        hidden = max(1, round(channels * hidden_ratio))
        self.blocks = nn.ModuleList(
            MoEBlock(
                channels,
                TaskMoE(
                    channels,
                    hidden,
                    num_experts,
                    top_k,
                    self.tasks,
                    capacity_factor=capacity_factor,
                    mi_loss_weight=mi_loss_weight,
                    router_noise=router_noise,
                    dispatch=dispatch,
                ),
                token_mixer=token_mixer,
            )
            for _ in range(depth)
        )
        self.heads = nn.ModuleDict({task: task_head(channels, out) for task, out in task_channels.items()})

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        shared = self.fuse(features)
        tasks = list(self.heads)
        if len(tasks) == 1:
            return {tasks[0]: self._decode(shared, tasks[0])}
        # every task's copy of the map stacked in the batch: one dispatch per MoE layer for all tasks
        # (the mixer and LayerNorm work per sample, the heads' BatchNorms see their own task's chunk)
        x = shared.repeat(len(tasks), 1, 1, 1)
        for block in self.blocks:
            x = block(x, tasks)
        return {task: self.heads[task](chunk) for task, chunk in zip(tasks, x.chunk(len(tasks)), strict=True)}

    def forward_task(self, features: Sequence[Tensor], task: str) -> dict[str, Tensor]:
        """{task: map} of `task` alone, as `forward(features)[task]` computes it."""
        return {task: self._decode(self.fuse(features), task)}

    def _decode(self, shared: Tensor, task: str) -> Tensor:
        x = shared
        for block in self.blocks:
            x = block(x, task)
        return self.heads[task](x)

    # ------------------------------------------------------------------ MoE bookkeeping
    def pop_aux_loss(self) -> Tensor | None:
        """Sum of the MoE layers' auxiliary losses since the last pop (None if none was recorded)."""
        losses = [loss for loss in (block.moe.pop_aux_loss() for block in self.blocks) if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def expert_stats(self) -> dict[str, float]:
        """The `TaskMoE.expert_stats()` of every layer, keys prefixed with `layer<i>/`."""
        return {f"layer{i}/{k}": v for i, block in enumerate(self.blocks) for k, v in block.moe.expert_stats().items()}

    def reset_expert_stats(self) -> None:
        for block in self.blocks:
            block.moe.reset_expert_stats()
