"""decoder=hrnet_heads against the hard-sharing baseline of MTI-Net's code base
(SimonVandenhende/Multi-Task-Learning-PyTorch `model: baseline`, `head: hrnet`; fixtures of
scripts/fixtures/hps.py): their checkpoint goes through mtl-import's conversion into the model of
experiment=hps_nyud / hps_pascal, and the HRNet branches and every task's output equal theirs to
1e-5. The same network saved by EMA-Net's `hps` wrapper (keys under `model.`, loss weights under
`criterion.`) converts to the same weights."""

from __future__ import annotations

import pytest
import torch
from reference import (
    FIXTURES,
    MTL_PYTORCH_ENCODING,
    assert_activated_equal_to_reference,
    assert_equal_to_reference,
    image_of,
    load_reference,
)

from mtl_vision.importing import read_state
from mtl_vision.importing.hps import to_ours

NAMES = ["hps_nyud", "hps_pascal"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_outputs_equal_the_authors(name, make_cfg):
    record, model = load_reference(name, make_cfg)
    seen = {}
    model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("branches", o))
    with torch.no_grad():
        out = model(image_of(record))
    for i, (ours, theirs) in enumerate(zip(seen["branches"], record["branches"], strict=True)):
        assert_equal_to_reference(ours, theirs, f"{name} branch {i}")
    assert set(out) == set(record["outputs"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{name} {task}")
    assert_activated_equal_to_reference(out, record, name, MTL_PYTORCH_ENCODING)


def test_emanet_layout_converts_to_the_same_weights_and_unknown_keys_are_refused():
    state = read_state(FIXTURES / "hps_nyud.pth")
    tasks = ["semseg", "depth"]
    ours = to_ours(state, tasks=tasks)
    # EMA-Net's MTR_Net(tasks, HPS(...), criterion).state_dict(): the network under `model.`, with
    # `heads` for `decoders`, and its uncertainty weighting's log-variances
    emanet = {f"model.{k.replace('decoders.', 'heads.')}": v for k, v in state.items()}
    emanet["criterion.loss_weighting.weights.semseg"] = torch.zeros(())
    again = to_ours(emanet, tasks=tasks)
    assert sorted(again) == sorted(ours)
    assert all(torch.equal(again[k], ours[k]) for k in ours)
    with pytest.raises(ValueError, match="decoders.semseg.last_layer.2.weight"):
        to_ours({**state, "decoders.semseg.last_layer.2.weight": torch.zeros(1)}, tasks=tasks)
