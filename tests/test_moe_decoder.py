"""Task-routed MoE: the `moe` decoder and MoE layers inside a ViT backbone (`backbone.moe_layers`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra.errors import InstantiationException

from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.train import train
from mtl_vision.models.backbone import Backbone
from mtl_vision.models.decoders.moe import MoEDecoder
from mtl_vision.models.moe_backbone import TaskMoEMlp, apply_moe_layers, transformer_blocks
from mtl_vision.models.task_context import task_scope

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = "[semseg,depth,edge]"


def _build(make_cfg, overrides):
    cfg = make_cfg([f"data.tasks={TASKS}", *overrides])
    datamodule = build_datamodule(cfg)
    torch.manual_seed(0)
    module = build_module(cfg, datamodule)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return cfg, module, batch


def test_moe_decoder_shapes_aux_loss_and_stats(make_cfg):
    _, module, batch = _build(make_cfg, ["decoder=moe", "decoder.num_experts=4", "decoder.depth=2"])
    decoder = module.model.decoder
    assert isinstance(decoder, MoEDecoder) and decoder.aux_names == ()
    module.train()
    image = batch["image"]
    out = module.model(image)
    for task in module.tasks:
        assert out[task].shape[0] == image.shape[0] and out[task].shape[-2:] == image.shape[-2:]
        assert torch.isfinite(out[task]).all()
    aux = decoder.pop_aux_loss()
    assert aux is not None and aux.requires_grad and math.isfinite(float(aux.detach()))
    # one balancing loss per (layer, task), each >= 1 (1 = perfectly balanced)
    assert float(aux.detach()) >= 2 * len(module.tasks) - 1e-4
    assert decoder.pop_aux_loss() is None  # popped
    stats = decoder.expert_stats()
    for i in range(2):
        for task in module.tasks:
            usage = [stats[f"layer{i}/usage/{task}/{e}"] for e in range(4)]
            assert sum(usage) == pytest.approx(1.0)
            assert f"layer{i}/gate_entropy/{task}" in stats
        assert f"layer{i}/dead_share" in stats and f"layer{i}/dropped_share" in stats
    decoder.reset_expert_stats()
    assert decoder.expert_stats() == {}


def test_backbone_moe_layers_replace_blocks_and_make_features_task_specific(make_cfg):
    _, module, batch = _build(make_cfg, ["backbone=test_vit", "backbone.moe_layers=[1,3]", "decoder=heads"])
    backbone = module.model.backbone
    blocks = transformer_blocks(backbone.model)
    assert [i for i, b in enumerate(blocks) if isinstance(b.mlp, TaskMoEMlp)] == [1, 3]
    assert backbone.task_conditioned
    for i in (1, 3):
        assert blocks[i].mlp.moe.tasks == list(module.tasks)
    torch.manual_seed(1)
    for i in (1, 3):  # distinct experts, so that different routings give different features
        blocks[i].mlp.moe.reset_expert_parameters()
    with torch.no_grad():
        feats = backbone((batch["image"] - backbone.mean) / backbone.std)
    assert isinstance(feats, dict) and list(feats) == list(module.tasks)
    a, b = feats["semseg"], feats["depth"]
    assert len(a) == len(backbone.channels)
    assert all(x.shape == y.shape for x, y in zip(a, b))
    assert not torch.allclose(a[-1], b[-1])
    # the whole model decodes every task from its own features, and the MoE losses can be popped
    module.train()
    out = module.model(batch["image"])
    assert set(out) == set(module.tasks)
    losses = [m.pop_aux_loss() for m in module.model.modules() if isinstance(m, TaskMoEMlp)]
    assert len(losses) == 2 and all(x is not None and math.isfinite(float(x.detach())) for x in losses)
    assert "usage/depth/0" in blocks[1].mlp.expert_stats()


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_experts_reproduce_the_dense_block(top_k):
    torch.manual_seed(0)
    dense = Backbone(name="test_vit", model_kwargs={"dynamic_img_size": True}, tasks=["a", "b"])
    blocks = transformer_blocks(dense.model)
    image = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        tokens = torch.randn(2, 7, blocks[2].mlp.fc1.in_features)
        want_mlp = blocks[2].mlp(tokens)
        want = dense(image)
    # no capacity limit: every token keeps its experts, and identical experts with gates summing to 1
    # give exactly the dense MLP whatever the routing
    apply_moe_layers(dense, [2, -1], ["a", "b"], num_experts=4, top_k=top_k, capacity_factor=None)
    moe_mlp = blocks[2].mlp
    assert isinstance(moe_mlp, TaskMoEMlp) and isinstance(blocks[-1].mlp, TaskMoEMlp)
    with torch.no_grad():
        for task in ("a", "b"):
            with task_scope(task):
                torch.testing.assert_close(moe_mlp(tokens), want_mlp, rtol=1e-5, atol=1e-5)
        got = dense(image)
    for task in ("a", "b"):
        for x, y in zip(got[task], want):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_moe_layers_errors(make_cfg):
    cfg = make_cfg(["backbone=test_resnet", "+backbone.moe_layers=[1]"])
    # hydra wraps the constructor's ValueError, keeping its message
    with pytest.raises((ValueError, InstantiationException), match="test_resnet has no transformer blocks"):
        build_module(cfg, build_datamodule(cfg))
    with pytest.raises(ValueError, match="out of range"):
        Backbone(name="test_vit", tasks=["a"], moe_layers=[6])
    with pytest.raises(ValueError, match="tasks"):
        Backbone(name="test_vit", moe_layers=[0])


@pytest.mark.parametrize(
    "overrides",
    [
        [
            "backbone=test_vit",
            "backbone.moe_layers=[1]",
            "backbone.moe.num_experts=4",
            "decoder=heads",
        ],
        ["decoder=moe", "decoder.num_experts=4"],
    ],
    ids=["backbone_moe", "decoder_moe"],
)
def test_short_training_run_writes_metrics(make_cfg, tmp_path, overrides):
    cfg = make_cfg([*overrides, f"data.tasks={TASKS}", "trainer.max_steps=3", "trainer.max_epochs=3"])
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert any(k.startswith("val/semseg/") for k in metrics)
