"""SegNet (Badrinarayanan et al., TPAMI 2017) as the shared network of MTAN (Liu, Johns, Davison,
"End-to-End Multi-Task Learning with Attention", CVPR 2019; code lorenmt/mtan
``im2im_pred/model_segnet_mtan.py``, copied by AvivNavon/nash-mtl and Cranial-XIX/FAMO
``experiments/nyuv2/models.py``).

A VGG-like encoder of five stages (max-pooled with indices) and its mirror decoder (max-unpooled with
those indices). MTAN's task-attention modules read, at every stage, the map after the stage's first
block and the stage's output; this backbone returns exactly those maps (``SegNet.forward``), so the
attention modules and task heads live in the decoder (``decoders/mtan.py``) and ``balancer.mode:
features`` differentiates the task losses with respect to these 20 shared maps.

Not a timm model: a ``FeatureBackbone`` (what ``MultiTaskModel`` reads from a backbone:
``channels``, ``strides``, ``mean``, ``std``, ``task_conditioned``). MTAN feeds the images as
stored ([0, 1], unnormalised), hence mean 0 and std 1 by default. MTAN's sizes are multiples of 32;
other sizes (at least 32) work too, each unpooling restoring the size its pooling had (ours; at
multiples of 32 the same as theirs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.models.backbone import FeatureBackbone

__all__ = ["SegNet", "conv_bn_relu", "xavier_init"]

STAGES = 5


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Convolution with bias ('same' padding), batch norm, ReLU: MTAN's block."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def xavier_init(module: nn.Module) -> None:
    """MTAN's initialisation: Xavier-normal convolutions with zero bias, BatchNorm at (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _Stage(nn.Module):
    """`first` block, then the `rest` blocks (one in the two finest stages, two in the others)."""

    def __init__(self, in_channels: int, out_channels: int, repeats: int) -> None:
        super().__init__()
        self.first = conv_bn_relu(in_channels, out_channels)
        self.rest = nn.Sequential(*(conv_bn_relu(out_channels, out_channels) for _ in range(repeats)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        first = self.first(x)
        return first, self.rest(first)


class SegNet(FeatureBackbone):
    """The shared SegNet of MTAN.

    Args:
        name: what runs call this backbone (the default baselines file is named after it).
        widths: channels of the five encoder stages (MTAN: 64, 128, 256, 512, 512). The decoder
            mirrors them; MTAN's attention needs the last two equal.
        tasks: the trained tasks (bound at run time; the features are shared by all of them).
        pretrained: MTAN trains from scratch; there are no pretrained weights to load.
        mean, std: input normalisation (MTAN: none, images in [0, 1]).

    `forward(image (N,3,H,W))`, H and W at least 32 (five 2x2 poolings), returns 20 maps:
    per encoder stage j (stride 2^j, widths[j] channels) the map after its first block and its
    output, then per decoder stage j from the coarsest (stride 2^(4-j)) the unpooled input and
    the stage's output. `channels` and `strides` describe them in that order.
    """

    def __init__(
        self,
        *,
        name: str = "segnet",
        widths: Sequence[int] = (64, 128, 256, 512, 512),
        tasks: Sequence[str] | None = None,
        pretrained: bool = False,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
    ) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        if len(widths) != STAGES or min(widths) < 1:
            raise ValueError(f"backbone.widths={widths}: expected {STAGES} positive channel counts")
        if widths[3] != widths[4]:
            raise ValueError(f"backbone.widths={widths}: MTAN's attention needs the last two widths equal")
        if pretrained:
            raise ValueError("backbone.pretrained=true: SegNet (MTAN) has no pretrained weights; it trains from scratch")
        self.name = name
        self.tasks = list(tasks) if tasks is not None else None
        self.widths = widths
        ins = [3, *widths[:-1]]
        self.encoder = nn.ModuleList(_Stage(ins[j], widths[j], 1 if j < 2 else 2) for j in range(STAGES))
        # decoder stage j (coarse to fine) mirrors encoder stage 4 - j: to widths[3 - j], the finest to widths[0]
        outs = [widths[3 - j] if j < STAGES - 1 else widths[0] for j in range(STAGES)]
        self.decoder = nn.ModuleList(
            _Stage(widths[STAGES - 1 - j], outs[j], 1 if j >= STAGES - 2 else 2) for j in range(STAGES)
        )
        self.channels: list[int] = [w for w in widths for _ in range(2)]
        self.strides: list[int] = [2**j for j in range(STAGES) for _ in range(2)]
        for j in range(STAGES):
            self.channels += [widths[STAGES - 1 - j], outs[j]]
            self.strides += [2 ** (STAGES - 1 - j)] * 2
        for key, value in (("mean", mean), ("std", std)):
            value = tuple(float(v) for v in value)
            if len(value) != 3 or (key == "std" and min(value) <= 0):
                raise ValueError(f"backbone.{key}={list(value)}: expected 3 numbers (RGB){', all > 0' * (key == 'std')}")
            self.register_buffer(key, torch.tensor(value).view(1, 3, 1, 1), persistent=False)
        xavier_init(self)

    def forward(self, image: Tensor) -> list[Tensor]:
        h, w = image.shape[-2:]
        if min(h, w) < 2**STAGES:
            raise ValueError(f"SegNet: input size {h}x{w}; five 2x2 poolings need at least {2**STAGES} pixels")
        features: list[Tensor] = []
        indices: list[tuple[Tensor, tuple[int, int]]] = []
        x = image
        for stage in self.encoder:
            first, out = stage(x)
            features += [first, out]
            x, index = F.max_pool2d(out, kernel_size=2, stride=2, return_indices=True)
            indices.append((index, tuple(out.shape[-2:])))
        for j, stage in enumerate(self.decoder):
            index, size = indices[STAGES - 1 - j]
            up = F.max_unpool2d(x, index, kernel_size=2, stride=2, output_size=size)
            _, x = stage(up)
            features += [up, x]
        return features
