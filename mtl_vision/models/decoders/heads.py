"""Hard parameter sharing: fuse the backbone's scales once, then one small head per task.

The standard multi-task baseline of the dense-prediction literature (the "MTL baseline" rows of
MTI-Net, Vandenhende et al. 2021 survey, and InvPT tables): all tasks share the backbone and a
multi-scale fusion (HRNet-style: project, upsample to the finest scale, concatenate), and only the
last layers are task specific.

`head="hrnet"` is the baseline of MTI-Net's code base (SimonVandenhende/Multi-Task-Learning-PyTorch,
`model: baseline`, `head: hrnet`): only the backbone is shared, and every task has its own HRNet
segmentation head over all levels (`HRNetFuse`, then a 1x1 prediction layer with bias).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl_vision.models.decoders.common import FuseScales, HRNetFuse, task_head

HEADS = ("fuse", "hrnet")


class HeadsDecoder(nn.Module):
    """Multi-scale fusion followed by a per-task head.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task, e.g. {"semseg": 40, "depth": 1}.
        channels: width of the fused representation and of the heads.
        min_stride: backbone levels finer than this are not used (a stride-2 stem costs much and
            adds little at the usual resolutions).
        head: "fuse" (a shared `FuseScales` to `channels`, then a 3x3 conv-BN-ReLU and a 1x1 layer
            per task) or "hrnet" (per task an HRNet head over the levels of stride >= `min_stride`
            at their full width, `channels` unused).

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
        channels: int = 64,
        min_stride: int = 4,
        head: str = "fuse",
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"decoder.head={head!r}: expected one of {list(HEADS)}")
        self.head = head
        if head == "fuse":
            self.fuse: FuseScales | None = FuseScales(in_channels, strides, channels, min_stride=min_stride)
            self.output_stride = self.fuse.output_stride
            self.heads = nn.ModuleDict({task: task_head(channels, out) for task, out in task_channels.items()})
            return
        self.fuse = None
        self.levels = [i for i, s in enumerate(strides) if s >= min_stride]
        if not self.levels or strides[self.levels[0]] != min(strides[i] for i in self.levels):
            raise ValueError(
                f"decoder.head=hrnet fuses the levels of stride >= {min_stride} onto the first of them, "
                f"which must be the finest; backbone strides {list(strides)}"
            )
        self.output_stride = strides[self.levels[0]]
        widths = [in_channels[i] for i in self.levels]
        self.heads = nn.ModuleDict(
            {task: nn.Sequential(HRNetFuse(widths), nn.Conv2d(sum(widths), out, 1)) for task, out in task_channels.items()}
        )

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        if self.fuse is None:
            maps = [features[i] for i in self.levels]
            return {task: head(maps) for task, head in self.heads.items()}
        shared = self.fuse(features)
        return {task: head(shared) for task, head in self.heads.items()}

    def forward_task(self, features: Sequence[Tensor], task: str) -> dict[str, Tensor]:
        """{task: map} of `task` alone, as `forward(features)[task]` computes it."""
        if self.fuse is None:
            return {task: self.heads[task]([features[i] for i in self.levels])}
        return {task: self.heads[task](self.fuse(features))}
