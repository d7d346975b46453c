"""MLoRE checkpoints (YuqiYang213/MLoRE): `MLoREWrapper` weights as `utils/train_utils.py` saves
them, `{'model': DDP state_dict, 'optimizer': ..., 'scheduler': ..., 'epoch': ..., 'iter_count': ...}`,
into our ViT backbone + `decoder=mlore` (`mtl_vision.models.decoders.mlore`).

Their ViT and decoder live together under `backbone.`: the ViT's own weights (its final LayerNorm
included: our backbone applies it with `final_norm=true`) go to our timm backbone, the rest to the
decoder. Their ViT never uses the class-token row of its position
embedding (their forward adds `pos_embed[:, 1:]`); our ViT has no class token, so the row is
dropped. Per-task modules are keyed by task name on both sides (`sal` is our `saliency`), so no
task order is involved. Keys that match no rule are passed through unchanged, for the strict
check of `mtl_vision.importing.load_exactly` to name them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import Tensor

from mtl_vision.importing._authors import TASK_NAMES, VIT

# Weights of modules their forward never uses, present in checkpoints of their ViT-B variant
# (models/MLoRE_vitB.py, models/MLoRE_wrapper_vitb.py): a per-task query fusion, two task
# classifiers of the routing features, and a second set of task heads (aux_heads) that the
# wrapper stores but never calls.
UNUSED = (
    re.compile(r"backbone\.q_fuse\."),
    re.compile(r"backbone\.classify_route_[12]\."),
    re.compile(r"aux_heads\."),
)

# their SpatialAtt (router_1.<task>.0) -> our RouterContext
_ROUTER_CONTEXT = {
    "conv1": "local_proj",
    "ln": "local_norm",
    "conv3": "local_mix",
    "convsp": "pool",
    "ln_sp": "pool_norm",
    "conv2": "global_proj",
}
_LOW_RANK = {"W": "down", "M": "up"}
_PER_TASK = {"conv1": "task_in", "conv3": "task_out", "bn": "norm", "bn_all": "expert_norm"}


def _task(name: str) -> str:
    return TASK_NAMES.get(name, name)


def _moe_block(rest: str) -> str | None:
    """A key inside their MOEBlock -> ours inside LowRankMoE (None if unknown)."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"lora_list_1\.(\d+)\.([WM])\.(.*)", lambda m: f"experts.{m[1]}.{_LOW_RANK[m[2]]}.{m[3]}"),
        (r"conv2\.(\w+)\.([WM])\.(.*)", lambda m: f"task_expert.{_task(m[1])}.{_LOW_RANK[m[2]]}.{m[3]}"),
        (r"(conv1|conv3|bn|bn_all)\.(\w+)\.(.*)", lambda m: f"{_PER_TASK[m[1]]}.{_task(m[2])}.{m[3]}"),
        (r"share_conv\.(.*)", lambda m: f"shared.{m[1]}"),
        (
            r"router_1\.(\w+)\.0\.(conv1|ln|conv3|convsp|ln_sp|conv2)\.(.*)",
            lambda m: f"routers.{_task(m[1])}.context.{_ROUTER_CONTEXT[m[2]]}.{m[3]}",
        ),
        (r"router_1\.(\w+)\.1\.(.*)", lambda m: f"routers.{_task(m[1])}.logits.{m[2]}"),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, rest)
        if match:
            return rename(match)
    return None


def _experts_key(match: re.Match) -> str | None:
    inner = _moe_block(match[3])
    return f"decoder.experts_{match[1]}.{match[2]}.{inner}" if inner else None


def _rename(key: str) -> str | None:
    rules: list[tuple[str, Callable[[re.Match], str | None]]] = [
        (r"backbone\.((?:patch_embed|blocks|norm)\..*|pos_embed)", lambda m: VIT + m[1]),
        (r"backbone\.fea_fuse\.(\d+)\.(.*)", lambda m: f"decoder.project.{m[1]}.{m[2]}"),
        (r"backbone\.MLoRE_([12])\.(\d+)\.(.*)", _experts_key),
        (r"backbone\.task_mask\.(\w+)\.(.*)", lambda m: f"decoder.level_gates.{_task(m[1])}.{m[2]}"),
        (r"heads\.(\w+)\.mt_proj\.(.*)", lambda m: f"decoder.heads.{_task(m[1])}.proj.{m[2]}"),
        (r"heads\.(\w+)\.linear_pred\.(.*)", lambda m: f"decoder.heads.{_task(m[1])}.pred.{m[2]}"),
    ]
    for pattern, rename in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return rename(match)
    return None


def to_ours(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' MLoRE state dict (`module.` stripped) in the keys of our MultiTaskModel."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if any(p.match(key) for p in UNUSED):
            continue
        if key == "backbone.pos_embed":
            value = value[:, 1:]  # the class-token row, never added in their forward
        out[_rename(key) or key] = value
    return out
