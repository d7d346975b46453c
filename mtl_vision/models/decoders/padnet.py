"""PAD-Net: initial per-task predictions, then multi-modal distillation between the tasks.

Xu, Ouyang, Wang, Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network for
Simultaneous Depth Estimation and Scene Parsing", CVPR 2018; in the multi-task form of MTI-Net's
code base (Vandenhende et al.), where every trained task is both an intermediate (deeply
supervised) and a final task:

1. the backbone levels are fused into one shared map (`FuseScales`, HRNet-style);
2. per task, two residual bottleneck blocks give an intermediate feature F_t, and a 1x1 layer an
   initial prediction (returned as the aux set "initial", deep supervision);
3. multi-modal distillation, the attention-guided variant of the paper: task t receives a message
   from every other task s, a 3x3 convolution of F_s, gated by an attention map computed from its
   own feature, G_t = sigmoid(conv(F_t)):  F'_t = F_t + sum_{s != t} G_t * conv_{s->t}(F_s);
4. per task, two bottleneck blocks and a 1x1 layer give the final prediction.

`MultiModalDistillation` is also MTI-Net's per-scale distillation (`mtinet.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU, shortcut
from mtl_vision.models.decoders.common import FuseScales

__all__ = ["Bottleneck", "MultiModalDistillation", "PADNetDecoder"]

GATES = ("self", "source")


class Bottleneck(nn.Module):
    """Residual bottleneck block (ResNet): 1x1 down to `out_channels // reduction`, 3x3, 1x1 up.

    The shortcut is a 1x1 convolution + BN when the width changes, the identity otherwise.
    `forward(x (N, in_channels, H, W)) -> (N, out_channels, H, W)`.
    """

    def __init__(self, in_channels: int, out_channels: int, reduction: int = 4) -> None:
        super().__init__()
        mid = max(1, out_channels // reduction)
        self.body = nn.Sequential(
            ConvBNReLU(in_channels, mid, kernel_size=1),
            ConvBNReLU(mid, mid, kernel_size=3),
            nn.Conv2d(mid, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = shortcut(in_channels, out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


class MultiModalDistillation(nn.Module):
    """Each task's feature plus gated messages from the other tasks' features.

    Args:
        tasks: task names; with a single task there are no messages and the features pass through.
        channels: width of every task feature.
        gate: where the attention map comes from:
            "self"   - the receiving task, one map per task (PAD-Net's attention-guided distillation,
                       G_t = sigmoid(W_t * F_t), shared by all messages it receives);
            "source" - the sending task, one map per (source, receiver) pair (the spatial
                       attention block of MTI-Net's code base).

    Every (source, receiver) pair has its own 3x3 convolution. They run as one convolution per
    receiver over the concatenated sources: with gate="self" a plain one (the sum of the per-source
    convolutions), with gate="source" a grouped one (one group per source), as few, wide
    convolutions are much faster than T*(T-1) small ones.

    `forward({task: (N, channels, H, W)}, return_gates=False)` returns {task: distilled feature}
    (and, with `return_gates`, {receiver: {source: gate (N, channels, H, W)}}; with gate="self" a
    receiver's entries are one tensor).
    """

    def __init__(self, tasks: Sequence[str], channels: int, gate: str = "self") -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"distillation gate must be one of {GATES}, got {gate!r}")
        self.tasks = list(tasks)
        self.gate = gate
        self.sources = {t: [s for s in self.tasks if s != t] for t in self.tasks}
        messages, gates = {}, {}
        for t, sources in self.sources.items():
            n = len(sources)
            if not n:
                continue
            if gate == "self":
                messages[t] = _conv3x3(n * channels, channels)
                gates[t] = _conv3x3(channels, channels)
            else:
                messages[t] = _conv3x3(n * channels, n * channels, groups=n)
                gates[t] = _conv3x3(n * channels, n * channels, groups=n)
        self.messages = nn.ModuleDict(messages)
        self.gates = nn.ModuleDict(gates)

    def forward(
        self, features: Mapping[str, Tensor], return_gates: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
        out: dict[str, Tensor] = {}
        gates: dict[str, dict[str, Tensor]] = {}
        for t in self.tasks:
            sources = self.sources[t]
            if not sources:
                out[t] = features[t]
                continue
            stacked = torch.cat([features[s] for s in sources], dim=1)
            if self.gate == "self":
                g = torch.sigmoid(self.gates[t](features[t]))
                out[t] = features[t] + g * self.messages[t](stacked)
                gates[t] = dict.fromkeys(sources, g)
            else:
                n, c = len(sources), features[t].shape[1]
                per_source = self.messages[t](stacked).unflatten(1, (n, c))
                g = torch.sigmoid(self.gates[t](stacked)).unflatten(1, (n, c))
                out[t] = features[t] + (g * per_source).sum(dim=1)
                gates[t] = {s: g[:, i] for i, s in enumerate(sources)}
        return (out, gates) if return_gates else out


def _conv3x3(in_channels: int, out_channels: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, groups=groups, bias=False)


def _blocks(channels: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*(Bottleneck(channels, channels) for _ in range(num_blocks)))


class PADNetDecoder(nn.Module):
    """Shared fusion, per-task initial predictions, multi-modal distillation, final predictions.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: width of the shared map and of every task's features (256 in MTI-Net's PAD-Net).
        num_blocks: bottleneck blocks before the initial and before the final predictions (2).
        gate: attention of the distillation, "self" (PAD-Net) or "source" (see `MultiModalDistillation`).
        min_stride, levels: the backbone levels that are fused (see `select_levels`).

    `forward(features)` returns {task: (N, task_channels[task], H/s, W/s)} with s = `output_stride`
    and "aux": {"initial": {task: initial prediction, same shape}}.
    """

    aux_names: tuple[str, ...] = ("initial",)

    def __init__(
        self,
        *,
        in_channels: Sequence[int],
        strides: Sequence[int],
        task_channels: Mapping[str, int],
        channels: int = 256,
        num_blocks: int = 2,
        gate: str = "self",
        min_stride: int = 4,
        levels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("PADNetDecoder needs at least one task")
        if num_blocks < 1:
            raise ValueError(f"decoder.num_blocks must be >= 1, got {num_blocks}")
        self.tasks = list(task_channels)
        self.fuse = FuseScales(in_channels, strides, channels, min_stride=min_stride, levels=levels)
        self.output_stride = self.fuse.output_stride
        self.initial = nn.ModuleDict({t: _blocks(channels, num_blocks) for t in self.tasks})
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in task_channels.items()})
        self.distill = MultiModalDistillation(self.tasks, channels, gate=gate)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(_blocks(channels, num_blocks), nn.Conv2d(channels, n, 1))
                for t, n in task_channels.items()
            }
        )

    def forward(self, features: Sequence[Tensor]) -> dict:
        shared = self.fuse(features)
        task_features = {t: self.initial[t](shared) for t in self.tasks}
        initial = {t: self.initial_heads[t](task_features[t]) for t in self.tasks}
        distilled = self.distill(task_features)
        out: dict = {t: self.heads[t](distilled[t]) for t in self.tasks}
        out["aux"] = {"initial": initial}
        return out
