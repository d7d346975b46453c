"""CTAL / EMA-Net checkpoints (Armanfard-Lab/EMA-Net): what their utils.py `multitask_trainer`
saves, `torch.save(model.state_dict())` of the `MTR_Net` wrapper (models/wrappers.py), a bare
state dict whose keys start with `model.` (the network) or `criterion.` (the loss), into our
HRNet `Backbone` + `decoder=ctal` (`mtl_vision.models.decoders.ctal`).

Their backbone is `Sequential(HighResolutionNet, HighResolutionFuse)` (config.py `get_backbone`
with `fuse_hrnet`): `backbone.0.*` is the HRNet (renamed by `_hrnet.hrnet_rules`), `backbone.1.*`
the fusion, which is part of our decoder. Per-task modules are keyed by task name on both sides;
only the grouped fusion convolution mixes the tasks, its input channels interleaved in their task
order (config.py `parse_task_dictionary`: semseg, depth, normals), which is permuted to ours.
Their loss weighting `uncertainty` keeps its log-variances under `criterion.`; they are no weights
of the network and are dropped. Keys that match no rule are an error naming them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, check_task_set, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused
from mtl_vision.importing.padnet import BOTTLENECK as _BOTTLENECK  # the same ResNet Bottleneck on both sides

__all__ = ["AUTHORS_TASK_ORDER", "to_ours"]

# config.py parse_task_dictionary appends the tasks in this order
AUTHORS_TASK_ORDER = ("semseg", "depth", "normals")
NETWORK = "model."  # MTR_Net.model
UNUSED = (re.compile(r"criterion\."),)  # losses/loss_weights.py Uncertainty.weights

_BLOCK = r"(conv[123]|bn[123]|downsample\.[01])\.(.*)"


def _authors_tasks(state: dict[str, Tensor]) -> list[str]:
    """Their task list (their order), read from the final heads' keys."""
    found = {k[len("heads.") :].split(".", 1)[0] for k in state if k.startswith("heads.")}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's task heads {sorted(found)} are not tasks of EMA-Net's code {list(AUTHORS_TASK_ORDER)}"
        )
    return [t for t in AUTHORS_TASK_ORDER if t in found]


def _rules() -> list[Rule]:
    """Renaming rules on their keys, `model.` included (so that an unknown key is named as in the file)."""
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"backbone\.1\.last_layer\.([01])\.(.*)", lambda m: f"decoder.fuse.fuse.{m[1]}.{m[2]}"),
        (
            rf"initial_task_prediction_heads\.layers\.(\w+)\.([01])\.{_BLOCK}",
            lambda m: f"decoder.initial.{m[1]}.{m[2]}.{_BOTTLENECK[m[3]]}.{m[4]}",
        ),
        (r"initial_task_prediction_heads\.conv_out\.(\w+)\.(.*)", lambda m: f"decoder.initial_heads.{m[1]}.{m[2]}"),
        (r"affinity_learning_module\.conv_in\.(\w+)\.(.*)", lambda m: f"decoder.conv_in.{m[1]}.{m[2]}"),
        (r"affinity_learning_module\.spatial_att\.projection\.(\w+)\.(.*)", lambda m: f"decoder.value.{m[1]}.{m[2]}"),
        (r"affinity_learning_module\.spatial_att\.fusion\.(weight|bias)", lambda m: f"decoder.fusion.conv.{m[1]}"),
        (
            r"affinity_learning_module\.conv_out\.(\w+)\.([013])\.(.*)",
            lambda m: f"decoder.conv_out.{m[1]}.{m[2]}.{m[3]}",
        ),
        (rf"heads\.(\w+)\.([01])\.{_BLOCK}", lambda m: f"decoder.heads.{m[1]}.{m[2]}.{_BOTTLENECK[m[3]]}.{m[4]}"),
        (r"heads\.(\w+)\.2\.(.*)", lambda m: f"decoder.heads.{m[1]}.2.{m[2]}"),
    ]
    prefix = re.escape(NETWORK)
    return [
        *hrnet_rules(theirs=f"{NETWORK}backbone.0.", ours="backbone.model."),
        *((re.compile(prefix + pattern), rename) for pattern, rename in rules),
    ]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Their `MTR_Net` state dict in the keys of our MultiTaskModel, for our task order `tasks`."""
    theirs = _authors_tasks({k[len(NETWORK) :]: v for k, v in state.items() if k.startswith(NETWORK)})
    named = check_task_set(theirs, tasks)
    out = rename_keys(state, _rules(), unused=[*UNUSED, *hrnet_unused(f"{NETWORK}backbone.0.")], what="EMA-Net")
    weight = out.get("decoder.fusion.conv.weight")
    if weight is not None and weight.shape[1] == len(theirs):
        # input channel t of each position's group is their t-th task: reorder to ours
        order = [named.index(t) for t in tasks]
        out["decoder.fusion.conv.weight"] = weight[:, order].contiguous()
    return out
