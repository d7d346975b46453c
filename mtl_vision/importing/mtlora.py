"""MTLoRA checkpoints (scale-lab/MTLoRA): `MultiTaskSwin` weights as their utils.save_checkpoint
writes them, `{'model': state_dict, 'optimizer': ..., 'lr_scheduler': ..., 'max_accuracy': ...,
'scaler': ..., 'epoch': ..., 'config': ...}`, for `experiment=mtlora_*` (peft=mtlora on timm's Swin).

Their Swin merges patches at the end of a stage, timm at the start of the next: their
`layers.i.downsample` is our `layers_{i+1}.downsample`. Their `MTLoRALinear` keeps the frozen
layer as `.linear` and the adapters as `lora_shared_*` / `lora_tasks_*.<task>`; ours keeps `.base`,
`lora_*`, `task_*.<task>`. Per-task modules are keyed by task name, so no reordering is needed.
Dropped: the shifted-window masks and relative position indices, buffers that both models compute
from the geometry (ours does not store them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, authors_tasks, check_task_set, ours, rename_keys

SWIN = "backbone.model."
UNUSED = (re.compile(r"backbone\.layers\.\d+\.blocks\.\d+\.(attn_mask|attn\.relative_position_index)$"),)
# their MTLoRALinear's parameters -> ours (a task name follows the per-task ones)
_ADAPTER = {"linear": "base", "lora_shared_A": "lora_A", "lora_shared_B": "lora_B", "lora_norm": "lora_norm"}
_TASK_ADAPTER = {"lora_tasks_A": "task_A", "lora_tasks_B": "task_B"}


def _linear(rest: str) -> str:
    """The inside of one adapted (or plain) linear: `linear.weight`, `lora_shared_A`, `lora_tasks_B.sal`, `weight`."""
    head, _, tail = rest.partition(".")
    if head in _TASK_ADAPTER:
        return f"{_TASK_ADAPTER[head]}.{ours(tail)}"
    if head in _ADAPTER:
        return f"{_ADAPTER[head]}{'.' + tail if tail else ''}"
    return rest


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    check_task_set(authors_tasks(state, prefix="decoders.decoders."), tasks)
    linears = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    rules: list[Rule] = [
        (re.compile(r"backbone\.patch_embed\.(.*)"), lambda m: f"{SWIN}patch_embed.{m[1]}"),
        (
            re.compile(rf"backbone\.layers\.(\d+)\.blocks\.(\d+)\.{linears}\.(.*)"),
            lambda m: f"{SWIN}layers_{m[1]}.blocks.{m[2]}.{m[3]}.{_linear(m[4])}",
        ),
        (
            re.compile(r"backbone\.layers\.(\d+)\.blocks\.(\d+)\.(norm1|norm2|attn\.relative_position_bias_table)(.*)"),
            lambda m: f"{SWIN}layers_{m[1]}.blocks.{m[2]}.{m[3]}{m[4]}",
        ),
        (
            re.compile(r"backbone\.layers\.(\d+)\.downsample\.norm\.(.*)"),
            lambda m: f"{SWIN}layers_{int(m[1]) + 1}.downsample.norm.{m[2]}",
        ),
        (
            re.compile(r"backbone\.layers\.(\d+)\.downsample\.reduction\.(.*)"),
            lambda m: f"{SWIN}layers_{int(m[1]) + 1}.downsample.reduction.{_linear(m[2])}",
        ),
        (
            re.compile(r"downsampler\.(\w+)\.downsample_(\d)\.weight"),
            lambda m: f"decoder.project.{ours(m[1])}.{m[2]}.weight",
        ),
        (
            re.compile(r"decoders\.decoders\.(\w+)\.last_layer\.([01])\.(.*)"),
            lambda m: f"decoder.heads.{ours(m[1])}.0.fuse.{m[2]}.{m[3]}",
        ),
        (
            re.compile(r"decoders\.decoders\.(\w+)\.last_layer\.3\.(.*)"),
            lambda m: f"decoder.heads.{ours(m[1])}.1.{m[2]}",
        ),
    ]
    return rename_keys(state, rules, unused=UNUSED, what="MTLoRA")
