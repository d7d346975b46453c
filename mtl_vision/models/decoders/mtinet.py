"""MTI-Net: task interactions at several scales, propagated from coarse to fine, then aggregated.

Vandenhende, Georgoulis, Van Gool, "MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task
Learning", ECCV 2020 (reference code: SimonVandenhende/Multi-Task-Learning-PyTorch). Going from
the coarsest scale to the finest (strides 32, 16, 8, 4 by default):

1. per task, two residual basic blocks turn the scale's map (concatenated with the task's
   propagated feature from the coarser scale, when there is one) into a task feature, and a 1x1
   layer into an initial prediction: aux set "scale_<stride>" (deep supervision at every scale);
2. a feature propagation module (FPM) at every scale but the finest: the task features are
   concatenated, each channel's mix over the tasks is weighted by a softmax attention over tasks
   computed from all of them, reduced to one shared map, and handed to every task through its own
   squeeze-and-excitation as a residual; the result is upsampled into the next finer scale;
3. multi-modal distillation at every scale (`padnet.MultiModalDistillation`);
4. feature aggregation: per task, the distilled features of all scales are upsampled to the finest,
   concatenated and decoded by a 1x1 conv-BN-ReLU and a 1x1 prediction layer (HRNet head).

The per-scale maps come from `ScalePyramid`, so the decoder runs on any backbone (a ViT's
stride-16 levels are resampled); the task width at scale i is `channels * width_multipliers[i]`,
by default 18/36/72/144 as the HRNet-18 branches the paper builds on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU, shortcut
from mtl_vision.models.decoders.common import ScalePyramid, resize_to
from mtl_vision.models.decoders.padnet import MultiModalDistillation

__all__ = ["BasicBlock", "FeaturePropagation", "MTINetDecoder", "SqueezeExcitation"]


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv-BN (ResNet), 1x1 conv-BN shortcut when the width changes.

    `forward(x (N, in_channels, H, W)) -> (N, out_channels, H, W)`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = shortcut(in_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SqueezeExcitation(nn.Module):
    """Channel re-weighting: x * sigmoid(MLP(global average of x)), hidden width channels // reduction."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))))
        return x * weights[:, :, None, None]


class FeaturePropagation(nn.Module):
    """FPM: a shared map distilled from all task features, given back to each task through its own SE.

    Args:
        tasks: task names.
        channels: width of every task feature.
        se_reduction: reduction of the per-task squeeze-and-excitation.

    With T tasks the concatenated features (T*channels) pass a non-linear function (two basic
    blocks at a quarter of the width, a 1x1 layer back to T*channels) whose output, softmaxed over
    the T tasks for every channel and pixel, weights the task features; the weighted concatenation
    is reduced to `channels` by a basic block (with one task there is nothing to weigh, only the
    reduction). `forward({task: (N, channels, H, W)})` returns {task: feature + SE_task(shared)},
    with `return_attention` also the softmax weights (N, T, channels, H, W) (None with one task).
    """

    def __init__(self, tasks: Sequence[str], channels: int, se_reduction: int = 16) -> None:
        super().__init__()
        self.tasks = list(tasks)
        shared = channels * len(self.tasks)
        self.attention: nn.Module | None = None
        if len(self.tasks) > 1:
            hidden = max(1, shared // 4)
            self.attention = nn.Sequential(
                BasicBlock(shared, hidden), BasicBlock(hidden, hidden), nn.Conv2d(hidden, shared, 1)
            )
        self.reduce = BasicBlock(shared, channels)
        self.excite = nn.ModuleDict({t: SqueezeExcitation(channels, se_reduction) for t in self.tasks})

    def forward(
        self, features: Mapping[str, Tensor], return_attention: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor | None]:
        stacked = torch.stack([features[t] for t in self.tasks], dim=1)  # (N, T, C, H, W)
        concat = stacked.flatten(1, 2)
        weights = None
        if self.attention is not None:
            weights = self.attention(concat).view_as(stacked).softmax(dim=1)
            concat = (weights * stacked).flatten(1, 2)
        shared = self.reduce(concat)
        out = {t: features[t] + self.excite[t](shared) for t in self.tasks}
        return (out, weights) if return_attention else out


class _InitialPrediction(nn.Module):
    """Per task: two basic blocks (input -> channels) and a 1x1 prediction layer."""

    def __init__(self, in_channels: int, channels: int, task_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.refine = nn.ModuleDict(
            {t: nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels)) for t in task_channels}
        )
        self.predict = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in task_channels.items()})

    def forward(
        self, x: Tensor, propagated: Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        features, preds = {}, {}
        for t, refine in self.refine.items():
            inp = x if propagated is None else torch.cat([x, resize_to(propagated[t], x.shape[-2:])], dim=1)
            features[t] = refine(inp)
            preds[t] = self.predict[t](features[t])
        return features, preds


class MTINetDecoder(nn.Module):
    """Multi-scale task interaction decoder.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: task feature width at the finest scale.
        width_multipliers: width of scale i = channels * width_multipliers[i] (default 1, 2, 4, 8:
            with channels=18 the HRNet-18 widths 18/36/72/144 of the paper).
        scales: strides of the scales, finest first (4, 8, 16, 32); the aux sets are "scale_<stride>".
        se_reduction: reduction of the FPM's squeeze-and-excitation (16).
        gate: attention of the distillation, "self" (PAD-Net) or "source" (MTI-Net's code).

    `forward(features)` returns {task: (N, task_channels[task], H/scales[0], W/scales[0])} and
    "aux": {"scale_<s>": {task: initial prediction at stride s}} for every scale.
    """

    aux_names: tuple[str, ...] = ("scale_4", "scale_8", "scale_16", "scale_32")

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 18,
        width_multipliers: Sequence[int] = (1, 2, 4, 8),
        scales: Sequence[int] = (4, 8, 16, 32),
        se_reduction: int = 16,
        gate: str = "self",
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("MTINetDecoder needs at least one task")
        scales = [int(s) for s in scales]
        if not scales or any(b <= a for a, b in pairwise(scales)):
            raise ValueError(f"decoder.scales must be strictly increasing strides, got {scales}")
        if len(width_multipliers) != len(scales):
            raise ValueError(f"decoder.width_multipliers {list(width_multipliers)} needs one entry per scale {scales}")
        self.tasks = list(task_channels)
        self.scales = scales
        self.output_stride = scales[0]
        self.aux_names = tuple(f"scale_{s}" for s in scales)
        self.widths = [channels * int(m) for m in width_multipliers]
        # one single-stride pyramid per scale, each with its own width
        self.pyramid = nn.ModuleList(
            ScalePyramid(in_channels, strides, w, out_strides=[s]) for s, w in zip(scales, self.widths)
        )
        last = len(scales) - 1
        self.initial = nn.ModuleList(
            _InitialPrediction(w + (self.widths[i + 1] if i < last else 0), w, task_channels)
            for i, w in enumerate(self.widths)
        )
        # FPM at every scale but the finest, feeding the next finer one
        self.fpm = nn.ModuleDict(
            {f"scale_{s}": FeaturePropagation(self.tasks, w, se_reduction) for s, w in zip(scales[1:], self.widths[1:])}
        )
        self.distill = nn.ModuleList(MultiModalDistillation(self.tasks, w, gate=gate) for w in self.widths)
        total = sum(self.widths)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(ConvBNReLU(total, total, kernel_size=1), nn.Conv2d(total, n, 1))
                for t, n in task_channels.items()
            }
        )

    def forward(self, features: Sequence[Tensor]) -> dict:
        return self.decode([pyramid(features)[0] for pyramid in self.pyramid])

    def decode(self, maps: Sequence[Tensor]) -> dict:
        """The decoder after the pyramid: `maps[i]` is (N, widths[i], H/scales[i], W/scales[i])."""
        task_features: list[dict[str, Tensor]] = [{} for _ in self.scales]
        aux: dict[str, dict[str, Tensor]] = {}
        propagated = None
        for i in reversed(range(len(self.scales))):
            task_features[i], aux[f"scale_{self.scales[i]}"] = self.initial[i](maps[i], propagated)
            if i > 0:
                propagated = self.fpm[f"scale_{self.scales[i]}"](task_features[i])
        distilled = [distill(f) for distill, f in zip(self.distill, task_features)]
        out: dict = {}
        for t in self.tasks:
            size = distilled[0][t].shape[-2:]
            out[t] = self.heads[t](torch.cat([resize_to(d[t], size) for d in distilled], dim=1))
        out["aux"] = {name: aux[name] for name in self.aux_names}
        return out
