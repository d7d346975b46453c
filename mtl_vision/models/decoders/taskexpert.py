"""TaskExpert: per-stage expert decomposition, per-task dynamic gating and a multi-task feature memory.

Ye & Xu, "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", ICCV 2023 (arXiv 2307.15324). This is an independent convolutional
re-implementation of the idea, not a port of the authors' code:

1. every chosen backbone level is one *stage* (the ViT layers of the paper, or the scales of a
   CNN); its map is projected to `channels` and resampled to one working stride;
2. at each stage, `num_experts` expert networks decompose the stage feature x into task-generic
   features e_1(x) .. e_E(x) (1x1 conv-BN-ReLU then depthwise 3x3 conv-BN-ReLU, per expert);
3. per task t a gating network (1x1 convolution + softmax over experts, per pixel) gives
   g_t = softmax(W_t x) and the task feature F_t = sum_e g_t[e] * e_e(x)  [+ g_t[mem] * M_t];
4. the multi-task feature memory M_t (one map per task) starts as the task feature of the first
   stage and is updated at every stage, M_t <- M_t + F_t; from the second stage on it is one more
   expert ("memory") that the gating networks weigh, which carries task-specific information
   across the stages (the paper's long-range modelling between layers);
5. per task, a head (3x3 conv-BN-ReLU, 1x1) decodes the final memory, which gathers the task
   features of every stage.

Expert-health statistics (see `TaskMoE.expert_stats` for the naming), accumulated without
gradient over every forward since `reset_expert_stats()`, pixels of every stage pooled:
`usage/<task>/<expert>` (mean gate, experts "0".."E-1" and "memory", sums to 1 per task),
`gate_entropy/<task>` (mean per-pixel entropy of the gates, nats), `memory_usage/<task>` (mean gate
of the memory expert over the stages that have one) and `dead_share/<task>` (share of the experts,
memory included, whose mean gate is below 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU
from mtl_vision.models.decoders.common import resize_to, select_levels, task_head

__all__ = ["StageExperts", "TaskExpertDecoder"]

MEMORY = "memory"
DEAD_GATE = 1e-3


class StageExperts(nn.Module):
    """The experts of one stage: `num_experts` independent 1x1 + depthwise 3x3 networks, run as one
    wide convolution (E x 1x1 convolutions concatenated) and one depthwise convolution.

    `forward(x (N, C, H, W)) -> (N, E, C, H, W)`.
    """

    def __init__(self, channels: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        width = channels * num_experts
        self.body = nn.Sequential(
            ConvBNReLU(channels, width, kernel_size=1),
            nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x).unflatten(1, (self.num_experts, -1))


class TaskExpertDecoder(nn.Module):
    """Experts per backbone level, per-task softmax gating with the feature memory as an extra expert.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: width of the stage features, of every expert and of the memory.
        num_experts: task-generic experts per stage (the memory expert comes on top).
        stride: working stride every stage is resampled to; None: the finest chosen level's.
        min_stride, levels: the backbone levels that are stages (see `select_levels`), in order.

    `forward(features)` returns {task: (N, task_channels[task], H/s, W/s)}, s = `output_stride`.
    `forward(features, return_gates=True)` also returns, per stage, {task: gates (N, E[+1], h, w)}
    (the memory's gate last). `forward(features, memory_noise=...)` adds {task: tensor} to the
    memory after the first stage (for tests and probing).
    """

    aux_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 256,
        num_experts: int = 8,
        stride: int | None = None,
        min_stride: int = 4,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("TaskExpertDecoder needs at least one task")
        if num_experts < 1:
            raise ValueError(f"decoder.num_experts must be >= 1, got {num_experts}")
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        self.tasks = list(task_channels)
        self.num_experts = num_experts
        self.levels = select_levels(strides, min_stride=min_stride, levels=levels)
        self.level_strides = [strides[i] for i in self.levels]
        self.output_stride = int(stride) if stride is not None else min(self.level_strides)
        # the level whose map sets the working size: the nearest in stride (ties: the coarser)
        self._reference = min(
            range(len(self.levels)),
            key=lambda k: (abs(math.log2(self.level_strides[k] / self.output_stride)), -self.level_strides[k]),
        )
        num_stages = len(self.levels)
        self.project = nn.ModuleList(ConvBNReLU(in_channels[i], channels, kernel_size=1) for i in self.levels)
        self.experts = nn.ModuleList(StageExperts(channels, num_experts) for _ in range(num_stages))
        # stage 0 has no memory yet: E gates; later stages E + 1 (the memory's last)
        self.gates = nn.ModuleList(
            nn.ModuleDict({t: nn.Conv2d(channels, num_experts + (k > 0), 1) for t in self.tasks})
            for k in range(num_stages)
        )
        self.heads = nn.ModuleDict({t: task_head(channels, n) for t, n in task_channels.items()})
        self.expert_names = [str(e) for e in range(num_experts)] + [MEMORY]
        n_t, n_e = len(self.tasks), num_experts + 1
        self.register_buffer("_stat_gate", torch.zeros(n_t, n_e, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_entropy", torch.zeros(n_t, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_pixels", torch.zeros(n_t, dtype=torch.float64), persistent=False)
        self.register_buffer("_stat_memory_pixels", torch.zeros(n_t, dtype=torch.float64), persistent=False)

    def _working_size(self, features: Sequence[Tensor]) -> tuple[int, int]:
        ref = features[self.levels[self._reference]]
        scale = self.level_strides[self._reference] / self.output_stride
        return max(1, round(ref.shape[-2] * scale)), max(1, round(ref.shape[-1] * scale))

    @staticmethod
    def _resample(x: Tensor, size: tuple[int, int]) -> Tensor:
        if x.shape[-2] > size[0] and x.shape[-1] > size[1]:
            return F.adaptive_avg_pool2d(x, size)
        return resize_to(x, size)

    def forward(
        self,
        features: Sequence[Tensor],
        return_gates: bool = False,
        memory_noise: Mapping[str, Tensor] | None = None,
    ) -> dict | tuple[dict, list[dict[str, Tensor]]]:
        size = self._working_size(features)
        memory: dict[str, Tensor] = {}
        all_gates: list[dict[str, Tensor]] = []
        for k, level in enumerate(self.levels):
            x = self._resample(self.project[k](features[level]), size)
            experts = self.experts[k](x)  # (N, E, C, h, w)
            stage_gates: dict[str, Tensor] = {}
            for t in self.tasks:
                g = torch.softmax(self.gates[k][t](x), dim=1)  # (N, E[+1], h, w)
                candidates = experts if k == 0 else torch.cat([experts, memory[t].unsqueeze(1)], dim=1)
                feature = (g.unsqueeze(2) * candidates).sum(dim=1)
                memory[t] = feature if k == 0 else memory[t] + feature
                stage_gates[t] = g
            if k == 0 and memory_noise is not None:
                memory = {t: m + memory_noise[t] if t in memory_noise else m for t, m in memory.items()}
            self._accumulate(stage_gates)
            all_gates.append(stage_gates)
        out: dict = {t: self.heads[t](memory[t]) for t in self.tasks}
        return (out, all_gates) if return_gates else out

    @torch.no_grad()
    def _accumulate(self, stage_gates: Mapping[str, Tensor]) -> None:
        for i, t in enumerate(self.tasks):
            g = stage_gates[t].detach()
            n_gates = g.shape[1]
            pixels = g.numel() // n_gates
            self._stat_gate[i, :n_gates] += g.transpose(0, 1).reshape(n_gates, -1).sum(dim=1).double()
            self._stat_entropy[i] += torch.special.entr(g).sum().double()
            self._stat_pixels[i] += pixels
            if n_gates > self.num_experts:
                self._stat_memory_pixels[i] += pixels

    def reset_expert_stats(self) -> None:
        for buf in (self._stat_gate, self._stat_entropy, self._stat_pixels, self._stat_memory_pixels):
            buf.zero_()

    def expert_stats(self) -> dict[str, float]:
        """Gate statistics since the last `reset_expert_stats()` (see the module docstring)."""
        gate, entropy = self._stat_gate.cpu(), self._stat_entropy.cpu()
        pixels, memory_pixels = self._stat_pixels.cpu(), self._stat_memory_pixels.cpu()
        stats: dict[str, float] = {}
        for i, task in enumerate(self.tasks):
            if pixels[i] <= 0:
                continue
            usage = gate[i] / pixels[i]
            has_memory = memory_pixels[i] > 0
            names = self.expert_names if has_memory else self.expert_names[:-1]
            for e, name in enumerate(names):
                stats[f"usage/{task}/{name}"] = usage[e].item()
            stats[f"gate_entropy/{task}"] = entropy[i].item() / pixels[i].item()
            stats[f"dead_share/{task}"] = (usage[: len(names)] < DEAD_GATE).double().mean().item()
            if has_memory:
                stats[f"memory_usage/{task}"] = gate[i, -1].item() / memory_pixels[i].item()
        return stats
