"""CTAL: cross-task affinity learning with position-grouped convolutions.

After Sinodinos & Armanfard, "Cross-Task Affinity Learning for Multitask Dense Scene Predictions"
(WACV 2025, arXiv 2401.11124; the EMA-Net code).

1. Shared features: the backbone levels of stride >= `stride` fused (HRNet-style), resampled to
   stride `stride` where the backbone has no such level (ViT).
2. Initial predictions: per task two conv blocks give the task's features, a 1x1 conv its initial
   prediction (deep supervision, aux set "initial").
3. Task affinity matrices: each task's features are projected (1x1) to `affinity_channels`,
   L2-normalised at every position and multiplied with themselves: A_t = F_t^T F_t, the (P, P)
   cosine similarities of all pairs of the P = h*w positions (a Gram matrix: symmetric, unit
   diagonal). Row p of A_t, seen as an (h, w) map, is how much every position resembles p for task t.
4. Cross-task fusion: the T tasks' maps of the same query position are interleaved (channel
   p*T + t) and fused by a convolution with one group per query position, so each group mixes only
   the T affinity patterns of its own position (T*k*k weights per position instead of the
   (T*P)*k*k of a dense convolution): P*(T*k*k + 1) parameters. The result is one cross-task
   affinity M of shape (P, P).
5. Propagation: each task's value projection (3x3) is spread by M, out_t(p) = sum_q M[p, q] v_t(q)
   / P, and blended with the task's features: (1 - gamma) F_t + gamma out_t.
6. Final predictions: per task a transposed conv upsamples x2 (as the reference) and a head predicts.

The grouped convolution has weights per query position, so it is defined on a reference grid
(`grid`, the feature size of the training crop). On another grid its weights and biases, viewed as
maps over the query positions, are resampled bilinearly (antialiased), as ViTs resample position
embeddings; on the reference grid it is exactly the paper's grouped convolution. The propagation
divides by the number of positions P (the reference sums) so the scale does not depend on the grid.

Memory: the affinities take N*T*P^2 floats (P = H*W / stride^2). At 448x576, stride 8 gives
P = 4032 (65 MB per task and image in fp32); stride 4, the reference's choice at 288x384, would
give P = 16128 (1 GB per task and image).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU
from mtl_vision.models.decoders.common import FuseScales, resize_to, task_head

__all__ = ["AffinityFusion", "CTALDecoder", "task_affinities"]


def task_affinities(features: Sequence[Tensor]) -> Tensor:
    """Affinity (Gram) matrices of the L2-normalised per-position features of each task.

    features: T maps (N, C, h, w). Returns (N, T, P, P) with P = h*w: entry [n, t, p, q] is the
    cosine similarity of positions p and q (row-major) in task t's features.
    """
    x = torch.stack([f.flatten(2) for f in features], dim=1)  # (N, T, C, P)
    x = F.normalize(x, dim=2)
    return torch.einsum("ntcp,ntcq->ntpq", x, x)


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
            raise ValueError(f"ctal: grid must be [height, width] of positive sizes, got {list(grid)}")
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


class CTALDecoder(nn.Module):
    """CTAL decoder (see the module docstring).

    Args:
        in_channels, strides: of the backbone levels.
        task_channels: output channels per task.
        channels: width of the shared and initial task features (the paper: 256).
        affinity_channels: width of the features whose affinities are taken and propagated
            (the paper: 128; default channels // 2).
        stride: stride of the initial predictions and of the affinities; the final predictions
            are at stride / 2.
        grid: reference size (h, w) of the affinity grid, on which the grouped convolution has its
            own weights per position; the feature size of the training crop at `stride`.
        kernel_size: spatial kernel of the grouped fusion convolution.
        gamma: blend of the propagated features, (1 - gamma) F + gamma out (the paper: 0.05).

    `forward(features)` returns {task: (N, C_t, ~H*2/stride, ~W*2/stride)} and
    `"aux": {"initial": {task: (N, C_t, H/stride, W/stride)}}`.
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
        stride: int = 8,
        grid: Sequence[int] = (56, 72),
        kernel_size: int = 3,
        gamma: float = 0.05,
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("ctal: no tasks")
        if not 0.0 < gamma <= 1.0:
            # gamma = 0 would leave the fusion and value convolutions without gradient
            raise ValueError(f"ctal: gamma must lie in (0, 1], got {gamma}")
        if stride < 2 or stride % 2:
            raise ValueError(f"ctal: stride must be even (final predictions at stride / 2), got {stride}")
        self.tasks = list(task_channels)
        self.stride, self.gamma = int(stride), float(gamma)
        dim = affinity_channels or max(channels // 2, 1)
        # levels at `stride` and coarser, fused at the finest of them (then resampled to `stride`:
        # a ViT's stride-16 levels are upsampled)
        self.fuse = FuseScales(in_channels, strides, channels, min_stride=stride)
        self._finest = min(range(len(strides)), key=lambda i: strides[i])
        self._finest_stride = strides[self._finest]
        self.initial = nn.ModuleDict(
            {t: nn.Sequential(ConvBNReLU(channels, channels), ConvBNReLU(channels, channels)) for t in self.tasks}
        )
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(channels, c, 1) for t, c in task_channels.items()})
        self.conv_in = nn.ModuleDict({t: nn.Conv2d(channels, dim, 1) for t in self.tasks})
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
            {t: nn.Sequential(ConvBNReLU(dim, dim), task_head(dim, c)) for t, c in task_channels.items()}
        )

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """Size of the affinity grid for an image of `image_size`."""
        return math.ceil(image_size[0] / self.stride), math.ceil(image_size[1] / self.stride)

    def forward(self, features: Sequence[Tensor]) -> dict:
        finest = features[self._finest]
        image_size = (finest.shape[-2] * self._finest_stride, finest.shape[-1] * self._finest_stride)
        size = self.feature_size(image_size)
        shared = resize_to(self.fuse(features), size)

        initial, feats = {}, {}
        for t in self.tasks:
            task_feat = self.initial[t](shared)
            initial[t] = self.initial_heads[t](task_feat)
            feats[t] = self.conv_in[t](task_feat)

        affinity = self.fusion(task_affinities([feats[t] for t in self.tasks]), size)  # (N, P, P)
        affinity = affinity / affinity.shape[-1]
        out: dict = {}
        for t in self.tasks:
            value = self.value[t](feats[t])
            n, c, h, w = value.shape
            # out(p) = sum_q M[p, q] v(q)
            spread = torch.bmm(value.flatten(2), affinity.transpose(1, 2)).view(n, c, h, w)
            refined = (1.0 - self.gamma) * feats[t] + self.gamma * spread
            out[t] = self.heads[t](self.conv_out[t](refined))
        out["aux"] = {"initial": initial}
        return out
