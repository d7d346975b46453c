"""Multi-scale EMA-Net (MEMANet) checkpoints of Armanfard-Lab/EMA-Net (models/m_emanet.py, the
model of their train.sh): what their utils.py `multitask_trainer` saves, `torch.save(model.state_dict())`
of the `MTR_Net` wrapper (models/wrappers.py), a bare state dict whose keys start with `model.`
(the network) or `criterion.` (the loss), into our HRNet `Backbone` + `decoder=memanet`
(`mtl_vision.models.decoders.memanet`, scales 4/8/16/32 read from the backbone's branches).

Their `model.backbone.*` is the bare HRNet (`_hrnet.hrnet_rules`; config.py `get_backbone` without
`fuse_hrnet`). The MTI-Net part has MTI-Net's names (`importing.mtinet.multiscale_rules`):
`scale_<i>` (i = 0 finest) is our `decoder.multiscale.initial.<i>`, `fpm_scale_<i>` our
`decoder.multiscale.fpm.scale_<4 * 2^i>`; each task's `scale_fusion.<task>.last_layer` our
`decoder.fuse.<task>` (HRNetFuse); the CTAL part (`ctal.*`, our `decoder.affinity`) has EMANet's
names (`importing.ctal.affinity_rules`) but `spatial_att.task_fusion` for the fusion, and
`heads.*` are EMANet's bottleneck heads (`importing.ctal.head_rules`). The `head: hrnet` heads that their get_model passes to
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
from mtl_vision.importing.ctal import NETWORK, UNUSED, affinity_rules, authors_tasks, head_rules
from mtl_vision.importing.mtinet import check_their_order, multiscale_rules
from mtl_vision.importing.padnet import as_float32

__all__ = ["to_ours"]

WHAT = "MEMANet (EMA-Net)"


def _rules() -> list[Rule]:
    """Renaming rules on their keys, `model.` included (so that an unknown key is named as in the file)."""
    p = re.escape(NETWORK)
    return [
        *hrnet_rules(theirs=f"{NETWORK}backbone.", ours="backbone.model."),
        *multiscale_rules(NETWORK),
        (re.compile(rf"{p}scale_fusion\.(\w+)\.last_layer\.([01])\.(\w+)"),
         lambda m: f"decoder.fuse.{m[1]}.fuse.{m[2]}.{m[3]}"),
        *affinity_rules(f"{NETWORK}ctal.", fusion="task_fusion"),
        *head_rules(NETWORK),
    ]


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Their `MTR_Net` state dict in the keys of our MultiTaskModel.

    Raises:
        ValueError: when `tasks` (data.tasks) are not the checkpoint's tasks in their order, or a
            key belongs to no module of theirs.
    """
    check_their_order(tasks, authors_tasks(state), "MEMANet")
    unused = [*UNUSED, *hrnet_unused(f"{NETWORK}backbone.")]
    return rename_keys(as_float32(state), _rules(), unused=unused, what=WHAT)
