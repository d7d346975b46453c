"""PAD-Net checkpoints of MTI-Net's code base (SimonVandenhende/Multi-Task-Learning-PyTorch,
models/padnet.py on backbone_kwargs.fuse_hrnet): `main.py` saves `model.state_dict()` of the
DataParallel model, bare (`best_model.pth.tar`) or as `{'model': ..., 'optimizer': ..., 'epoch':
..., 'best_result': ...}` (`checkpoint.pth.tar`), into our HRNet `Backbone` + `decoder=padnet`.

Their backbone is `Sequential(HRNet, HighResolutionFuse)`: `backbone.0.*` is the HRNet
(`_hrnet.hrnet_rules`), `backbone.1.last_layer.*` our `decoder.fuse` (HRNetFuse). Per-task modules
are keyed by task name on both sides (`sal` is our `saliency`). Their distillation has one SABlock
per (receiver, sender) pair; ours runs a receiver's senders as one grouped convolution, so the
pairs' 3x3 kernels are concatenated in our sender order (`data.tasks` without the receiver).
Weights come as saved (float16 in the test fixtures) and are cast to float32.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mtl_vision.importing._authors import Rule, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused

__all__ = ["BASIC_BLOCK", "BOTTLENECK", "UNUSED", "as_float32", "block_rule", "merge_distillation", "ours", "to_ours"]

TASK_NAMES = {"sal": "saliency"}  # theirs -> ours
# their models/resnet.py blocks -> ours (mtl_vision.models.decoders.padnet.Bottleneck, mtinet.BasicBlock)
BOTTLENECK = {"conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1.0", "bn2": "body.1.1",
              "conv3": "body.2", "bn3": "body.3", "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
BASIC_BLOCK = {"conv1": "body.0.0", "bn1": "body.0.1", "conv2": "body.1", "bn2": "body.2",
               "downsample.0": "shortcut.0", "downsample.1": "shortcut.1"}
# Weights their forward never uses: the HRNet classification head, in case a checkpoint was
# started from HRNet-Image-Classification's file with it (their segmentation HRNet has none).
UNUSED = tuple(hrnet_unused("backbone.0."))
_SA = re.compile(r"(?P<prefix>.*)self_attention\.(?P<t>\w+?)\.(?P<s>\w+?)\.(?P<part>attention\.0|conv)\.weight")


def ours(task: str) -> str:
    """Our name of one of their tasks."""
    return TASK_NAMES.get(task, task)


def block_rule(theirs: str, target: Callable[[re.Match], str], parts: dict[str, str]) -> Rule:
    """A rule for `<theirs>.<block part>.<param>` (theirs: a regex with groups) -> `<target>.<our part>.<param>`."""
    names = "|".join(re.escape(p) for p in parts)
    pattern = re.compile(rf"{theirs}\.(?P<part>{names})\.(?P<param>\w+)")
    return pattern, lambda m: f"{target(m)}.{parts[m['part']]}.{m['param']}"


def merge_distillation(
    state: dict[str, Tensor], tasks: Sequence[str], prefix: Callable[[str], str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(the other keys, our distillation weights): their per-pair SABlock kernels
    `<p>self_attention.<receiver>.<sender>.{attention.0,conv}.weight` concatenated per receiver in
    our sender order into `<prefix(p)>gates.<receiver>.weight` / `messages.<receiver>.weight`.

    Raises:
        ValueError: a receiver whose senders are not the other trained tasks.
    """
    pairs: dict[tuple[str, str, str], dict[str, Tensor]] = {}
    rest = {}
    for key, value in state.items():
        match = _SA.fullmatch(key)
        if not match:
            rest[key] = value
            continue
        kind = "gates" if match["part"] == "attention.0" else "messages"
        pairs.setdefault((match["prefix"], kind, ours(match["t"])), {})[ours(match["s"])] = value
    merged = {}
    for (where, kind, receiver), by_sender in pairs.items():
        senders = [s for s in tasks if s != receiver]
        if sorted(by_sender) != sorted(senders):
            raise ValueError(
                f"{where}self_attention.{receiver}: the checkpoint's senders {sorted(by_sender)} are not the other "
                f"trained tasks {senders} (data.tasks={list(tasks)})"
            )
        merged[f"{prefix(where)}{kind}.{receiver}.weight"] = torch.cat([by_sender[s] for s in senders])
    return rest, merged


def as_float32(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating-point tensors (float16 as the fixtures store them) in float32, the rest as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """The authors' PAD-Net state dict (`module.` stripped) in the keys of our MultiTaskModel."""

    def task(m: re.Match) -> str:
        return ours(m["t"])

    rules: list[Rule] = [
        *hrnet_rules("backbone.0."),
        (re.compile(r"backbone\.1\.last_layer\.([01])\.(\w+)"), lambda m: f"decoder.fuse.fuse.{m[1]}.{m[2]}"),
        block_rule(r"initial_task_prediction_heads\.layers\.(?P<t>\w+?)\.(?P<i>\d)",
                   lambda m: f"decoder.initial.{task(m)}.{m['i']}", BOTTLENECK),
        (re.compile(r"initial_task_prediction_heads\.conv_out\.(?P<t>\w+)\.(\w+)"),
         lambda m: f"decoder.initial_heads.{task(m)}.{m[2]}"),
        block_rule(r"heads\.(?P<t>\w+?)\.(?P<i>[01])", lambda m: f"decoder.heads.{task(m)}.0.{m['i']}", BOTTLENECK),
        (re.compile(r"heads\.(?P<t>\w+)\.2\.(\w+)"), lambda m: f"decoder.heads.{task(m)}.1.{m[2]}"),
    ]
    rest, distill = merge_distillation(
        as_float32(state), tasks, lambda where: "decoder.distill." if where == "multi_modal_distillation." else where
    )
    return {**rename_keys(rest, rules, unused=UNUSED, what="PAD-Net (Multi-Task-Learning-PyTorch)"), **distill}
