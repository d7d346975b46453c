"""MEMANet: MTI-Net's multi-scale task features with CTAL's cross-task affinities (multi-scale EMA-Net).

Sinodinos & Armanfard, "Cross-Task Affinity Learning for Multitask Dense Scene Predictions" (WACV
2025, arXiv 2401.11124, first titled "EMA-Net"). This is the multi-scale model of the authors' code
(Armanfard-Lab/EMA-Net, `models/m_emanet.py` `MEMANet`, the model their train.sh trains), layer for
layer; it joins the front of MTI-Net (`mtinet.py`) to the back of CTAL (`ctal.py`):

1. Per-scale task features (MTI-Net): from the coarsest scale to the finest (strides 32, 16, 8, 4
   on HRNet's branches), per task two residual basic blocks turn the scale's map (with the task's
   propagated feature of the coarser scale, upsampled, when there is one) into a task feature, and
   a 1x1 layer into an initial prediction: the aux set "scale_<stride>" (deep supervision at every
   scale). A feature propagation module (MTI-Net's FPM, with its softmax over channel groups) at
   every scale but the finest hands the tasks' shared information to the next finer scale.
2. Per task, the task features of all scales are fused as HRNet fuses its branches (`HRNetFuse`:
   upsampled to the finest, concatenated, a 1x1 conv with bias + BN + ReLU at the full width: 270
   channels on HRNet-18's 18/36/72/144). No multi-modal distillation, unlike MTI-Net.
3. CTAL on the fused maps (`ctal.py` steps 3-6): per task a 1x1 conv (with bias) to
   `affinity_channels` (128), the tasks' Gram affinities interleaved and fused by a convolution
   grouped by query position (`AffinityFusion`), each task's 3x3 value projection spread by the
   fused affinity and blended, gamma * spread + (1 - gamma) * features; per task a 2x2 stride-2
   transposed conv, BN, ReLU, 3x3 conv, two bottlenecks and a 1x1 prediction layer (final maps at
   half the finest scale's stride).

As in `ctal.py`, the fusion has weights per position of the affinity grid of the training crop
(`grid`, the authors' TRAIN.SCALE // 4), resampled on other grids (our extension). As in
`mtinet.py`, the scales' maps are the backbone levels when they have the scales' strides and widths
(HRNet-18), else `ScalePyramid` builds them. Memory: the affinities take N*T*P^2 floats, P = h*w
of the finest scale (6912 at the authors' 288x384: 191 MB per task and image in fp32).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from mtl_vision.models.decoders.common import HRNetFuse, ScalePyramid
from mtl_vision.models.decoders.ctal import AffinityFusion, task_affinities
from mtl_vision.models.decoders.mtinet import FPM_SOFTMAX, INPUTS, FeaturePropagation, _InitialPrediction, _levels_at
from mtl_vision.models.decoders.padnet import Bottleneck

__all__ = ["MEMANetDecoder"]


class MEMANetDecoder(nn.Module):
    """Multi-scale EMA-Net decoder (see the module docstring).

    Args:
        in_channels, strides: of the backbone levels.
        task_channels: output channels per task; their order is the order of the FPM's
            concatenation (its softmax over channel groups mixes neighbouring tasks) and of the
            tasks in the affinity fusion's interleaved channels.
        channels: task feature width at the finest scale (18: the HRNet-18 width).
        width_multipliers: width of scale i = channels * width_multipliers[i] (1, 2, 4, 8).
        scales: strides of the scales, finest first (4, 8, 16, 32); the aux sets are "scale_<stride>".
        se_reduction: reduction of the FPM's squeeze-and-excitation (16).
        fpm_softmax: "channel_groups" (the authors') or "tasks", see `mtinet.FeaturePropagation`.
        inputs: "levels", "pyramid" or "auto", see `mtinet.MTINetDecoder`.
        affinity_channels: width of the features whose affinities are taken and propagated (128).
        grid: (h, w) of the affinity grid on which the fusion has its own weights per position: the
            finest scale's size on the training crop (the authors: crop // 4).
        gamma: blend of the propagated features, gamma * spread + (1 - gamma) * features (0.05).
        kernel_size: spatial kernel of the grouped fusion convolution (3).

    `forward(features)` returns {task: (N, C_t, 2h, 2w)}, where (h, w) is the finest scale's size
    (H/scales[0], W/scales[0]), and "aux": {"scale_<s>": {task: initial prediction at stride s}}.
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
        fpm_softmax: str = "channel_groups",
        inputs: str = "auto",
        affinity_channels: int = 128,
        grid: Sequence[int] = (72, 96),
        gamma: float = 0.05,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("memanet: no tasks")
        scales = [int(s) for s in scales]
        if not scales or any(b <= a for a, b in pairwise(scales)):
            raise ValueError(f"decoder.scales must be strictly increasing strides, got {scales}")
        if len(width_multipliers) != len(scales):
            raise ValueError(f"decoder.width_multipliers {list(width_multipliers)} needs one entry per scale {scales}")
        if inputs not in INPUTS:
            raise ValueError(f"decoder.inputs must be one of {INPUTS}, got {inputs!r}")
        if fpm_softmax not in FPM_SOFTMAX:
            raise ValueError(f"decoder.fpm_softmax must be one of {FPM_SOFTMAX}, got {fpm_softmax!r}")
        if not 0.0 < gamma <= 1.0:
            # gamma = 0 would leave the fusion and value convolutions without gradient
            raise ValueError(f"decoder.gamma must lie in (0, 1], got {gamma}")
        if affinity_channels < 4:
            raise ValueError(f"decoder.affinity_channels must be >= 4 (bottlenecks of width / 4), got {affinity_channels}")
        self.tasks = list(task_channels)
        self.gamma = float(gamma)
        self.scales = scales
        self.aux_names = tuple(f"scale_{s}" for s in scales)
        self.widths = [channels * int(m) for m in width_multipliers]
        levels = _levels_at(in_channels, strides, scales, self.widths)
        if inputs == "levels" and levels is None:
            raise ValueError(
                f"decoder.inputs=levels needs backbone levels at strides {scales} with widths {self.widths} "
                f"(decoder.channels * decoder.width_multipliers); the backbone has strides {list(strides)}, "
                f"channels {list(in_channels)}"
            )
        if inputs == "pyramid" or levels is None:
            self.levels: list[int] | None = None
            self.pyramid: nn.ModuleList | None = nn.ModuleList(
                ScalePyramid(in_channels, strides, w, out_strides=[s]) for s, w in zip(scales, self.widths)
            )
        else:
            self.levels, self.pyramid = levels, None
        last = len(scales) - 1
        self.initial = nn.ModuleList(
            _InitialPrediction(w + (self.widths[i + 1] if i < last else 0), w, task_channels)
            for i, w in enumerate(self.widths)
        )
        self.fpm = nn.ModuleDict(
            {
                f"scale_{s}": FeaturePropagation(self.tasks, w, se_reduction, softmax=fpm_softmax)
                for s, w in zip(scales[1:], self.widths[1:])
            }
        )
        self.fuse = nn.ModuleDict({t: HRNetFuse(self.widths) for t in self.tasks})
        dim, fused = affinity_channels, sum(self.widths)
        self.conv_in = nn.ModuleDict({t: nn.Conv2d(fused, dim, 1) for t in self.tasks})
        self.fusion = AffinityFusion(len(self.tasks), grid, kernel_size)
        self.value = nn.ModuleDict({t: nn.Conv2d(dim, dim, 3, padding=1) for t in self.tasks})
        self.conv_out = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.ConvTranspose2d(dim, dim, 2, stride=2),
                    nn.BatchNorm2d(dim),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(dim, dim, 3, padding=1),
                )
                for t in self.tasks
            }
        )
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(Bottleneck(dim, dim), Bottleneck(dim, dim), nn.Conv2d(dim, c, 1))
                for t, c in task_channels.items()
            }
        )
        # set `record_intermediates` to keep the per-scale task features, the FPM outputs, the
        # fused maps, the affinities, the fused affinity and the propagated features of the last
        # forward in `last_intermediates` (tests)
        self.record_intermediates = False
        self.last_intermediates: dict = {}

    def forward(self, features: Sequence[Tensor]) -> dict:
        if self.pyramid is None:
            maps = [features[i] for i in self.levels]
        else:
            maps = [pyramid(features)[0] for pyramid in self.pyramid]
        # 1. MTI-Net's scales, coarse to fine
        task_features: list[dict[str, Tensor]] = [{} for _ in self.scales]
        aux: dict[str, dict[str, Tensor]] = {}
        propagated: dict[str, dict[str, Tensor]] = {}
        incoming = None
        for i in reversed(range(len(self.scales))):
            name = f"scale_{self.scales[i]}"
            task_features[i], aux[name] = self.initial[i](maps[i], incoming)
            if i > 0:
                incoming = propagated[name] = self.fpm[name](task_features[i])
        # 2. every task's scales fused at full width
        fused = {t: self.fuse[t]([f[t] for f in task_features]) for t in self.tasks}
        # 3. CTAL on the fused maps
        feats = {t: self.conv_in[t](fused[t]) for t in self.tasks}
        size = tuple(fused[self.tasks[0]].shape[-2:])
        affinities = task_affinities([feats[t] for t in self.tasks])  # (N, T, P, P)
        affinity = self.fusion(affinities, size)  # (N, P, P)
        out: dict = {}
        blended = {}
        for t in self.tasks:
            value = self.value[t](feats[t])
            n, c, h, w = value.shape
            # out(p) = sum_q M[p, q] v(q)
            spread = torch.bmm(value.flatten(2), affinity.transpose(1, 2)).view(n, c, h, w)
            blended[t] = self.gamma * spread + (1.0 - self.gamma) * feats[t]
            out[t] = self.heads[t](self.conv_out[t](blended[t]))
        if self.record_intermediates:
            self.last_intermediates = {
                "scale_features": {f"scale_{s}": f for s, f in zip(self.scales, task_features)},
                "fpm": propagated,
                "fused": fused,
                "affinities": {t: affinities[:, i] for i, t in enumerate(self.tasks)},
                "fused_affinity": affinity,
                "propagated": blended,
            }
        out["aux"] = {name: aux[name] for name in self.aux_names}
        return out
