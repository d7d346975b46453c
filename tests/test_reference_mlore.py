"""decoder=mlore against the authors' MLoRE (fixtures of scripts/fixtures/mlore.py): their checkpoint
goes through mtl-import's conversion into the model our config builds, and every output, the
routing, the load-balancing loss and the re-parameterised inference form equal theirs to 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing import convert, load_exactly, read_state
from mtl_vision.importing.mlore import to_ours
from mtl_vision.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
DATASETS = ["nyud", "pascal"]

pytestmark = pytest.mark.usefixtures("one_thread")

# their utils.get_output of a prediction, from our activated one
AUTHORS_ENCODING = {
    "semseg": lambda p: p,
    "human_parts": lambda p: p,
    "depth": lambda p: p.clamp(min=0).permute(0, 2, 3, 1),  # their get_output clamps, our activation does not
    "normals": lambda p: ((p + 1) * 255 / 2).permute(0, 2, 3, 1),
    "edge": lambda p: 255 * p[:, 0],
    "saliency": lambda p: 255 * p[:, 0],
}


def assert_equal_to_reference(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to 1e-5 relative to the reference's largest magnitude (float32)."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, authors {tuple(theirs.shape)}"
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def reference(dataset: str, make_cfg) -> tuple[torch.nn.Module, dict]:
    """(our model filled from the fixture's checkpoint, in eval mode; the fixture's record)."""
    record = torch.load(FIXTURES / f"mlore_{dataset}.pt", map_location="cpu", weights_only=True)
    cfg = make_cfg(record["overrides"], tiny=False)
    facts = TaskFacts(
        tasks=list(record["tasks"]), task_channels=dict(record["task_channels"]), class_names={}, edge_tolerance=0.011
    )
    model = build_module(cfg, facts).model
    checkpoint = FIXTURES / f"mlore_{dataset}.pth"
    load_exactly(model, convert("mlore", read_state(checkpoint), tasks=facts.tasks), path=checkpoint, source="mlore")
    return model.eval(), record


@pytest.mark.parametrize("dataset", DATASETS)
def test_outputs_routing_and_balance_loss_equal_the_authors(dataset, make_cfg):
    model, record = reference(dataset, make_cfg)
    assert model.backbone.mean.flatten().tolist() == pytest.approx(record["mean"])
    assert model.backbone.std.flatten().tolist() == pytest.approx(record["std"])
    with torch.no_grad():
        out = model(record["image"])
    assert set(out) == set(record["outputs"]) and not record["aux"], "MLoRE has no intermediate predictions"
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{dataset} {task}")
    decoder = model.decoder
    for name, layers in record["routes"].items():
        for i, layer in enumerate(layers):
            for task, theirs in layer.items():
                assert_equal_to_reference(decoder.last_gates[name][i][task], theirs, f"{dataset} {name}[{i}] {task}")
    assert_equal_to_reference(decoder.last_balance_loss, record["balance_loss"], f"{dataset} load balancing")


@pytest.mark.parametrize("dataset", DATASETS)
def test_activated_predictions_equal_the_authors(dataset, make_cfg):
    model, record = reference(dataset, make_cfg)
    with torch.no_grad():
        out = model(record["image"])
    for task, theirs in record["activated"].items():
        ours = AUTHORS_ENCODING[task](get_task(task).activate(out[task]))
        if theirs.dtype.is_floating_point:
            assert_equal_to_reference(ours, theirs, f"{dataset} activated {task}")
        else:
            assert torch.equal(ours, theirs), f"{dataset} {task}: labels differ at {(ours != theirs).sum()} pixels"


@pytest.mark.parametrize("dataset", DATASETS)
def test_reparameterised_form_equals_the_training_form_and_theirs(dataset, make_cfg):
    model, record = reference(dataset, make_cfg)
    with torch.no_grad():
        features = model.encode(record["image"])
        trained = model.decoder(features)
        model.decoder.reparameterize()
        merged = model.decoder(features)
    for task, theirs in record["repara_outputs"].items():
        assert_equal_to_reference(merged[task], trained[task], f"{dataset} re-parameterised {task} vs ours")
        assert_equal_to_reference(merged[task], theirs, f"{dataset} re-parameterised {task} vs theirs")
    with pytest.raises(RuntimeError, match="inference only"):
        model.train()(record["image"])
    model.decoder.reparameterize(False)
    model(record["image"])  # back to the training form: trains again


def test_import_converts_pos_embed_and_drops_only_unused_weights():
    state = {
        "backbone.pos_embed": torch.arange(12.0).view(1, 4, 3),
        "backbone.norm.weight": torch.ones(3),
        "heads.sal.linear_pred.bias": torch.zeros(2),
        "backbone.MLoRE_2.1.router_1.sal.0.convsp.weight": torch.zeros(1, 3),
        "aux_heads.sal.linear_pred.bias": torch.zeros(2),
        "backbone.q_fuse.edge.weight": torch.zeros(1),
        "backbone.classify_route_2.weight": torch.zeros(1),
        "backbone.something_new.weight": torch.zeros(1),
    }
    ours = to_ours(state)
    assert torch.equal(ours["backbone.model.model.pos_embed"], state["backbone.pos_embed"][:, 1:])
    assert set(ours) == {
        "backbone.model.model.pos_embed",
        "backbone.model.model.norm.weight",
        "decoder.heads.saliency.pred.bias",
        "decoder.experts_2.1.routers.saliency.context.pool.weight",
        "backbone.something_new.weight",  # unknown: passed on for the strict check to name
    }
