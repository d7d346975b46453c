"""SegNet-MTAN state dicts into `backbone=segnet decoder=mtan`.

Three codebases hold the same model (same keys, same forward; checked on the fixtures of
scripts/fixtures/mtan.py): lorenmt/mtan `im2im_pred/model_segnet_mtan.py` (`SegNet`, bare keys,
with the uncertainty weighting's `logsigma`, which is the balancer's, not the network's: dropped)
and the copies of AvivNavon/nash-mtl and Cranial-XIX/FAMO `experiments/{nyuv2,cityscapes}/models.py`
(`SegNetMtan`, keys under `segnet.`). None of them saves checkpoints; a saved `state_dict()` of
either model (bare, or under 'model'/'state_dict') is read.

Their tasks are numbered: `pred_task1/2/3` and the first index of `encoder_att`/`decoder_att` are
semantic segmentation, depth, normals (NYUv2; Cityscapes has the first two). Their decoder lists
run fine to coarse where ours run coarse to fine (`decoder_block[i]` is our stage 4 - i).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, rename_keys
from mtl_vision.importing.padnet import as_float32

__all__ = ["AUTHORS_TASKS", "UNUSED", "to_ours"]

AUTHORS_TASKS = ("semseg", "depth", "normals")  # their task 1, 2, 3 (index 0, 1, 2)
UNUSED = (re.compile(r"logsigma$"),)  # lorenmt/mtan's uncertainty weights (balancer=uncertainty)
_P = r"(?P<p>weight|bias|running_mean|running_var|num_batches_tracked)"


def _stage(i: str) -> int:
    """Our decoder stage (coarse to fine) of their decoder index (fine to coarse)."""
    return 4 - int(i)


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Either codebase's SegNet-MTAN state dict in the keys of our MultiTaskModel."""
    state = {k.removeprefix("segnet."): v for k, v in state.items()}
    heads = sorted({int(m[1]) for k in state if (m := re.match(r"pred_task(\d)\.", k))})
    theirs = [AUTHORS_TASKS[n - 1] for n in heads if 1 <= n <= len(AUTHORS_TASKS)]
    if len(theirs) != len(heads) or theirs != list(AUTHORS_TASKS[: len(theirs)]):
        raise ValueError(f"the checkpoint's heads pred_task{heads} are not MTAN's tasks 1..{len(AUTHORS_TASKS)}")
    if sorted(theirs) != sorted(tasks):
        raise ValueError(f"the checkpoint was trained on tasks {theirs}; the configured model has {list(tasks)}")

    def task(i: str) -> str:
        return theirs[int(i)]

    rules: list[Rule] = [
        (re.compile(rf"encoder_block\.(?P<i>\d)\.(?P<k>\d)\.{_P}"), lambda m: f"backbone.encoder.{m['i']}.first.{m['k']}.{m['p']}"),
        (re.compile(rf"decoder_block\.(?P<i>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"backbone.decoder.{_stage(m['i'])}.first.{m['k']}.{m['p']}"),
        # conv_block_{enc,dec}.i is one block in the two finest stages, a Sequential of two elsewhere
        (re.compile(rf"conv_block_enc\.(?P<i>\d)\.(?P<r>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"backbone.encoder.{m['i']}.rest.{m['r']}.{m['k']}.{m['p']}"),
        (re.compile(rf"conv_block_enc\.(?P<i>\d)\.(?P<k>\d)\.{_P}"), lambda m: f"backbone.encoder.{m['i']}.rest.0.{m['k']}.{m['p']}"),
        (re.compile(rf"conv_block_dec\.(?P<i>\d)\.(?P<r>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"backbone.decoder.{_stage(m['i'])}.rest.{m['r']}.{m['k']}.{m['p']}"),
        (re.compile(rf"conv_block_dec\.(?P<i>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"backbone.decoder.{_stage(m['i'])}.rest.0.{m['k']}.{m['p']}"),
        (re.compile(rf"encoder_att\.(?P<t>\d)\.(?P<j>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"decoder.encoder_att.{task(m['t'])}.{m['j']}.{m['k']}.{m['p']}"),
        (re.compile(rf"decoder_att\.(?P<t>\d)\.(?P<i>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"decoder.decoder_att.{task(m['t'])}.{_stage(m['i'])}.{m['k']}.{m['p']}"),
        (re.compile(rf"encoder_block_att\.(?P<j>\d)\.(?P<k>\d)\.{_P}"), lambda m: f"decoder.encoder_shared.{m['j']}.{m['k']}.{m['p']}"),
        (re.compile(rf"decoder_block_att\.(?P<i>\d)\.(?P<k>\d)\.{_P}"),
         lambda m: f"decoder.decoder_shared.{_stage(m['i'])}.{m['k']}.{m['p']}"),
        (re.compile(rf"pred_task(?P<n>\d)\.(?P<k>\d)\.{_P}"), lambda m: f"decoder.heads.{theirs[int(m['n']) - 1]}.{m['k']}.{m['p']}"),
    ]
    return rename_keys(as_float32(state), rules, unused=UNUSED, what="SegNet-MTAN")
