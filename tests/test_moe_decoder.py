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


def _per_task_reference(model, image):
    """Today's computation, written out: one full backbone pass per task, the whole decoder run on each
    task's features and that task's output kept."""
    from mtl_vision.models.decoders.common import resize_to

    backbone = model.backbone
    x = (image - backbone.mean) / backbone.std
    out = {}
    for task in backbone.tasks:
        with task_scope(task):
            maps = backbone._features(x)
        out[task] = resize_to(model.decoder(maps)[task], image.shape[-2:])
    return out


@pytest.mark.parametrize(
    ("dispatch", "capacity", "head"),
    [("grouped", "1.25", "fuse"), ("fixed", "1.25", "fuse"), ("fixed", "0.5", "hrnet"), ("grouped", "null", "fuse")],
)
def test_one_stacked_backbone_pass_equals_per_task_passes(make_cfg, dispatch, capacity, head):
    """The stacked pass (blocks before the first MoE block once, then all tasks stacked in the batch, one
    dispatch per MoE layer) and a decoder computing only the asked task give the outputs, gradients,
    per-task balancing losses and expert statistics of one full pass per task."""
    _, module, batch = _build(
        make_cfg,
        [
            "backbone=test_vit",
            "backbone.moe_layers=[1,3]",
            "backbone.moe.num_experts=4",
            f"backbone.moe.capacity_factor={capacity}",
            "decoder=heads",
            f"decoder.head={head}",
        ],
    )
    model = module.model.train()
    layers = [m for m in model.modules() if isinstance(m, TaskMoEMlp)]
    torch.manual_seed(1)
    for layer in layers:  # distinct experts, so that routing (and capacity drops) matter
        layer.moe.reset_expert_parameters()
        layer.moe.dispatch = dispatch
    image = batch["image"]
    with torch.no_grad():
        weights = {t: torch.randn_like(p) for t, p in model(image).items()}
    calls = []
    first_block = transformer_blocks(model.backbone.model)[0]
    hook = first_block.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))

    def run(compute):
        model.zero_grad(set_to_none=True)
        for layer in layers:
            layer.reset_expert_stats()
        preds = compute()
        balance = [torch.stack(layer.moe._pending_losses).detach() for layer in layers]
        aux = sum(layer.pop_aux_loss() for layer in layers)
        (sum((preds[t] * weights[t]).mean() for t in weights) + aux).backward()  # a loss of the usual scale
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return preds, grads, balance, [layer.expert_stats() for layer in layers]

    got = run(lambda: model(image))
    assert calls == [image.shape[0]]  # the dense blocks before the first MoE block ran once, on the batch
    want = run(lambda: _per_task_reference(model, image))
    hook.remove()
    for task in module.tasks:
        torch.testing.assert_close(got[0][task], want[0][task], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(got[2], want[2], strict=True):  # one balancing loss per (layer, task), same values
        assert a.shape == (len(module.tasks),)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[3], want[3], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    if capacity == "0.5":
        assert any(s["dropped_share"] > 0 for s in got[3])  # the capacity limit did drop assignments


def test_per_task_passes_stay_reachable_and_moe_decoder_computes_one_task(make_cfg):
    _, module, batch = _build(make_cfg, ["backbone=test_vit", "backbone.moe_layers=[2]", "decoder=moe",
                                         "decoder.num_experts=4", "backbone.moe.num_experts=4"])
    model = module.model.eval()
    backbone = model.backbone
    x = (batch["image"] - backbone.mean) / backbone.std
    with torch.no_grad():
        stacked = backbone(x)
        backbone.task_passes = "per_task"
        per_task = backbone(x)
        for task in module.tasks:
            for a, b in zip(stacked[task], per_task[task], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            full = model.decoder(per_task[task])
            torch.testing.assert_close(model.decoder.forward_task(per_task[task], task)[task], full[task])
    with pytest.raises(ValueError, match="task_passes"):
        Backbone(name="test_vit", task_passes="twice")


def test_moe_decoder_stacked_tasks_equal_one_task_at_a_time():
    """The decoder's blocks on all tasks' maps stacked (one dispatch per layer) give each task's output,
    gradients and balancing losses of decoding that task alone."""
    torch.manual_seed(3)
    decoder = MoEDecoder(in_channels=[8, 16], strides=[4, 8], task_channels={"a": 3, "b": 1, "c": 2},
                         channels=16, num_experts=4, capacity_factor=0.5, mi_loss_weight=0.2).train()
    features = [torch.randn(2, 8, 12, 16), torch.randn(2, 16, 6, 8)]
    weights = {t: torch.randn(2, c, 12, 16) for t, c in {"a": 3, "b": 1, "c": 2}.items()}
    results = []
    for stacked in (True, False):
        decoder.zero_grad(set_to_none=True)
        out = decoder(features) if stacked else {t: decoder.forward_task(features, t)[t] for t in weights}
        balance = [torch.stack(b.moe._pending_losses).detach() for b in decoder.blocks]
        loss = sum((out[t] * weights[t]).mean() for t in weights) + decoder.pop_aux_loss()
        loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in decoder.named_parameters()}, balance))
    (out, grads, balance), (want_out, want_grads, want_balance) = results
    for t in weights:
        torch.testing.assert_close(out[t], want_out[t], rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for a, b in zip(balance, want_balance, strict=True):
        torch.testing.assert_close(a, b)
