"""Hard parameter sharing: fuse the backbone's scales once, then one small head per task.

The standard multi-task baseline of the dense-prediction literature (the "MTL baseline" rows of
MTI-Net, Vandenhende et al. 2021 survey, and InvPT tables): all tasks share the backbone and a
multi-scale fusion (HRNet-style: project, upsample to the finest scale, concatenate), and only the
last layers are task specific.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU


class HeadsDecoder(nn.Module):
    """Multi-scale fusion followed by a per-task head.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task, e.g. {"semseg": 40, "depth": 1}.
        channels: width of the fused representation and of the heads.
        min_stride: backbone levels finer than this are not used (a stride-2 stem costs much and
            adds little at the usual resolutions).

    `forward(features: list of (N, in_channels[i], H/strides[i], W/strides[i]))` returns
    {task: (N, task_channels[task], H/s, W/s)} with s = `output_stride`.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 128,
        min_stride: int = 4,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        self.levels = [i for i, s in enumerate(strides) if s >= min_stride] or [len(strides) - 1]
        self.output_stride = min(strides[i] for i in self.levels)
        self._finest = [strides[i] for i in self.levels].index(self.output_stride)
        self.project = nn.ModuleList(ConvBNReLU(in_channels[i], channels, kernel_size=1) for i in self.levels)
        self.fuse = ConvBNReLU(channels * len(self.levels), channels)
        self.heads = nn.ModuleDict(
            {task: nn.Sequential(ConvBNReLU(channels, channels), nn.Conv2d(channels, out, 1)) for task, out in task_channels.items()}
        )

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        maps = [features[i] for i in self.levels]
        size = maps[self._finest].shape[-2:]
        projected = [
            F.interpolate(proj(m), size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else proj(m)
            for proj, m in zip(self.project, maps)
        ]
        shared = self.fuse(torch.cat(projected, dim=1))
        return {task: head(shared) for task, head in self.heads.items()}
