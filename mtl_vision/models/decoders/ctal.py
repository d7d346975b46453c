"""CTAL: cross-task affinity learning with position-grouped convolutions (EMA-Net).

Sinodinos & Armanfard, "Cross-Task Affinity Learning for Multitask Dense Scene Predictions"
(WACV 2025, arXiv 2401.11124, first titled "EMA-Net"). By default this computes the `EMANet` of
the authors' code (Armanfard-Lab/EMA-Net, `models/emanet.py`, with `backbone_kwargs.fuse_hrnet`),
layer for layer:

1. Shared map (`HRNetFuse`): the backbone levels of stride >= `min_stride` bilinearly upsampled to
   the finest of them, concatenated at their full width (270 channels for HRNet-18), a 1x1
   convolution with bias, BN, ReLU.
2. Initial predictions: per task two residual bottlenecks (width `channels`, 256; a 1x1 conv + BN
   shortcut where the width changes) give the task's features F_t, a 1x1 conv its initial
   prediction (aux set "initial", deep supervision).
3. Task affinities: per task a 1x1 conv (with bias) to `affinity_channels` (128), the features
   L2-normalised over the channels at every position and multiplied with themselves:
   A_t = F_t^T F_t, the (P, P) cosine similarities of all pairs of the P = h*w positions.
4. Cross-task fusion: the T tasks' rows of the same query position are interleaved (channel
   p*T + t, row p of A_t seen as an (h, w) map over the key positions) and fused by a k x k
   convolution with one group per query position: P*(T*k*k + 1) parameters, one cross-task
   affinity M of shape (P, P).
5. Propagation: per task a 3x3 value projection (with bias) v_t of the conv-in features is spread
   by M, out_t(p) = sum_q M[p, q] v_t(q), and blended: gamma * out_t + (1 - gamma) * F_t.
6. Final predictions: per task a 2x2 stride-2 transposed conv, BN, ReLU, 3x3 conv (features at
   half the stride), then two bottlenecks and a 1x1 prediction layer.

Steps 3-5 and the up-projection of step 6 are `CrossTaskAffinity`, the heads `bottleneck_heads`;
MEMANet (`memanet.py`) shares both.

The grouped convolution has weights per query position, so it is defined on the grid of the
training crop (`grid`; the authors take their TRAIN.SCALE // 4). The authors' model cannot run on
another grid; here its weights and biases, viewed as maps over the query positions, are then
resampled bilinearly (antialiased), as ViTs resample position embeddings (our extension: on the
reference grid it is exactly their grouped convolution).

Our variants (named options, never the default): `stride` runs the affinities on a coarser (or
finer) grid than the fused map's, `propagation="mean"` divides the propagation by P so its scale
does not depend on the grid, `fuse="project"` fuses the levels with `FuseScales` (per-level 1x1
projections to `channels`, then a 3x3 conv) instead of at full width, e.g. for wide ViT levels.

Memory: the affinities take N*T*P^2 floats. At 288x384 and stride 4 (the authors' NYUv2 setting)
P = 6912: 191 MB per task and image in fp32; at 448x576, stride 4 would give P = 16128 (1 GB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.models.decoders.common import FuseScales, HRNetFuse, resize_to, select_levels
from mtl_vision.models.decoders.padnet import Bottleneck

__all__ = ["AffinityFusion", "CTALDecoder", "CrossTaskAffinity", "bottleneck_heads", "task_affinities"]

FUSES = ("hrnet", "project")
PROPAGATIONS = ("sum", "mean")


def task_affinities(features: Sequence[Tensor]) -> Tensor:
    """Affinity (Gram) matrices of the L2-normalised per-position features of each task.

    features: T maps (N, C, h, w). Returns (N, T, P, P) with P = h*w: entry [n, t, p, q] is the
    cosine similarity of positions p and q (row-major) in task t's features.
    """
    x = torch.stack([f.flatten(2) for f in features], dim=1)  # (N, T, C, P)
    x = F.normalize(x, dim=2)
    return x.transpose(-1, -2) @ x


class AffinityFusion(nn.Module):
    """Fuses the T tasks' affinity matrices into one with a convolution grouped by query position.

    The input (N, T, P, P) is laid out as (N, P*T, h, w): channel p*T + t holds row p of A_t as an
    (h, w) map over the key positions. A k x k convolution with P groups maps the T channels of
    each position to one, so the output (N, P, h, w) = (N, P, P) fuses, for every query position,
    the tasks' affinity patterns around every key position. Parameters: P*(T*k*k + 1) on the
    reference `grid`, resampled to other grids (see the module docstring).
    """

    def __init__(self, num_tasks: int, grid: Sequence[int], kernel_size: int = 3) -> None:
        super().__init__()
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"decoder.grid must be [height, width] of positive sizes, got {list(grid)}")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"decoder.kernel_size must be odd and positive, got {kernel_size}")
        self.num_tasks, self.grid = num_tasks, (int(grid[0]), int(grid[1]))
        positions = self.grid[0] * self.grid[1]
        self.conv = nn.Conv2d(num_tasks * positions, positions, kernel_size, padding=kernel_size // 2, groups=positions)

    def weights_for(self, size: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(weight (P, T, k, k), bias (P,)) for a grid of `size` = (h, w), P = h*w."""
        weight, bias = self.conv.weight, self.conv.bias
        size = (int(size[0]), int(size[1]))
        if size == self.grid:
            return weight, bias
        _, t, k, _ = weight.shape
        h0, w0 = self.grid
        fields = torch.cat([weight.reshape(h0, w0, t * k * k), bias.reshape(h0, w0, 1)], dim=2)
        fields = F.interpolate(
            fields.permute(2, 0, 1).unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True
        )
        fields = fields[0].permute(1, 2, 0).reshape(size[0] * size[1], t * k * k + 1)
        return fields[:, :-1].reshape(-1, t, k, k), fields[:, -1].contiguous()

    def forward(self, affinities: Tensor, size: Sequence[int]) -> Tensor:
        """affinities (N, T, P, P) on a grid of `size` -> fused (N, P, P)."""
        n, t, p, _ = affinities.shape
        h, w = size
        stacked = affinities.transpose(1, 2).reshape(n, p * t, h, w)  # interleaved: channel p*T + t
        weight, bias = self.weights_for(size)
        fused = F.conv2d(stacked, weight, bias, padding=self.conv.padding, groups=p)
        return fused.reshape(n, p, p)


def _bottlenecks(in_channels: int, channels: int) -> list[nn.Module]:
    """Two residual bottlenecks (ResNet's, width `channels`, inner width channels // 4)."""
    return [Bottleneck(in_channels, channels), Bottleneck(channels, channels)]


def bottleneck_heads(channels: int, task_channels: Mapping[str, int]) -> nn.ModuleDict:
    """The final heads (step 6): per task two bottlenecks of width `channels` and a 1x1 prediction
    layer, (N, channels, H, W) -> (N, task_channels[task], H, W)."""
    return nn.ModuleDict(
        {t: nn.Sequential(*_bottlenecks(channels, channels), nn.Conv2d(channels, c, 1)) for t, c in task_channels.items()}
    )


class CrossTaskAffinity(nn.Module):
    """Steps 3-5 and the up-projection of step 6 of the module docstring, shared by MEMANet.

    Args:
        tasks: task names; their order is the order of the tasks in the fusion's interleaved channels.
        in_channels: width of every task's input features.
        channels: width of the features whose affinities are taken and propagated (the authors: 128).
        grid, kernel_size: of the grouped fusion (`AffinityFusion`).
        gamma: blend of the propagated features, gamma * spread + (1 - gamma) * conv-in features,
            in (0, 1].
        propagation: "sum" (the authors) or "mean" (divided by the number of positions).

    `forward({task: (N, in_channels, h, w)})` returns {task: (N, channels, 2h, 2w)}: per task a
    1x1 conv (with bias) to `channels`, the affinities of all tasks fused into one (P, P) matrix M,
    the 3x3 value projection spread by M and blended, then a 2x2 stride-2 transposed conv, BN, ReLU,
    3x3 conv. With `return_intermediates` also {"affinities": {task: (N, P, P)}, "fused_affinity":
    (N, P, P), "propagated": {task: (N, channels, h, w)}}.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        in_channels: int,
        channels: int,
        grid: Sequence[int],
        gamma: float = 0.05,
        kernel_size: int = 3,
        propagation: str = "sum",
    ) -> None:
        super().__init__()
        if not 0.0 < gamma <= 1.0:
            # gamma = 0 would leave the fusion and value convolutions without gradient
            raise ValueError(f"decoder.gamma must lie in (0, 1], got {gamma}")
        if propagation not in PROPAGATIONS:
            raise ValueError(f"decoder.propagation={propagation!r}: expected one of {PROPAGATIONS}")
        self.tasks = list(tasks)
        self.gamma, self.propagation = float(gamma), propagation
        self.conv_in = nn.ModuleDict({t: nn.Conv2d(in_channels, channels, 1) for t in self.tasks})
        self.fusion = AffinityFusion(len(self.tasks), grid, kernel_size)
        self.value = nn.ModuleDict({t: nn.Conv2d(channels, channels, 3, padding=1) for t in self.tasks})
        self.conv_out = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.ConvTranspose2d(channels, channels, 2, stride=2),
                    nn.BatchNorm2d(channels),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(channels, channels, 3, padding=1),
                )
                for t in self.tasks
            }
        )

    def forward(
        self, features: Mapping[str, Tensor], return_intermediates: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict]:
        feats = {t: self.conv_in[t](features[t]) for t in self.tasks}
        size = tuple(feats[self.tasks[0]].shape[-2:])
        affinities = task_affinities([feats[t] for t in self.tasks])  # (N, T, P, P)
        fused = self.fusion(affinities, size)  # (N, P, P)
        if self.propagation == "mean":
            fused = fused / fused.shape[-1]
        propagated = {}
        for t in self.tasks:
            value = self.value[t](feats[t])
            n, c, h, w = value.shape
            # out(p) = sum_q M[p, q] v(q)
            spread = torch.bmm(value.flatten(2), fused.transpose(1, 2)).view(n, c, h, w)
            propagated[t] = self.gamma * spread + (1.0 - self.gamma) * feats[t]
        out = {t: self.conv_out[t](propagated[t]) for t in self.tasks}
        if not return_intermediates:
            return out
        seen = {
            "affinities": {t: affinities[:, i] for i, t in enumerate(self.tasks)},
            "fused_affinity": fused,
            "propagated": propagated,
        }
        return out, seen


class CTALDecoder(nn.Module):
    """CTAL / EMA-Net decoder (see the module docstring).

    Args:
        in_channels, strides: of the backbone levels.
        task_channels: output channels per task; their order is the order of the tasks in the
            fusion's interleaved channels.
        channels: width of the initial task features (the authors: 256).
        affinity_channels: width of the features whose affinities are taken and propagated
            (the authors: 128); None: channels // 2.
        grid: (h, w) of the affinity grid on which the grouped fusion has its own weights per
            position: the feature size of the training crop (the authors: crop // 4).
        gamma: blend of the propagated features, gamma * out + (1 - gamma) * F (the authors: 0.05).
        kernel_size: spatial kernel of the grouped fusion convolution (the authors: 3).
        min_stride: the backbone levels of at least this stride are fused (HRNet: all four).
        fuse: "hrnet" (the authors' full-width fusion) or "project" (`FuseScales` to `channels`).
        stride: stride of the affinity grid; None (the authors) keeps the fused map's, else the
            shared map is resized (bilinearly) to the image size / `stride` first.
        propagation: "sum" (the authors) or "mean" (divided by the number of positions).

    `forward(features)` returns {task: (N, C_t, 2h, 2w)} and `"aux": {"initial": {task:
    (N, C_t, h, w)}}`, where (h, w) is the affinity grid of the input. Steps 3-5 and the
    up-projection are `self.affinity` (`CrossTaskAffinity`).
    """

    aux_names: tuple[str, ...] = ("initial",)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 256,
        affinity_channels: int | None = None,
        grid: Sequence[int] = (72, 96),
        gamma: float = 0.05,
        kernel_size: int = 3,
        min_stride: int = 4,
        fuse: str = "hrnet",
        stride: int | None = None,
        propagation: str = "sum",
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("ctal: no tasks")
        if fuse not in FUSES:
            raise ValueError(f"decoder.fuse={fuse!r}: expected one of {FUSES}")
        if stride is not None and stride < 1:
            raise ValueError(f"decoder.stride must be a positive integer or null, got {stride}")
        dim = affinity_channels or channels // 2
        if channels < 4 or dim < 4:
            raise ValueError(
                f"decoder.channels={channels} and decoder.affinity_channels={dim} must be >= 4 "
                "(bottlenecks of width / 4)"
            )
        self.tasks = list(task_channels)
        self.stride = stride
        self.levels = select_levels(strides, min_stride=min_stride)
        level_strides = [strides[i] for i in self.levels]
        self._finest_stride = min(level_strides)
        if fuse == "hrnet":
            # finest level first, as HRNet returns its branches
            self.levels = sorted(self.levels, key=lambda i: strides[i])
            self.fuse = HRNetFuse([in_channels[i] for i in self.levels])
            shared = self.fuse.out_channels
        else:
            self.fuse = FuseScales(in_channels, strides, channels, levels=self.levels)
            shared = channels
        self.initial = nn.ModuleDict({t: nn.Sequential(*_bottlenecks(shared, channels)) for t in self.tasks})
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in task_channels.items()})
        self.affinity = CrossTaskAffinity(self.tasks, channels, dim, grid, gamma, kernel_size, propagation)
        self.heads = bottleneck_heads(dim, task_channels)
        # set `record_intermediates` to keep the shared map, the affinities, the fused affinity
        # and the propagated features of the last forward in `last_intermediates` (tests)
        self.record_intermediates = False
        self.last_intermediates: dict[str, Tensor | dict[str, Tensor]] = {}

    def shared(self, features: Sequence[Tensor]) -> Tensor:
        """The fused map on the affinity grid: (N, fused channels, h, w)."""
        if isinstance(self.fuse, HRNetFuse):
            fused = self.fuse([features[i] for i in self.levels])
        else:
            fused = self.fuse(features)
        if self.stride is None:
            return fused
        h, w = fused.shape[-2:]
        image = (h * self._finest_stride, w * self._finest_stride)
        return resize_to(fused, (math.ceil(image[0] / self.stride), math.ceil(image[1] / self.stride)))

    def forward(self, features: Sequence[Tensor]) -> dict:
        shared = self.shared(features)
        task_features = {t: self.initial[t](shared) for t in self.tasks}
        initial = {t: self.initial_heads[t](task_features[t]) for t in self.tasks}
        up, seen = self.affinity(task_features, return_intermediates=True)
        if self.record_intermediates:
            self.last_intermediates = {"shared": shared, **seen}
        out: dict = {t: self.heads[t](up[t]) for t in self.tasks}
        out["aux"] = {"initial": initial}
        return out
