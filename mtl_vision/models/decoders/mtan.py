"""MTAN's task-attention modules and task heads (Liu, Johns, Davison, "End-to-End Multi-Task
Learning with Attention", CVPR 2019; code lorenmt/mtan ``im2im_pred/model_segnet_mtan.py``, the
copy of AvivNavon/nash-mtl and Cranial-XIX/FAMO ``experiments/nyuv2/models.py``), on the maps of
``backbone=segnet`` (mtl_vision/models/segnet.py).

Per task, a chain of soft attention masks follows the shared SegNet: at encoder stage j a mask
(1x1 conv-BN-ReLU, 1x1 conv-BN-sigmoid) computed from the stage's first map (and the task's
previous attended features) multiplies the stage's output; a 3x3 conv-BN-ReLU shared by all tasks
and a 2x2 max-pool carry the attended features to the next stage. The decoder side does the same
coarse to fine, after a bilinear x2 upsampling (align_corners=True) and a shared 3x3 block, with
masks computed from the unpooled map. A head (3x3 conv, 1x1 conv, both with bias) predicts each
task from its finest attended features.

Outputs follow our contract: semseg logits (MTAN's ``log_softmax`` of them is what its NLL loss
reads; ``F.cross_entropy`` of the logits is that same loss), depth as predicted, normals divided
by their L2 norm as MTAN does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.models.segnet import STAGES, conv_bn_relu, xavier_init

__all__ = ["MTANDecoder", "attention_mask"]


def attention_mask(in_channels: int, channels: int) -> nn.Sequential:
    """1x1 conv-BN-ReLU, 1x1 conv-BN, sigmoid: a soft mask of `channels` channels in (0, 1)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 1),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, channels, 1),
        nn.BatchNorm2d(channels),
        nn.Sigmoid(),
    )


class MTANDecoder(nn.Module):
    """Task attention over SegNet's maps, and one head per task.

    Args:
        in_channels, strides: of the 20 maps `backbone=segnet` returns (bound at run time).
        task_channels: {task: output channels}; every task gets its own attention chain.
        normalise: tasks whose prediction is divided by its L2 norm over channels (MTAN's normals).
        channels: width of each head's 3x3 convolution; None = the finest SegNet width (MTAN's).

    `forward(features: the 20 SegNet maps) -> {task: (N, task_channels[task], H, W)}` at the input size.
    """

    aux_names: tuple[str, ...] = ()
    backbone_kind = "segnet"  # reads the 20 maps of backbone=segnet (tests pick it for this decoder)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        normalise: Sequence[str] = ("normals",),
        channels: int | None = None,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4 * STAGES or list(strides[:2]) != [1, 1]:
            raise ValueError(
                f"decoder=mtan reads the {4 * STAGES} maps of backbone=segnet, got {len(in_channels)} levels "
                f"of strides {list(strides)}"
            )
        enc = [in_channels[2 * j] for j in range(STAGES)]  # encoder widths
        up = [in_channels[2 * STAGES + 2 * j] for j in range(STAGES)]  # unpooled decoder inputs
        dec = [in_channels[2 * STAGES + 2 * j + 1] for j in range(STAGES)]  # decoder stage outputs
        self.tasks = list(task_channels)
        self.normalise = [t for t in normalise if t in task_channels]
        # what the shared blocks of the attention path carry: to the next encoder stage's width
        # (the coarsest keeps its own), then to each decoder stage's output width
        self.encoder_shared = nn.ModuleList(conv_bn_relu(enc[j], enc[min(j + 1, STAGES - 1)]) for j in range(STAGES))
        self.decoder_shared = nn.ModuleList(
            conv_bn_relu(enc[STAGES - 1] if j == 0 else dec[j - 1], dec[j]) for j in range(STAGES)
        )
        self.encoder_att = nn.ModuleDict(
            {
                t: nn.ModuleList(attention_mask(enc[j] if j == 0 else 2 * enc[j], enc[j]) for j in range(STAGES))
                for t in self.tasks
            }
        )
        self.decoder_att = nn.ModuleDict(
            {t: nn.ModuleList(attention_mask(up[j] + dec[j], dec[j]) for j in range(STAGES)) for t in self.tasks}
        )
        width, hidden = dec[-1], channels or dec[-1]
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(nn.Conv2d(width, hidden, 3, padding=1), nn.Conv2d(hidden, c, 1))
                for t, c in task_channels.items()
            }
        )
        xavier_init(self)

    def attend(self, features: Sequence[Tensor], task: str) -> Tensor:
        """The finest attended features of `task`, (N, widths[0], H, W)."""
        x: Tensor | None = None
        for j, (mask, shared) in enumerate(zip(self.encoder_att[task], self.encoder_shared)):
            first, out = features[2 * j], features[2 * j + 1]
            a = mask(first if x is None else torch.cat((first, x), dim=1)) * out
            x = F.max_pool2d(shared(a), kernel_size=2, stride=2)
        for j, (mask, shared) in enumerate(zip(self.decoder_att[task], self.decoder_shared)):
            up, out = features[2 * STAGES + 2 * j], features[2 * STAGES + 2 * j + 1]
            # their scale_factor=2; the same sampling at even sizes (align_corners), and odd ones work
            x = shared(F.interpolate(x, size=up.shape[-2:], mode="bilinear", align_corners=True))
            x = mask(torch.cat((up, x), dim=1)) * out
        return x

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        out = {}
        for task in self.tasks:
            pred = self.heads[task](self.attend(features, task))
            if task in self.normalise:
                pred = pred / torch.norm(pred, p=2, dim=1, keepdim=True)
            out[task] = pred
        return out
