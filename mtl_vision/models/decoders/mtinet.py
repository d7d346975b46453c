"""MTI-Net: task interactions at several scales, propagated from coarse to fine, then aggregated.

Vandenhende, Georgoulis, Van Gool, "MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task
Learning", ECCV 2020; by default exactly as its code base computes it (SimonVandenhende/Multi-Task-
Learning-PyTorch, models/mti_net.py on the four HRNet-18 branches). From the coarsest scale to the
finest (strides 32, 16, 8, 4 by default):

1. per task, two residual basic blocks turn the scale's map (concatenated with the task's
   propagated feature from the coarser scale, bilinearly upsampled, when there is one) into a task
   feature, and a 1x1 layer into an initial prediction: the aux set "scale_<stride>" (deep
   supervision at every scale, for every task, the auxiliary ones too);
2. a feature propagation module (FPM) at every scale but the finest: the task features are
   concatenated (in task order) and a non-linear function of them gives attention logits of the
   same width; the code base softmaxes them over groups of T consecutive channels of the
   concatenated map (its view (B, C/T, T, H, W)), which weight the concatenated features; a basic
   block reduces the result to one shared map, handed to every task through its own
   squeeze-and-excitation as a residual (`fpm_softmax="tasks"`: a softmax over the T tasks of
   every channel instead, the paper's per-task reading);
3. multi-modal distillation at every scale into the final tasks (`padnet.MultiModalDistillation`);
4. feature aggregation: per final task, the distilled features of all scales are upsampled to the
   finest, concatenated and decoded by a 1x1 conv (with bias) + BN + ReLU and a 1x1 prediction
   layer (HRNet's segmentation head, `HRNetFuse` + conv).

The scales' maps are the backbone levels themselves when the backbone has levels at the scales'
strides with the configured widths (HRNet-18's branches 18/36/72/144 with the defaults), as in the
code base; otherwise `ScalePyramid` builds them (a projection per level on other CNNs, a resampled
pyramid on a ViT's stride-16 levels). The width of scale i is `channels * width_multipliers[i]`.
The inputs and steps 1-2 are `MultiScaleTaskFeatures`, which MEMANet (`memanet.py`) shares.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU, shortcut
from mtl_vision.models.decoders.common import HRNetFuse, ScalePyramid, final_tasks_of, resize_to
from mtl_vision.models.decoders.padnet import MultiModalDistillation

__all__ = [
    "BasicBlock",
    "FeaturePropagation",
    "MTINetDecoder",
    "MultiScaleTaskFeatures",
    "ScaleFeatures",
    "SqueezeExcitation",
]

FPM_SOFTMAX = ("channel_groups", "tasks")
INPUTS = ("auto", "levels", "pyramid")


class BasicBlock(nn.Module):
    """Residual block of two 3x3 conv-BN (ResNet), 1x1 conv-BN shortcut when the width changes.

    `forward(x (N, in_channels, H, W)) -> (N, out_channels, H, W)`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = shortcut(in_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class SqueezeExcitation(nn.Module):
    """Channel re-weighting: x * sigmoid(MLP(global average of x)), Linear layers with bias, hidden
    width channels // reduction. Below `reduction` channels that is 0, as in the code base's SEBlock:
    the weights are then sigmoid(bias) of the second layer, one learned number per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = channels // reduction
        with warnings.catch_warnings():  # a zero-width layer has nothing to initialise
            warnings.filterwarnings("ignore", "Initializing zero-element tensors", UserWarning)
            self.mlp = nn.Sequential(nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels))

    def forward(self, x: Tensor) -> Tensor:
        weights = torch.sigmoid(self.mlp(x.mean(dim=(2, 3))))
        return x * weights[:, :, None, None]


class FeaturePropagation(nn.Module):
    """FPM: a shared map distilled from all task features, given back to each task through its own SE.

    Args:
        tasks: task names; their order is the order of concatenation.
        channels: width C of every task feature.
        se_reduction: reduction of the per-task squeeze-and-excitation.
        softmax: how the attention logits (T*C channels) become weights of the concatenated
            features: "channel_groups" (the code base: a softmax over each group of T consecutive
            channels) or "tasks" (a softmax over the T tasks of each channel).

    With T tasks the concatenated features (T*C) pass a non-linear function (two basic blocks at a
    quarter of the width, a 1x1 layer back to T*C) whose softmaxed output weights them; the
    weighted concatenation is reduced to C by a basic block (with one task there is nothing to
    weigh, only the reduction). `forward({task: (N, C, H, W)})` returns {task: feature +
    SE_task(shared)}, with `return_attention` also the weights (N, T*C, H, W), one per channel of
    the concatenation (None with one task).
    """

    def __init__(
        self, tasks: Sequence[str], channels: int, se_reduction: int = 16, softmax: str = "channel_groups"
    ) -> None:
        super().__init__()
        if softmax not in FPM_SOFTMAX:
            raise ValueError(f"decoder.fpm_softmax must be one of {FPM_SOFTMAX}, got {softmax!r}")
        self.tasks = list(tasks)
        self.softmax = softmax
        self.channels = channels
        shared = channels * len(self.tasks)
        self.attention: nn.Module | None = None
        if len(self.tasks) > 1:
            hidden = max(1, shared // 4)
            self.attention = nn.Sequential(
                BasicBlock(shared, hidden), BasicBlock(hidden, hidden), nn.Conv2d(hidden, shared, 1)
            )
        self.reduce = BasicBlock(shared, channels)
        self.excite = nn.ModuleDict({t: SqueezeExcitation(channels, se_reduction) for t in self.tasks})

    def forward(
        self, features: Mapping[str, Tensor], return_attention: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor | None]:
        concat = torch.cat([features[t] for t in self.tasks], dim=1)  # (N, T*C, H, W)
        weights = None
        if self.attention is not None:
            logits = self.attention(concat)
            t, c = len(self.tasks), self.channels
            if self.softmax == "channel_groups":
                weights = logits.unflatten(1, (c, t)).softmax(dim=2).flatten(1, 2)
            else:
                weights = logits.unflatten(1, (t, c)).softmax(dim=1).flatten(1, 2)
            concat = weights * concat
        shared = self.reduce(concat)
        out = {t: features[t] + self.excite[t](shared) for t in self.tasks}
        return (out, weights) if return_attention else out


class _InitialPrediction(nn.Module):
    """Per task: two basic blocks (input -> channels) and a 1x1 prediction layer."""

    def __init__(self, in_channels: int, channels: int, task_channels: Mapping[str, int]) -> None:
        super().__init__()
        self.refine = nn.ModuleDict(
            {t: nn.Sequential(BasicBlock(in_channels, channels), BasicBlock(channels, channels)) for t in task_channels}
        )
        self.predict = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in task_channels.items()})

    def forward(
        self, x: Tensor, propagated: Mapping[str, Tensor] | None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        features, preds = {}, {}
        for t, refine in self.refine.items():
            # the code base upsamples by scale_factor=2; on the sizes where it runs (input sides
            # divisible by the coarsest stride) that is this resize to the finer map's size
            inp = x if propagated is None else torch.cat([x, resize_to(propagated[t], x.shape[-2:])], dim=1)
            features[t] = refine(inp)
            preds[t] = self.predict[t](features[t])
        return features, preds


class MTINetDecoder(nn.Module):
    """Multi-scale task interaction decoder.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: task feature width at the finest scale.
        width_multipliers: width of scale i = channels * width_multipliers[i] (default 1, 2, 4, 8:
            with channels=18 the HRNet-18 widths 18/36/72/144).
        scales: strides of the scales, finest first (4, 8, 16, 32); the aux sets are "scale_<stride>".
        se_reduction: reduction of the FPM's squeeze-and-excitation (16).
        gate: attention of the distillation, "source" (the code base) or "self" (PAD-Net's paper).
        fpm_softmax: "channel_groups" (the code base) or "tasks", see `FeaturePropagation`.
        inputs: where the scales' maps come from: "levels" (the backbone levels of the scales'
            strides, which must have the scales' widths: the code base on HRNet's branches),
            "pyramid" (`ScalePyramid`, projected and resampled to the widths), "auto" (levels when
            the backbone has them, else pyramid).
        auxiliary_tasks: tasks of `task_channels` with only per-scale initial predictions (deep
            supervision, FPM and distillation senders), no final prediction.

    `forward(features)` returns {task: (N, task_channels[task], H/scales[0], W/scales[0])} for each
    of `final_tasks` and "aux": {"scale_<s>": {task: initial prediction at stride s}} for every
    scale and task. Steps 1-2 are `self.multiscale` (`MultiScaleTaskFeatures`).
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
        gate: str = "source",
        fpm_softmax: str = "channel_groups",
        inputs: str = "auto",
        auxiliary_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("MTINetDecoder needs at least one task")
        self.tasks = list(task_channels)
        self.final_tasks = final_tasks_of(task_channels, auxiliary_tasks)
        self.auxiliary_tasks = [t for t in self.tasks if t not in self.final_tasks]
        self.multiscale = MultiScaleTaskFeatures(
            in_channels=in_channels, strides=strides, task_channels=task_channels, channels=channels,
            width_multipliers=width_multipliers, scales=scales, se_reduction=se_reduction, fpm_softmax=fpm_softmax,
            inputs=inputs,
        )
        self.scales, self.widths = self.multiscale.scales, self.multiscale.widths
        self.output_stride = self.scales[0]
        self.aux_names = self.multiscale.names
        self.distill = nn.ModuleList(
            MultiModalDistillation(self.tasks, w, gate=gate, receivers=self.final_tasks) for w in self.widths
        )
        total = sum(self.widths)
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(HRNetFuse(self.widths), nn.Conv2d(total, task_channels[t], 1)) for t in self.final_tasks}
        )

    def forward(self, features: Sequence[Tensor]) -> dict:
        return self.decode(self.multiscale.inputs_of(features))

    def decode(self, maps: Sequence[Tensor]) -> dict:
        """The decoder after its inputs: `maps[i]` is (N, widths[i], H/scales[i], W/scales[i])."""
        scaled = self.multiscale.propagate(maps)
        distilled = [distill(f) for distill, f in zip(self.distill, scaled.features)]
        out: dict = {t: self.heads[t]([d[t] for d in distilled]) for t in self.final_tasks}
        out["aux"] = scaled.predictions
        return out


class ScaleFeatures(NamedTuple):
    """What `MultiScaleTaskFeatures` computes.

    features: per scale, finest first, {task: (N, widths[i], H/scales[i], W/scales[i])}.
    predictions: {"scale_<s>": {task: initial prediction at stride s}}, finest first.
    propagated: {"scale_<s>": {task: FPM output}} for every scale but the finest, coarsest first.
    """

    features: list[dict[str, Tensor]]
    predictions: dict[str, dict[str, Tensor]]
    propagated: dict[str, dict[str, Tensor]]


class MultiScaleTaskFeatures(nn.Module):
    """MTI-Net's per-scale task features (steps 1-2 of the module docstring), shared by MEMANet.

    Args:
        in_channels, strides: of the backbone levels.
        task_channels: output channels per task; their order is the FPM's order of concatenation.
        channels: task feature width at the finest scale.
        width_multipliers: width of scale i = channels * width_multipliers[i].
        scales: strides of the scales, finest first, strictly increasing.
        se_reduction: reduction of the FPM's squeeze-and-excitation.
        fpm_softmax: "channel_groups" (the code base) or "tasks", see `FeaturePropagation`.
        inputs: where the scales' maps come from, "levels", "pyramid" or "auto" (see `MTINetDecoder`).

    `inputs_of(features)` gives the scales' maps (N, widths[i], H/scales[i], W/scales[i]),
    `propagate(maps)` runs the scales from the coarsest to the finest and returns `ScaleFeatures`;
    `forward(features)` is both.
    """

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int,
        width_multipliers: Sequence[int],
        scales: Sequence[int],
        se_reduction: int = 16,
        fpm_softmax: str = "channel_groups",
        inputs: str = "auto",
    ) -> None:
        super().__init__()
        scales = [int(s) for s in scales]
        if not scales or any(b <= a for a, b in pairwise(scales)):
            raise ValueError(f"decoder.scales must be strictly increasing strides, got {scales}")
        if len(width_multipliers) != len(scales):
            raise ValueError(f"decoder.width_multipliers {list(width_multipliers)} needs one entry per scale {scales}")
        if inputs not in INPUTS:
            raise ValueError(f"decoder.inputs must be one of {INPUTS}, got {inputs!r}")
        if fpm_softmax not in FPM_SOFTMAX:
            raise ValueError(f"decoder.fpm_softmax must be one of {FPM_SOFTMAX}, got {fpm_softmax!r}")
        self.tasks = list(task_channels)
        self.scales = scales
        self.names = tuple(f"scale_{s}" for s in scales)
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
            # one single-stride pyramid per scale, each with its own width
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
        # FPM at every scale but the finest, feeding the next finer one
        self.fpm = nn.ModuleDict(
            {
                name: FeaturePropagation(self.tasks, w, se_reduction, softmax=fpm_softmax)
                for name, w in zip(self.names[1:], self.widths[1:])
            }
        )

    def inputs_of(self, features: Sequence[Tensor]) -> list[Tensor]:
        """The scales' maps from the backbone levels: the levels themselves or the pyramids' outputs."""
        if self.pyramid is None:
            return [features[i] for i in self.levels]
        return [pyramid(features)[0] for pyramid in self.pyramid]

    def propagate(self, maps: Sequence[Tensor]) -> ScaleFeatures:
        """From the coarsest scale to the finest: `maps[i]` is (N, widths[i], H/scales[i], W/scales[i])."""
        features: list[dict[str, Tensor]] = [{} for _ in self.scales]
        predictions: dict[str, dict[str, Tensor]] = {}
        propagated: dict[str, dict[str, Tensor]] = {}
        incoming = None
        for i in reversed(range(len(self.scales))):
            name = self.names[i]
            features[i], predictions[name] = self.initial[i](maps[i], incoming)
            if i > 0:
                incoming = propagated[name] = self.fpm[name](features[i])
        return ScaleFeatures(features, {name: predictions[name] for name in self.names}, propagated)

    def forward(self, features: Sequence[Tensor]) -> ScaleFeatures:
        return self.propagate(self.inputs_of(features))


def _levels_at(
    in_channels: Sequence[int], strides: Sequence[int], scales: Sequence[int], widths: Sequence[int]
) -> list[int] | None:
    """Indices of the backbone levels with each scale's stride and width (the last such level of
    a stride), or None when some scale has none."""
    found = []
    for s, w in zip(scales, widths):
        matches = [i for i, (c, r) in enumerate(zip(in_channels, strides)) if r == s and c == w]
        if not matches:
            return None
        found.append(matches[-1])
    return found
