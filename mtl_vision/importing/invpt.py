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

from mtl_vision.importing._authors import VIT, Rule, authors_tasks, check_task_set, ours, rename_keys

# Weights of modules their forward never uses: the projection of the second-last backbone level
# (its output is computed, never added), the first stage's attention-score fusion and width
# reduction (there is no previous stage, nothing to reduce), and a LayerNorm after the last stage.
UNUSED = (
    re.compile(r"multi_task_decoder\.scale_embed\.2\."),
    re.compile(r"multi_task_decoder\.invpt\.invpt_stages\.0\.blocks\.0\.attn\.fuse_attn\."),
    re.compile(r"multi_task_decoder\.invpt\.redu_chan\.0\."),
    re.compile(r"multi_task_decoder\.invpt\.norm_mt\."),
)


def task_permutation(theirs: Sequence[str], tasks: Sequence[str]) -> list[int]:
    """`perm[j]` = our index of the authors' j-th task; the two sets must agree."""
    named = check_task_set(theirs, tasks)
    return [list(tasks).index(t) for t in named]


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

    def index(j: str) -> str:
        return str(perm[int(j)])

    rules: list[Rule] = [
        (re.compile(r"backbone\.(.*)"), lambda m: f"{VIT}{m[1]}"),
        (re.compile(r"heads\.(\w+)\.linear_pred\.(.*)"), lambda m: f"decoder.heads.{ours(m[1])}.{m[2]}"),
        (
            re.compile(r"multi_task_decoder\.(intermediate_head|preliminary_decoder)\.(\w+)\.(.*)"),
            lambda m: f"decoder.{m[1]}.{ours(m[2])}.{m[3]}",
        ),
        (re.compile(r"multi_task_decoder\.scale_embed\.([01])\.(.*)"), lambda m: f"decoder.scale_embed.{m[1]}.{m[2]}"),
        (
            re.compile(r"multi_task_decoder\.invpt\.(mix_proj|mt_proj)\.(\w+)\.(.*)"),
            lambda m: f"decoder.{m[1]}.{ours(m[2])}.{m[3]}",
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
    out = rename_keys(state, rules, unused=UNUSED, what="InvPT")
    for key in [k for k in out if k.startswith("decoder.norm_mts.")]:
        out[key] = permute_task_blocks(out[key], perm)
    return out
