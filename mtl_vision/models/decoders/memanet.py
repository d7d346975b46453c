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

from torch import Tensor, nn

from mtl_vision.models.decoders.common import HRNetFuse
from mtl_vision.models.decoders.ctal import CrossTaskAffinity, bottleneck_heads
from mtl_vision.models.decoders.mtinet import MultiScaleTaskFeatures

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
    Step 1 is `self.multiscale`, step 3 `self.affinity` and `self.heads`.
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
        if affinity_channels < 4:
            raise ValueError(f"decoder.affinity_channels must be >= 4 (bottlenecks of width / 4), got {affinity_channels}")
        self.tasks = list(task_channels)
        self.multiscale = MultiScaleTaskFeatures(
            in_channels=in_channels, strides=strides, task_channels=task_channels, channels=channels,
            width_multipliers=width_multipliers, scales=scales, se_reduction=se_reduction, fpm_softmax=fpm_softmax,
            inputs=inputs,
        )
        self.aux_names = self.multiscale.names
        widths = self.multiscale.widths
        self.fuse = nn.ModuleDict({t: HRNetFuse(widths) for t in self.tasks})
        fused = sum(widths)
        self.affinity = CrossTaskAffinity(self.tasks, fused, affinity_channels, grid, gamma, kernel_size)
        self.heads = bottleneck_heads(affinity_channels, task_channels)
        # set `record_intermediates` to keep the per-scale task features, the FPM outputs, the
        # fused maps, the affinities, the fused affinity and the propagated features of the last
        # forward in `last_intermediates` (tests)
        self.record_intermediates = False
        self.last_intermediates: dict = {}

    def forward(self, features: Sequence[Tensor]) -> dict:
        # 1. MTI-Net's scales, coarse to fine
        scaled = self.multiscale(features)
        # 2. every task's scales fused at full width
        fused = {t: self.fuse[t]([f[t] for f in scaled.features]) for t in self.tasks}
        # 3. CTAL on the fused maps
        up, seen = self.affinity(fused, return_intermediates=True)
        if self.record_intermediates:
            self.last_intermediates = {
                "scale_features": dict(zip(self.multiscale.names, scaled.features)),
                "fpm": scaled.propagated,
                "fused": fused,
                **seen,
            }
        out: dict = {t: self.heads[t](up[t]) for t in self.tasks}
        out["aux"] = scaled.predictions
        return out
