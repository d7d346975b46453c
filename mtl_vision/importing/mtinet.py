"""MTI-Net checkpoints of its code base (SimonVandenhende/Multi-Task-Learning-PyTorch,
models/mti_net.py with HighResolutionHead heads): `main.py` saves `model.state_dict()` of the
DataParallel model, bare (`best_model.pth.tar`) or as `{'model': ..., 'optimizer': ..., 'epoch':
..., 'best_result': ...}` (`checkpoint.pth.tar`), into our HRNet `Backbone` + `decoder=mtinet`
(scales 4/8/16/32 read from the backbone's branches).

Their `scale_<i>` (i = 0 finest) is our `decoder.multiscale.initial.<i>`, `fpm_scale_<i>` our
`decoder.multiscale.fpm.scale_<4 * 2^i>` (`multiscale_rules`, which MEMANet's checkpoints share),
`distillation_scale_<i>` our `decoder.distill.<i>` (per-pair
SABlocks concatenated into one grouped convolution per receiver, see `importing.padnet`), and a
head's `last_layer.{0,1}` our `HRNetFuse`, `last_layer.3` the prediction layer.

The FPM concatenates the task features in their task order (utils/config.py appends semseg,
human_parts, sal, normals, edge, depth in this order) and softmaxes over groups of consecutive
channels of that concatenation, which mixes neighbouring tasks: no permutation of the weights
reproduces it in another order, so `data.tasks` must list the tasks in their order.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused
from mtl_vision.importing.padnet import BASIC_BLOCK, as_float32, block_rule, merge_distillation, ours

__all__ = ["AUTHORS_TASK_ORDER", "UNUSED", "authors_order", "check_their_order", "multiscale_rules", "to_ours"]

AUTHORS_TASK_ORDER = ("semseg", "human_parts", "sal", "normals", "edge", "depth")  # utils/config.py
STRIDES = (4, 8, 16, 32)  # their scale_0 .. scale_3
# the HRNet classification head, absent from their segmentation HRNet (see importing._hrnet)
UNUSED = tuple(hrnet_unused("backbone."))
_SCALE_TASK = re.compile(r"scale_\d\.decoders\.(\w+)\.weight")
MULTISCALE = "decoder.multiscale."  # our MultiScaleTaskFeatures


def authors_order(state: dict[str, Tensor]) -> list[str]:
    """Our names of the checkpoint's tasks (those with per-scale predictions), in their order."""
    found = {m[1] for key in state if (m := _SCALE_TASK.fullmatch(key))}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's per-scale predictions are for tasks {sorted(found)}, not tasks of "
            f"MTI-Net's code {list(AUTHORS_TASK_ORDER)} (not an MTI-Net checkpoint?)"
        )
    return [ours(t) for t in AUTHORS_TASK_ORDER if t in found]


def check_their_order(tasks: Sequence[str], theirs: Sequence[str], model: str) -> None:
    """The FPM's softmax over channel groups mixes neighbouring tasks: no permutation of the weights
    reproduces it in another order, so `tasks` (data.tasks) must be `theirs`, in their order.

    Raises:
        ValueError: naming data.tasks and the order the checkpoint needs (`model`: for the message).
    """
    if list(tasks) != list(theirs):
        raise ValueError(
            f"data.tasks={list(tasks)}: {model}'s feature propagation depends on the order of the tasks; "
            f"this checkpoint needs data.tasks={list(theirs)} (their order)"
        )


def multiscale_rules(theirs: str = "") -> list[Rule]:
    """Rules for their per-scale initial predictions `<theirs>scale_<i>` and FPMs
    `<theirs>fpm_scale_<i>` (MTI-Net's names, also in MEMANet) -> our `MultiScaleTaskFeatures`."""
    p = re.escape(theirs)

    def task(m: re.Match) -> str:
        return ours(m["t"])

    def fpm(m: re.Match) -> str:
        return f"{MULTISCALE}fpm.scale_{STRIDES[int(m['i'])]}"

    return [
        block_rule(rf"{p}scale_(?P<i>\d)\.refinement\.(?P<t>\w+?)\.(?P<j>[01])",
                   lambda m: f"{MULTISCALE}initial.{m['i']}.refine.{task(m)}.{m['j']}", BASIC_BLOCK),
        (re.compile(rf"{p}scale_(?P<i>\d)\.decoders\.(?P<t>\w+)\.(\w+)"),
         lambda m: f"{MULTISCALE}initial.{m['i']}.predict.{task(m)}.{m[3]}"),
        block_rule(rf"{p}fpm_scale_(?P<i>\d)\.non_linear\.(?P<j>[01])", lambda m: f"{fpm(m)}.attention.{m['j']}",
                   BASIC_BLOCK),
        (re.compile(rf"{p}fpm_scale_(?P<i>\d)\.non_linear\.2\.(\w+)"), lambda m: f"{fpm(m)}.attention.2.{m[2]}"),
        block_rule(rf"{p}fpm_scale_(?P<i>\d)\.dimensionality_reduction", lambda m: f"{fpm(m)}.reduce", BASIC_BLOCK),
        (re.compile(rf"{p}fpm_scale_(?P<i>\d)\.se\.(?P<t>\w+)\.squeeze\.([02])\.(\w+)"),
         lambda m: f"{fpm(m)}.excite.{task(m)}.mlp.{m[3]}.{m[4]}"),
    ]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """The authors' MTI-Net state dict (`module.` stripped) in the keys of our MultiTaskModel.

    Raises:
        ValueError: when `tasks` (data.tasks) are not the checkpoint's tasks in their order.
    """
    check_their_order(tasks, authors_order(state), "MTI-Net")

    def task(m: re.Match) -> str:
        return ours(m["t"])

    rules: list[Rule] = [
        *hrnet_rules("backbone."),
        *multiscale_rules(),
        (re.compile(r"heads\.(?P<t>\w+)\.last_layer\.([01])\.(\w+)"),
         lambda m: f"decoder.heads.{task(m)}.0.fuse.{m[2]}.{m[3]}"),
        (re.compile(r"heads\.(?P<t>\w+)\.last_layer\.3\.(\w+)"), lambda m: f"decoder.heads.{task(m)}.1.{m[2]}"),
    ]

    def distill_prefix(where: str) -> str:
        match = re.fullmatch(r"distillation_scale_(\d)\.", where)
        return f"decoder.distill.{match[1]}." if match else where

    rest, distill = merge_distillation(as_float32(state), tasks, distill_prefix)
    return {**rename_keys(rest, rules, unused=UNUSED, what="MTI-Net (Multi-Task-Learning-PyTorch)"), **distill}
