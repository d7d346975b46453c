"""What decoders share: choosing backbone levels, fusing them, building a pyramid, task heads.

The decoder contract (every file in conf/decoder/ builds one):

* constructor keyword arguments `in_channels`, `strides` (from the backbone) and `task_channels`
  ({task: output channels}, from the dataset), bound at run time, plus the decoder's own config;
* `forward(features: list of (N, in_channels[i], H/strides[i], W/strides[i]))` returns
  `{task: raw map (N, task_channels[task], h, w)}` at any resolution (the model resizes to the
  input), optionally with `"aux": {name: {task: map}}` of intermediate predictions (deep
  supervision) whose losses are weighted by `loss.aux_weights[name]` (default `loss.aux_weight`);
* `aux_names`: the names of the aux prediction sets it returns (empty if none);
* optionally `per_task_features = True`: a task-conditioned backbone's `{task: features}` (MTLoRA's
  one shared pass with task branches) reach `forward` in one call (MTLoRA's decoder); without it
  `MultiTaskModel` decodes each task from that task's features: with `forward_task(features, task)
  -> {task: map}` (plus that task's "aux" entries) when the decoder has it (the tasks' heads are
  independent: `heads`, `moe`), computing that task alone, else by running the whole decoder and
  keeping that task's outputs;
* optionally the constructor argument `auxiliary_tasks` (tasks of `task_channels` supervised only
  through the aux predictions, as MTI-Net's and PAD-Net's auxiliary edges and normals) and the
  attribute `final_tasks` (the others): the final maps are then returned for `final_tasks` only,
  and only those tasks get metrics, pictures and `mtl-predict` outputs;
* optionally `encode(backbone, normalised_image) -> features`, for a decoder that works inside the
  encoder (TaskPrompter's prompts join the ViT's attention): `MultiTaskModel.encode` then calls it
  instead of the backbone, `encoder_modules` names the decoder's submodules used there (gradient
  balancers of the features count them as shared), and `backbone_kind = "vit"` says it needs a
  plain ViT (`"segnet"`: the 20 maps of `backbone=segnet`, MTAN's attention).

Decoders that need several scales take them from the backbone levels (`levels` / `min_stride`)
or, for single-scale backbones such as ViT (every level at stride 16), from `ScalePyramid`,
which resamples the levels to the strides the decoder asks for (as ViTDet's simple pyramid).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU

__all__ = ["FuseScales", "HRNetFuse", "ScalePyramid", "final_tasks_of", "resize_to", "select_levels", "task_head"]


def final_tasks_of(task_channels: Mapping[str, int] | Sequence[str], auxiliary_tasks: Sequence[str]) -> list[str]:
    """The tasks of `task_channels` (its keys, or a list of task names; in its order) that are not
    in `auxiliary_tasks`: those with a final prediction (the decoder contract above).

    Raises:
        ValueError: naming `decoder.auxiliary_tasks` when it lists unknown tasks or all of them.
    """
    auxiliary = list(auxiliary_tasks)
    unknown = [t for t in auxiliary if t not in task_channels]
    if unknown:
        raise ValueError(
            f"decoder.auxiliary_tasks={auxiliary}: {unknown} are not among the trained tasks {list(task_channels)}"
        )
    final = [t for t in task_channels if t not in auxiliary]
    if not final:
        raise ValueError(
            f"decoder.auxiliary_tasks={auxiliary} lists every trained task; at least one needs a final prediction"
        )
    return final


def resize_to(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize of a (N,C,h,w) map to `size`, a no-op when it already has that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def select_levels(strides: Sequence[int], *, min_stride: int = 4, levels: Sequence[int] | None = None) -> list[int]:
    """Indices of the backbone levels a decoder uses: `levels` if given (checked), else every
    level with stride >= `min_stride` (the finest level if none qualifies)."""
    if levels is not None:
        chosen = list(levels)
        bad = [i for i in chosen if not -len(strides) <= i < len(strides)]
        if bad or not chosen:
            raise ValueError(
                f"decoder levels {chosen} do not index the backbone's {len(strides)} levels (strides {list(strides)})"
            )
        return [i % len(strides) for i in chosen]
    return [i for i, s in enumerate(strides) if s >= min_stride] or [len(strides) - 1]


def task_head(in_channels: int, out_channels: int, hidden: int | None = None) -> nn.Sequential:
    """3x3 conv-BN-ReLU then a 1x1 prediction layer."""
    hidden = hidden or in_channels
    return nn.Sequential(ConvBNReLU(in_channels, hidden), nn.Conv2d(hidden, out_channels, 1))


class FuseScales(nn.Module):
    """Project the chosen levels to `channels`, upsample to the finest, concatenate, fuse (HRNet-style).

    `forward(features) -> (N, channels, H/output_stride, W/output_stride)`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        channels: int,
        *,
        min_stride: int = 4,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        self.levels = select_levels(strides, min_stride=min_stride, levels=levels)
        self.output_stride = min(strides[i] for i in self.levels)
        self._finest = [strides[i] for i in self.levels].index(self.output_stride)
        self.project = nn.ModuleList(ConvBNReLU(in_channels[i], channels, kernel_size=1) for i in self.levels)
        self.fuse = ConvBNReLU(channels * len(self.levels), channels)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        maps = [features[i] for i in self.levels]
        size = maps[self._finest].shape[-2:]
        return self.fuse(torch.cat([resize_to(proj(m), size) for proj, m in zip(self.project, maps)], dim=1))


class HRNetFuse(nn.Module):
    """HRNet's segmentation fusion: every level bilinearly upsampled to the first (finest) one,
    concatenated as they come, then a 1x1 convolution with bias + BN + ReLU at the full width
    (no projection per level), as the `HighResolutionFuse` of MTI-Net's code base (and, with a
    prediction layer after it, HRNet's segmentation head).

    Args:
        in_channels: channels of each level, finest first (HRNet-18: 18, 36, 72, 144).
        out_channels: width of the fused map; default sum(in_channels) (270 for HRNet-18).

    `forward(features: list of (N, in_channels[i], h_i, w_i)) -> (N, out_channels, h_0, w_0)`.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: int | None = None) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("HRNetFuse needs at least one level")
        total = sum(in_channels)
        self.in_channels = list(in_channels)
        self.out_channels = out_channels or total
        self.fuse = nn.Sequential(
            nn.Conv2d(total, self.out_channels, 1),
            nn.BatchNorm2d(self.out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"HRNetFuse: expected {len(self.in_channels)} levels, got {len(features)}")
        size = features[0].shape[-2:]
        return self.fuse(torch.cat([features[0], *(resize_to(f, size) for f in features[1:])], dim=1))


class ScalePyramid(nn.Module):
    """Feature maps at fixed strides (e.g. 4, 8, 16, 32) from any backbone.

    For each output stride, the backbone level of the nearest stride (the coarser one on a tie, it
    has seen more context) is projected to `channels`, resampled (bilinear up, average-pool down)
    and refined by a 3x3 conv-BN-ReLU. On a CNN whose levels already have these strides this is a
    projection per level; on a ViT (every level at stride 16) it builds the multi-scale input that
    MTI-Net-style decoders need.

    `forward(features) -> list of (N, channels, H/s, W/s)` for s in `out_strides`.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        channels: int,
        out_strides: Sequence[int] = (4, 8, 16, 32),
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        self.out_strides = list(out_strides)
        self.sources = []
        for s in self.out_strides:
            # nearest in log-scale; ties go to the coarser (later) level
            best = min(range(len(strides)), key=lambda i: (abs(math.log2(strides[i] / s)), -strides[i], -i))
            self.sources.append(best)
        self.project = nn.ModuleList(ConvBNReLU(in_channels[i], channels, kernel_size=1) for i in self.sources)
        self.refine = nn.ModuleList(ConvBNReLU(channels, channels) for _ in self.out_strides)
        self._in_strides = [strides[i] for i in self.sources]

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for src, in_stride, s, proj, refine in zip(
            self.sources, self._in_strides, self.out_strides, self.project, self.refine
        ):
            x = proj(features[src])
            if in_stride > s:
                x = F.interpolate(x, scale_factor=in_stride / s, mode="bilinear", align_corners=False)
            elif in_stride < s:
                x = F.avg_pool2d(x, kernel_size=s // in_stride, ceil_mode=True)
            out.append(refine(x))
        return out
