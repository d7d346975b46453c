"""TaskPrompter checkpoints (prismformore/Multi-Task-Transformer, TaskPrompter/): `TaskPrompterWrapper`
weights as `main.py` saves them, `{'model': DDP state_dict, 'optimizer': ..., 'scheduler': ..., ...}`.

Their ViT (with the prompts and per-level task modules inside it) becomes our timm ViT under
`backbone.model.model.` plus `decoder.prompter` / `decoder.levels`; their one tensor of all
prompts, in the order their config code appends tasks, is split into our per-task prompts.
Their forward uses every weight they save, so nothing is dropped; their ViT has no class token,
ours (timm's, kept for its pretrained weights) has one that TaskPrompter never reads: it is
filled with zeros.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import Tensor

from mtl_vision.importing._authors import VIT, Rule, authors_tasks, check_task_set, ours, rename_keys

UNUSED: tuple[str, ...] = ()  # every saved weight takes part in their forward


RULES: list[Rule] = [
    (
        re.compile(r"backbone\.blocks\.(\d+)\.attn\.token_trans\.(\w+)"),
        lambda m: f"decoder.prompter.to_pixels.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"backbone\.blocks\.(\d+)\.attn\.token_trans1\.(\w+)"),
        lambda m: f"decoder.prompter.from_pixels.{m[1]}.{m[2]}",
    ),
    (
        re.compile(r"backbone\.fea_decode_(spa|chan)\.(\d+)\.(\w+)\.0\.(\w+)"),
        lambda m: f"decoder.levels.{m[2]}.{ours(m[3])}.{'spatial' if m[1] == 'spa' else 'channel'}.{m[4]}",
    ),
    (
        re.compile(r"backbone\.fea_fuse\.(\d+)\.(\w+)\.(.+)"),
        lambda m: f"decoder.levels.{m[1]}.{ours(m[2])}.fuse.{m[3]}",
    ),
    (
        re.compile(r"backbone\.ctr_attn_conv\.(\d+)\.(\w+)\.(.+)"),
        lambda m: f"decoder.levels.{m[1]}.{ours(m[2])}.reweight.{m[3]}",
    ),
    (re.compile(r"backbone\.((?:pos_embed|patch_embed\.|blocks\.|norm\.).*)"), lambda m: f"{VIT}{m[1]}"),
    (re.compile(r"heads\.(\w+)\.mt_proj\.(.+)"), lambda m: f"decoder.heads.{ours(m[1])}.proj.{m[2]}"),
    (re.compile(r"heads\.(\w+)\.linear_pred\.(\w+)"), lambda m: f"decoder.heads.{ours(m[1])}.pred.{m[2]}"),
]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
    """The authors' state dict (`module.` stripped) in the keys of our MultiTaskModel.

    `tasks`: the configured model's tasks (our names), checked against the checkpoint's.
    """
    theirs = authors_tasks(state)
    named = check_task_set(theirs, tasks)
    state = dict(state)
    prompts = state.pop("backbone.task_prompts", None)
    out = rename_keys(state, RULES, what="TaskPrompter")
    if prompts is not None:
        if prompts.shape[0] % len(theirs):
            raise ValueError(f"backbone.task_prompts {tuple(prompts.shape)}: not one block of rows per task {theirs}")
        for task, rows in zip(named, prompts.chunk(len(theirs))):
            out[f"decoder.prompter.prompts.{task}"] = rows.clone()
    pos = out.get(f"{VIT}pos_embed")
    if pos is None:
        raise ValueError("the checkpoint has no backbone.pos_embed (not a TaskPrompter checkpoint?)")
    out[f"{VIT}cls_token"] = torch.zeros(1, 1, pos.shape[-1], dtype=pos.dtype)
    return out
