"""decoder=mlore against the authors' MLoRE (fixtures of scripts/fixtures/mlore.py): their checkpoint
goes through mtl-import's conversion into the model our config builds, and every output, the
routing, the load-balancing loss and the re-parameterised inference form equal theirs to 1e-5."""

from __future__ import annotations

import pytest
import torch
from reference import assert_activated_equal_to_reference, assert_equal_to_reference, load_reference

from mtl_vision.importing.mlore import to_ours

DATASETS = ["nyud", "pascal", "pascal_vitb"]  # pascal_vitb: their ViT-B files (MLoRE_vitB.py, wrapper_vitb)

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(dataset: str, make_cfg) -> tuple[torch.nn.Module, dict]:
    """(our model filled from the fixture's checkpoint, in eval mode; the fixture's record)."""
    record, model = load_reference(f"mlore_{dataset}", make_cfg)
    return model, record


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
    assert_activated_equal_to_reference(out, record, f"{dataset}")


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
