"""CTAL / EMA-Net checkpoints (Armanfard-Lab/EMA-Net): what their utils.py `multitask_trainer`
saves, `torch.save(model.state_dict())` of the `MTR_Net` wrapper (models/wrappers.py), a bare
state dict whose keys start with `model.` (the network) or `criterion.` (the loss), into our
HRNet `Backbone` + `decoder=ctal` (`mtl_vision.models.decoders.ctal`).

Their backbone is `Sequential(HighResolutionNet, HighResolutionFuse)` (config.py `get_backbone`
with `fuse_hrnet`): `backbone.0.*` is the HRNet (renamed by `_hrnet.hrnet_rules`), `backbone.1.*`
the fusion, which is part of our decoder. Per-task modules are keyed by task name on both sides;
only the grouped fusion convolution mixes the tasks, its input channels interleaved in their task
order (config.py `parse_task_dictionary`: semseg, depth, normals), which is permuted to ours.
Their affinity learning module is our `decoder.affinity` (`CrossTaskAffinity`); `affinity_rules`,
`head_rules` and `authors_tasks` also serve MEMANet's checkpoints (`importing.memanet`).
Their loss weighting `uncertainty` keeps its log-variances under `criterion.`; they are no weights
of the network and are dropped. Keys that match no rule are an error naming them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, check_task_set, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused
from mtl_vision.importing.padnet import BOTTLENECK, block_rule  # the same ResNet Bottleneck on both sides

__all__ = ["AUTHORS_TASK_ORDER", "affinity_rules", "authors_tasks", "head_rules", "to_ours"]

# config.py parse_task_dictionary appends the tasks in this order
AUTHORS_TASK_ORDER = ("semseg", "depth", "normals")
NETWORK = "model."  # MTR_Net.model
UNUSED = (re.compile(r"criterion\."),)  # losses/loss_weights.py Uncertainty.weights
FUSION_WEIGHT = "decoder.affinity.fusion.conv.weight"


def authors_tasks(state: dict[str, Tensor]) -> list[str]:
    """The tasks of their `MTR_Net` state dict (their order), read from the final heads' keys."""
    prefix = f"{NETWORK}heads."
    found = {k[len(prefix) :].split(".", 1)[0] for k in state if k.startswith(prefix)}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's task heads {sorted(found)} are not tasks of EMA-Net's code {list(AUTHORS_TASK_ORDER)}"
        )
    return [t for t in AUTHORS_TASK_ORDER if t in found]


def affinity_rules(theirs: str, fusion: str) -> list[Rule]:
    """Rules for their affinity learning module under the key prefix `theirs` (its grouped fusion
    convolution named `spatial_att.<fusion>`) -> our `decoder.affinity` (`CrossTaskAffinity`)."""
    p = re.escape(theirs)
    return [
        (re.compile(rf"{p}conv_in\.(\w+)\.(\w+)"), lambda m: f"decoder.affinity.conv_in.{m[1]}.{m[2]}"),
        (re.compile(rf"{p}spatial_att\.projection\.(\w+)\.(\w+)"), lambda m: f"decoder.affinity.value.{m[1]}.{m[2]}"),
        (re.compile(rf"{p}spatial_att\.{fusion}\.(weight|bias)"), lambda m: f"decoder.affinity.fusion.conv.{m[1]}"),
        (
            re.compile(rf"{p}conv_out\.(\w+)\.([013])\.(\w+)"),
            lambda m: f"decoder.affinity.conv_out.{m[1]}.{m[2]}.{m[3]}",
        ),
    ]


def head_rules(theirs: str) -> list[Rule]:
    """Rules for their final heads `<theirs>heads.<task>.{0,1,2}` (two bottlenecks, a 1x1 conv) ->
    our `decoder.heads` (`ctal.bottleneck_heads`)."""
    p = re.escape(theirs)
    return [
        block_rule(rf"{p}heads\.(?P<t>\w+?)\.(?P<i>[01])", lambda m: f"decoder.heads.{m['t']}.{m['i']}", BOTTLENECK),
        (re.compile(rf"{p}heads\.(\w+)\.2\.(\w+)"), lambda m: f"decoder.heads.{m[1]}.2.{m[2]}"),
    ]


def _rules() -> list[Rule]:
    """Renaming rules on their keys, `model.` included (so that an unknown key is named as in the file)."""
    p = re.escape(NETWORK)
    return [
        *hrnet_rules(theirs=f"{NETWORK}backbone.0.", ours="backbone.model."),
        (re.compile(rf"{p}backbone\.1\.last_layer\.([01])\.(\w+)"), lambda m: f"decoder.fuse.fuse.{m[1]}.{m[2]}"),
        block_rule(
            rf"{p}initial_task_prediction_heads\.layers\.(?P<t>\w+?)\.(?P<i>[01])",
            lambda m: f"decoder.initial.{m['t']}.{m['i']}",
            BOTTLENECK,
        ),
        (
            re.compile(rf"{p}initial_task_prediction_heads\.conv_out\.(\w+)\.(\w+)"),
            lambda m: f"decoder.initial_heads.{m[1]}.{m[2]}",
        ),
        *affinity_rules(f"{NETWORK}affinity_learning_module.", fusion="fusion"),
        *head_rules(NETWORK),
    ]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Their `MTR_Net` state dict in the keys of our MultiTaskModel, for our task order `tasks`."""
    theirs = authors_tasks(state)
    named = check_task_set(theirs, tasks)
    out = rename_keys(state, _rules(), unused=[*UNUSED, *hrnet_unused(f"{NETWORK}backbone.0.")], what="EMA-Net")
    weight = out.get(FUSION_WEIGHT)
    if weight is not None and weight.shape[1] == len(theirs):
        # input channel t of each position's group is their t-th task: reorder to ours
        order = [named.index(t) for t in tasks]
        out[FUSION_WEIGHT] = weight[:, order].contiguous()
    return out
