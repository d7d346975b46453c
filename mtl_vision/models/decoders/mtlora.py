"""MTLoRA's decoder (Agiza, Neseem, Reda, CVPR 2024; code scale-lab/MTLoRA, models/swin_mtl.py
and models/seg_hrnet.py as their default configs build them).

Each task reads its own features ({task: maps} from `peft=mtlora`, or one list shared by all
tasks): a bias-free 1x1 convolution per level and task brings the levels to HRNet-18's widths
(their `Downsampler`, `MODEL.DECODER_CHANNELS` 18, 36, 72, 144), then an HRNet segmentation head
per task (`HighResolutionHead`): the levels bilinearly upsampled to the finest and concatenated,
1x1 conv to 4x their total width, BN, ReLU, 1x1 prediction. The model resizes the predictions to
the image (their `DecoderGroup` interpolates bilinearly to the input size).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from mtl_vision.models.decoders.common import HRNetFuse

__all__ = ["MTLoRADecoder"]


class MTLoRADecoder(nn.Module):
    """Args:
        in_channels, strides: the backbone's levels (for Swin-T under peft=mtlora: 192, 384, 768,
            768 at strides 8, 16, 32, 32).
        task_channels: {task: output channels}.
        channels: width of each level after the per-task 1x1 projection (DECODER_CHANNELS); one
            int = the same width for every level.
        project: project the levels (DECODER_DOWNSAMPLER); False feeds them to the heads as they are.
        expansion: width of the head's hidden layer as a multiple of the concatenated width (4).

    `forward(features: {task: list of (N, in_channels[i], h_i, w_i)} or one such list) ->
    {task: (N, task_channels[task], h_0, w_0)}`.
    """

    per_task_features = True  # MultiTaskModel hands over {task: maps} in one call
    aux_names: tuple[str, ...] = ()

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int | Sequence[int] = (18, 36, 72, 144),
        project: bool = True,
        expansion: int = 4,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        if isinstance(channels, int):
            channels = [channels] * len(in_channels)
        if project and len(channels) != len(in_channels):
            raise ValueError(
                f"decoder.channels={list(channels)}: one width per backbone level ({len(in_channels)} levels)"
            )
        self.tasks = list(task_channels)
        widths = list(channels) if project else list(in_channels)
        self.project = (
            nn.ModuleDict(
                {
                    t: nn.ModuleList(nn.Conv2d(c_in, c, 1, bias=False) for c_in, c in zip(in_channels, widths))
                    for t in self.tasks
                }
            )
            if project
            else None
        )
        hidden = expansion * sum(widths)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(HRNetFuse(widths, hidden), nn.Conv2d(hidden, n, 1)) for t, n in task_channels.items()}
        )

    def forward(self, features: Mapping[str, Sequence[Tensor]] | Sequence[Tensor]) -> dict[str, Tensor]:
        out = {}
        for task in self.tasks:
            maps = list(features[task] if isinstance(features, Mapping) else features)
            if self.project is not None:
                maps = [conv(m) for conv, m in zip(self.project[task], maps, strict=True)]
            out[task] = self.heads[task](maps)
        return out
