"""Multi-scale EMA-Net (MEMANet) checkpoints of Armanfard-Lab/EMA-Net (models/m_emanet.py, the
model of their train.sh): what their utils.py `multitask_trainer` saves, `torch.save(model.state_dict())`
of the `MTR_Net` wrapper (models/wrappers.py), a bare state dict whose keys start with `model.`
(the network) or `criterion.` (the loss), into our HRNet `Backbone` + `decoder=memanet`
(`mtl_vision.models.decoders.memanet`, scales 4/8/16/32 read from the backbone's branches).

Their `model.backbone.*` is the bare HRNet (`_hrnet.hrnet_rules`; config.py `get_backbone` without
`fuse_hrnet`). The MTI-Net part has MTI-Net's names (`importing.mtinet`): `scale_<i>` (i = 0
finest) is our `decoder.initial.<i>`, `fpm_scale_<i>` our `decoder.fpm.scale_<4 * 2^i>`; each
task's `scale_fusion.<task>.last_layer` our `decoder.fuse.<task>` (HRNetFuse); the CTAL part
(`ctal.*`) has EMANet's names (`importing.ctal`) but `spatial_att.task_fusion` for the fusion, and
`heads.*` are EMANet's bottleneck heads. The `head: hrnet` heads that their get_model passes to
MEMANet are dropped by its constructor and never saved.

The FPM softmaxes over groups of consecutive channels of the tasks' concatenation, which mixes
neighbouring tasks: no permutation reproduces it in another order, so `data.tasks` must list the
tasks in their order (config.py `parse_task_dictionary`: semseg, depth, normals); the affinity
fusion then needs no permutation either. Their loss weighting `uncertainty` keeps its
log-variances under `criterion.`: no weights of the network, dropped. Weights come as saved
(float16 in the test fixtures) and are cast to float32. Keys that match no rule are an error
naming them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused
from mtl_vision.importing.ctal import AUTHORS_TASK_ORDER, NETWORK, UNUSED
from mtl_vision.importing.mtinet import STRIDES
from mtl_vision.importing.padnet import BASIC_BLOCK, BOTTLENECK, as_float32, block_rule

__all__ = ["authors_order", "to_ours"]

WHAT = "MEMANet (EMA-Net)"


def authors_order(state: dict[str, Tensor]) -> list[str]:
    """The checkpoint's tasks in their order, read from the final heads' keys."""
    prefix = f"{NETWORK}heads."
    found = {k[len(prefix):].split(".", 1)[0] for k in state if k.startswith(prefix)}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's task heads {sorted(found)} are not tasks of EMA-Net's code {list(AUTHORS_TASK_ORDER)}"
        )
    return [t for t in AUTHORS_TASK_ORDER if t in found]


def _rules() -> list[Rule]:
    """Renaming rules on their keys, `model.` included (so that an unknown key is named as in the file)."""

    def fpm(m: re.Match) -> str:
        return f"decoder.fpm.scale_{STRIDES[int(m['i'])]}"

    rules: list[Rule] = [
        block_rule(r"scale_(?P<i>\d)\.refinement\.(?P<t>\w+?)\.(?P<j>[01])",
                   lambda m: f"decoder.initial.{m['i']}.refine.{m['t']}.{m['j']}", BASIC_BLOCK),
        (re.compile(r"scale_(?P<i>\d)\.decoders\.(?P<t>\w+)\.(\w+)"),
         lambda m: f"decoder.initial.{m['i']}.predict.{m['t']}.{m[3]}"),
        block_rule(r"fpm_scale_(?P<i>\d)\.non_linear\.(?P<j>[01])", lambda m: f"{fpm(m)}.attention.{m['j']}",
                   BASIC_BLOCK),
        (re.compile(r"fpm_scale_(?P<i>\d)\.non_linear\.2\.(\w+)"), lambda m: f"{fpm(m)}.attention.2.{m[2]}"),
        block_rule(r"fpm_scale_(?P<i>\d)\.dimensionality_reduction", lambda m: f"{fpm(m)}.reduce", BASIC_BLOCK),
        (re.compile(r"fpm_scale_(?P<i>\d)\.se\.(?P<t>\w+)\.squeeze\.([02])\.(\w+)"),
         lambda m: f"{fpm(m)}.excite.{m['t']}.mlp.{m[3]}.{m[4]}"),
        (re.compile(r"scale_fusion\.(\w+)\.last_layer\.([01])\.(\w+)"), lambda m: f"decoder.fuse.{m[1]}.fuse.{m[2]}.{m[3]}"),
        (re.compile(r"ctal\.conv_in\.(\w+)\.(\w+)"), lambda m: f"decoder.conv_in.{m[1]}.{m[2]}"),
        (re.compile(r"ctal\.spatial_att\.projection\.(\w+)\.(\w+)"), lambda m: f"decoder.value.{m[1]}.{m[2]}"),
        (re.compile(r"ctal\.spatial_att\.task_fusion\.(weight|bias)"), lambda m: f"decoder.fusion.conv.{m[1]}"),
        (re.compile(r"ctal\.conv_out\.(\w+)\.([013])\.(\w+)"), lambda m: f"decoder.conv_out.{m[1]}.{m[2]}.{m[3]}"),
        block_rule(r"heads\.(?P<t>\w+?)\.(?P<i>[01])", lambda m: f"decoder.heads.{m['t']}.{m['i']}", BOTTLENECK),
        (re.compile(r"heads\.(\w+)\.2\.(\w+)"), lambda m: f"decoder.heads.{m[1]}.2.{m[2]}"),
    ]
    prefix = re.escape(NETWORK)
    return [
        *hrnet_rules(theirs=f"{NETWORK}backbone.", ours="backbone.model."),
        *((re.compile(prefix + pattern.pattern), rename) for pattern, rename in rules),
    ]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Their `MTR_Net` state dict in the keys of our MultiTaskModel.

    Raises:
        ValueError: when `tasks` (data.tasks) are not the checkpoint's tasks in their order, or a
            key belongs to no module of theirs.
    """
    theirs = authors_order(state)
    if list(tasks) != theirs:
        raise ValueError(
            f"data.tasks={list(tasks)}: MEMANet's feature propagation depends on the order of the tasks; "
            f"this checkpoint needs data.tasks={theirs} (their order)"
        )
    unused = [*UNUSED, *hrnet_unused(f"{NETWORK}backbone.")]
    return rename_keys(as_float32(state), _rules(), unused=unused, what=WHAT)
