"""InvPT checkpoints (prismformore/Multi-Task-Transformer, InvPT/): `TransformerNet` weights as
`main.py` saves them, `{'model': DDP state_dict, 'optimizer': ..., 'scheduler': ..., ...}`.

The authors' per-task modules are indexed by the task's position in their task list, which their
config code builds in a fixed order; ours follow `data.tasks`. Such indices, and the per-task
channel blocks of the joint LayerNorms, are permuted to our order here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

# the order in which the authors' utils/config.py appends the tasks it is told to include
AUTHORS_TASK_ORDER = ("semseg", "depth", "human_parts", "sal", "normals", "edge")
TASK_NAMES = {"sal": "saliency"}  # theirs -> ours

# Weights of modules their forward never uses: the projection of the second-last backbone level
# (its output is computed, never added), the first stage's attention-score fusion and width
# reduction (there is no previous stage, nothing to reduce), and a LayerNorm after the last stage.
UNUSED = (
    re.compile(r"multi_task_decoder\.scale_embed\.2\."),
    re.compile(r"multi_task_decoder\.invpt\.invpt_stages\.0\.blocks\.0\.attn\.fuse_attn\."),
    re.compile(r"multi_task_decoder\.invpt\.redu_chan\.0\."),
    re.compile(r"multi_task_decoder\.invpt\.norm_mt\."),
)


def authors_tasks(state: dict[str, Tensor], prefix: str = "heads.") -> list[str]:
    """The authors' task list (their names, their order), read from the task heads' keys."""
    found = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's task heads {sorted(found)} are not tasks of the authors' code {list(AUTHORS_TASK_ORDER)}"
        )
    return [t for t in AUTHORS_TASK_ORDER if t in found]


def task_permutation(theirs: Sequence[str], ours: Sequence[str]) -> list[int]:
    """`perm[j]` = our index of the authors' j-th task; the two sets must agree."""
    named = [TASK_NAMES.get(t, t) for t in theirs]
    if sorted(named) != sorted(ours):
        raise ValueError(f"the checkpoint was trained on tasks {named}; the configured model has {list(ours)}")
    return [list(ours).index(t) for t in named]


def permute_task_blocks(value: Tensor, perm: Sequence[int]) -> Tensor:
    """A 1-D tensor of T equal per-task blocks (theirs in their task order) in our task order."""
    blocks = value.chunk(len(perm))
    ordered = [None] * len(perm)
    for j, block in enumerate(blocks):
        ordered[perm[j]] = block
    return torch.cat(ordered)


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    theirs = authors_tasks(state)
    perm = task_permutation(theirs, tasks)

    def task(name: str) -> str:
        return TASK_NAMES.get(name, name)

    def index(j: str) -> str:
        return str(perm[int(j)])

    rules: list[tuple[re.Pattern, object]] = [
        (re.compile(r"backbone\.(.*)"), lambda m: f"backbone.model.model.{m[1]}"),
        (re.compile(r"heads\.(\w+)\.linear_pred\.(.*)"), lambda m: f"decoder.heads.{task(m[1])}.{m[2]}"),
        (
            re.compile(r"multi_task_decoder\.(intermediate_head|preliminary_decoder)\.(\w+)\.(.*)"),
            lambda m: f"decoder.{m[1]}.{task(m[2])}.{m[3]}",
        ),
        (re.compile(r"multi_task_decoder\.scale_embed\.([01])\.(.*)"), lambda m: f"decoder.scale_embed.{m[1]}.{m[2]}"),
        (
            re.compile(r"multi_task_decoder\.invpt\.(mix_proj|mt_proj)\.(\w+)\.(.*)"),
            lambda m: f"decoder.{m[1]}.{task(m[2])}.{m[3]}",
        ),
        (
            re.compile(r"multi_task_decoder\.invpt\.invpt_stages\.(\d)\.patch_embed\.(\d+)\.(.*)"),
            lambda m: f"decoder.invpt_stages.{m[1]}.patch_embed.{index(m[2])}.{m[3]}",
        ),
        (
            re.compile(r"multi_task_decoder\.invpt\.invpt_stages\.(\d)\.blocks\.0\.attn\.conv_proj_q\.(\d+)\.(.*)"),
            lambda m: f"decoder.invpt_stages.{m[1]}.blocks.0.attn.conv_proj_q.{index(m[2])}.{m[3]}",
        ),
        (
            re.compile(r"multi_task_decoder\.invpt\.invpt_stages\.(\d)\.blocks\.0\.(.*)"),
            lambda m: f"decoder.invpt_stages.{m[1]}.blocks.0.{m[2]}",
        ),
        (
            re.compile(r"multi_task_decoder\.invpt\.redu_chan\.([12])\.(\d+)\.(.*)"),
            lambda m: f"decoder.redu_chan.{m[1]}.{index(m[2])}.{m[3]}",
        ),
        (re.compile(r"multi_task_decoder\.invpt\.norm_mts\.(\d)\.(.*)"), lambda m: f"decoder.norm_mts.{m[1]}.{m[2]}"),
    ]
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if any(p.match(key) for p in UNUSED):
            continue
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                new = rename(match)
                if new.startswith("decoder.norm_mts."):
                    value = permute_task_blocks(value, perm)
                out[new] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys of no InvPT module: {unknown[:8]}{' …' if len(unknown) > 8 else ''}")
    return out
