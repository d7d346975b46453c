"""Hard-parameter-sharing checkpoints of MTI-Net's code base and of EMA-Net's, into our HRNet
`Backbone` + `decoder=hrnet_heads` (one HRNet segmentation head per task).

* SimonVandenhende/Multi-Task-Learning-PyTorch (`model: baseline`, `head: hrnet`): `main.py`
  saves `model.state_dict()` of the DataParallel model, bare or under `'model'`; keys
  `backbone.<HRNet>` and `decoders.<task>.last_layer.{0,1,3}` (`module.` is stripped on reading);
* Armanfard-Lab/EMA-Net (`model: hps`, models/baseline.py `HPS`): `MTR_Net.state_dict()`, keys
  `model.backbone.<HRNet>` and `model.heads.<task>.last_layer.{0,1,3}`, beside the loss
  weighting's `criterion.*` (no weights of the network, dropped).

Their HighResolutionHead `last_layer` is conv (bias), BN, ReLU, conv: ours `heads.<task>.0.fuse.{0,1}`
(HRNetFuse) and `heads.<task>.1`. Heads are keyed by task name on both sides (`sal` = `saliency`).
Weights come as saved (float16 in the test fixtures) and are cast to float32.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import Tensor

from mtl_vision.importing._authors import Rule, rename_keys
from mtl_vision.importing._hrnet import hrnet_rules, hrnet_unused
from mtl_vision.importing.padnet import as_float32, ours

__all__ = ["UNUSED", "to_ours"]

UNUSED = (*hrnet_unused("backbone."), re.compile(r"criterion\."))
_LAST_LAYER = {"0": "0.fuse.0", "1": "0.fuse.1", "3": "1"}


def to_ours(state: dict[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """Either code base's baseline state dict (`module.` stripped) in the keys of our MultiTaskModel."""
    del tasks  # heads are keyed by name: nothing to reorder
    if any(k.startswith("model.") for k in state):  # EMA-Net's MTR_Net wrapper
        state = {k.removeprefix("model."): v for k, v in state.items()}
    rules: list[Rule] = [
        *hrnet_rules("backbone."),
        (
            re.compile(r"(?:decoders|heads)\.(?P<t>\w+?)\.last_layer\.(?P<i>[013])\.(?P<p>\w+)"),
            lambda m: f"decoder.heads.{ours(m['t'])}.{_LAST_LAYER[m['i']]}.{m['p']}",
        ),
    ]
    return rename_keys(as_float32(state), rules, unused=UNUSED, what="HRNet multi-task baseline (hps)")
