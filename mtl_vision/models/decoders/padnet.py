"""PAD-Net: initial per-task predictions, then multi-modal distillation between the tasks.

Xu, Ouyang, Wang, Sebe, "PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network for
Simultaneous Depth Estimation and Scene Parsing", CVPR 2018; by default exactly as the multi-task
form in MTI-Net's code base computes it (Vandenhende et al., SimonVandenhende/Multi-Task-Learning-
PyTorch, models/padnet.py with the HRNet-18 backbone of configs/*/hrnet18/pad_net*.yml):

1. the backbone levels become one shared map: on a multi-resolution backbone (HRNet's branches)
   `HRNetFuse` (every branch upsampled to the finest, concatenated, 1x1 conv + BN + ReLU at the
   full width, 270 channels for HRNet-18); on a single-scale one (ViT) `FuseScales`;
2. per task, two residual bottleneck blocks give an intermediate feature F_t (the first one
   narrows the shared width to `channels` through its 1x1 shortcut), and a 1x1 layer an initial
   prediction (the aux set "initial", deep supervision) -- for every task, the auxiliary ones too;
3. multi-modal distillation: every final task t receives from every other task s a 3x3 convolution
   of F_s gated by a spatial attention computed from F_s itself (the code base's SABlock),
   F'_t = F_t + sum_{s != t} sigmoid(conv_a(F_s)) * conv_m(F_s); `gate="self"` is the paper's
   attention-guided variant (one attention map from the receiving task, G_t = sigmoid(conv(F_t)));
4. per final task, two bottleneck blocks and a 1x1 layer give the final prediction.

`decoder.auxiliary_tasks` (edges and normals in the code base's NYUD `+edges_normals` configs)
get only the initial predictions and act as distillation sources. `MultiModalDistillation` is also
MTI-Net's per-scale distillation (`mtinet.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor, nn

from mtl_vision.layers import ConvBNReLU, shortcut
from mtl_vision.models.decoders.common import FuseScales, HRNetFuse, final_tasks_of, select_levels

__all__ = ["Bottleneck", "MultiModalDistillation", "PADNetDecoder"]

GATES = ("source", "self")
FUSES = ("auto", "hrnet", "project")


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
    """Each receiving task's feature plus gated messages from the other tasks' features.

    Args:
        tasks: task names (the senders); with a single task there are no messages.
        channels: width of every task feature.
        gate: where the attention map comes from:
            "source" - the sending task, one map per (sender, receiver) pair:
                       message = sigmoid(conv_a(F_s)) * conv_m(F_s) (the SABlock of MTI-Net's code
                       base, used by its PAD-Net and MTI-Net);
            "self"   - the receiving task, one map per receiver shared by all its messages
                       (PAD-Net's attention-guided distillation, G_t = sigmoid(W_t * F_t)).
        receivers: the tasks that receive messages (default: all); the others only send.

    Every (sender, receiver) pair has its own 3x3 convolutions (no bias). They run as one
    convolution per receiver over the concatenated senders: with gate="self" a plain one (the sum
    of the per-sender convolutions), with gate="source" a grouped one (one group per sender, in
    `tasks` order), as few, wide convolutions are much faster than T*(T-1) small ones.

    `forward({task: (N, channels, H, W)}, return_gates=False)` returns {receiver: distilled
    feature} (and, with `return_gates`, {receiver: {sender: gate (N, channels, H, W)}}; with
    gate="self" a receiver's entries are one tensor).
    """

    def __init__(
        self, tasks: Sequence[str], channels: int, gate: str = "source", receivers: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        if gate not in GATES:
            raise ValueError(f"decoder.gate: the distillation gate must be one of {GATES}, got {gate!r}")
        self.tasks = list(tasks)
        self.receivers = list(receivers) if receivers is not None else list(self.tasks)
        unknown = [t for t in self.receivers if t not in self.tasks]
        if unknown:
            raise ValueError(f"MultiModalDistillation: receivers {unknown} are not among the tasks {self.tasks}")
        self.gate = gate
        self.sources = {t: [s for s in self.tasks if s != t] for t in self.receivers}
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
        for t in self.receivers:
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


def _blocks(in_channels: int, channels: int, num_blocks: int) -> nn.Sequential:
    return nn.Sequential(*(Bottleneck(in_channels if i == 0 else channels, channels) for i in range(num_blocks)))


class PADNetDecoder(nn.Module):
    """Shared fusion, per-task initial predictions, multi-modal distillation, final predictions.

    Args:
        in_channels: channels of each backbone level.
        strides: stride of each backbone level.
        task_channels: output channels per task.
        channels: width of every task's features (256 in the code base).
        num_blocks: bottleneck blocks before the initial and before the final predictions (2).
        gate: attention of the distillation, "source" (the code base) or "self" (the paper's
            attention-guided variant), see `MultiModalDistillation`.
        fuse: how the levels become the shared map: "hrnet" (`HRNetFuse`, the code base: the
            levels upsampled to the finest and fused at their summed width), "project"
            (`FuseScales`: each level projected to `channels` first, then a 3x3 fusion), "auto"
            (hrnet when the chosen levels have strictly increasing strides, finest first, as
            HRNet's branches; project otherwise, e.g. a ViT's single-stride levels). On a wide
            CNN (ResNet-50: 3840 summed channels) "project" is the lighter choice.
        min_stride, levels: the backbone levels that are fused (see `select_levels`).
        auxiliary_tasks: tasks of `task_channels` with only initial predictions (deep supervision,
            distillation senders), no final prediction.

    `forward(features)` returns {task: (N, task_channels[task], H/s, W/s)} for each of
    `final_tasks`, with s = `output_stride`, and "aux": {"initial": {task: initial prediction, same
    size}} for every task.
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
        gate: str = "source",
        fuse: str = "auto",
        min_stride: int = 4,
        levels: Sequence[int] | None = None,
        auxiliary_tasks: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not task_channels:
            raise ValueError("PADNetDecoder needs at least one task")
        if num_blocks < 1:
            raise ValueError(f"decoder.num_blocks must be >= 1, got {num_blocks}")
        if fuse not in FUSES:
            raise ValueError(f"decoder.fuse must be one of {FUSES}, got {fuse!r}")
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels {list(in_channels)} and strides {list(strides)} differ in length")
        self.tasks = list(task_channels)
        self.final_tasks = final_tasks_of(task_channels, auxiliary_tasks)
        self.auxiliary_tasks = [t for t in self.tasks if t not in self.final_tasks]
        self.levels = select_levels(strides, min_stride=min_stride, levels=levels)
        chosen = [strides[i] for i in self.levels]
        if fuse == "auto":
            fuse = "hrnet" if all(b > a for a, b in pairwise(chosen)) else "project"
        self.fuse_mode = fuse
        if fuse == "hrnet":
            self.fuse: nn.Module = HRNetFuse([in_channels[i] for i in self.levels])
            self.output_stride = chosen[0]
            shared = self.fuse.out_channels
        else:
            self.fuse = FuseScales(in_channels, strides, channels, min_stride=min_stride, levels=levels)
            self.output_stride = self.fuse.output_stride
            shared = channels
        self.initial = nn.ModuleDict({t: _blocks(shared, channels, num_blocks) for t in self.tasks})
        self.initial_heads = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in task_channels.items()})
        self.distill = MultiModalDistillation(self.tasks, channels, gate=gate, receivers=self.final_tasks)
        self.heads = nn.ModuleDict(
            {
                t: nn.Sequential(_blocks(channels, channels, num_blocks), nn.Conv2d(channels, task_channels[t], 1))
                for t in self.final_tasks
            }
        )

    def forward(self, features: Sequence[Tensor]) -> dict:
        if self.fuse_mode == "hrnet":
            shared = self.fuse([features[i] for i in self.levels])
        else:
            shared = self.fuse(features)
        task_features = {t: self.initial[t](shared) for t in self.tasks}
        initial = {t: self.initial_heads[t](task_features[t]) for t in self.tasks}
        distilled = self.distill(task_features)
        out: dict = {t: self.heads[t](distilled[t]) for t in self.final_tasks}
        out["aux"] = {"initial": initial}
        return out
