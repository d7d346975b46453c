"""Hard parameter sharing: fuse the backbone's scales once, then one small head per task.

The standard multi-task baseline of the dense-prediction literature (the "MTL baseline" rows of
MTI-Net, Vandenhende et al. 2021 survey, and InvPT tables): all tasks share the backbone and a
multi-scale fusion (HRNet-style: project, upsample to the finest scale, concatenate), and only the
last layers are task specific.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl_vision.models.decoders.common import FuseScales, task_head


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

    aux_names: tuple[str, ...] = ()

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
        self.fuse = FuseScales(in_channels, strides, channels, min_stride=min_stride)
        self.output_stride = self.fuse.output_stride
        self.heads = nn.ModuleDict({task: task_head(channels, out) for task, out in task_channels.items()})

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        shared = self.fuse(features)
        return {task: head(shared) for task, head in self.heads.items()}
