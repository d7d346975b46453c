"""MTLoRA: low-rank adapters on a frozen transformer backbone (conf/peft). The authors' function
itself is proven in tests/test_reference_mtlora.py; here the structure, both pass modes, merging
and the config plumbing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from mtl_vision.cli import CONFIG_DIR
from mtl_vision.cli.train import train
from mtl_vision.models.backbone import Backbone
from mtl_vision.models.decoders.heads import HeadsDecoder
from mtl_vision.models.decoders.mtlora import MTLoRADecoder
from mtl_vision.models.model import MultiTaskModel
from mtl_vision.models.peft import (
    LoRALinear,
    MTLoRA,
    MTLoRALinear,
    NoPEFT,
    TaskLoRALinear,
    merge_adapters,
    transformer_blocks,
)
from mtl_vision.models.task_context import task_scope

pytestmark = pytest.mark.usefixtures("one_thread")

TASK_CHANNELS = {"semseg": 5, "depth": 1}
TASKS = list(TASK_CHANNELS)
# a small Swin (random weights): 4 stages of 1, 1, 2, 1 blocks
SWIN_KWARGS = {
    "dynamic_img_size": True,
    "embed_dim": 16,
    "depths": (1, 1, 2, 1),
    "num_heads": (1, 1, 2, 2),
    "window_size": 4,
}
PER_TASK = {"passes": "per_task", "train_original": ()}  # our per-task passes, adapters only


def _peft(option: str) -> str:
    """`peft=<option>` once conf/train.yaml has a `peft` default, `+peft=<option>` before."""
    defaults = OmegaConf.load(CONFIG_DIR / "train.yaml").get("defaults", [])
    has_default = any(isinstance(d, dict) and "peft" in d for d in OmegaConf.to_container(defaults))
    return f"{'' if has_default else '+'}peft={option}"


def _vit() -> Backbone:
    return Backbone(name="test_vit", model_kwargs={"dynamic_img_size": True}, tasks=TASKS)


def _swin() -> Backbone:
    return Backbone(name="swin_tiny_patch4_window7_224", model_kwargs=SWIN_KWARGS, tasks=TASKS)


def _model(backbone: Backbone, decoder: type = HeadsDecoder) -> MultiTaskModel:
    extra = {"channels": 8} if decoder is HeadsDecoder else {"channels": 4}
    decoder = decoder(in_channels=backbone.channels, strides=backbone.strides, task_channels=TASK_CHANNELS, **extra)
    return MultiTaskModel(backbone=backbone, decoder=decoder)


def _randomise_adapters(backbone: Backbone) -> None:
    """Non-zero B, as after training."""
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, (LoRALinear, MTLoRALinear)) and getattr(m, "lora_B", None) is not None:
                m.lora_B.normal_(0, 0.1)
            for name in ("task_B",):
                for b in getattr(m, name, {}).values() if isinstance(m, (TaskLoRALinear, MTLoRALinear)) else []:
                    b.normal_(0, 0.1)


def _expected_adapter_params(backbone: Backbone, peft: MTLoRA, task_blocks: set[int], *, shared_qkv: bool) -> int:
    """sum over wrapped linears of rank * (in + out): task-agnostic everywhere, + T task-specific
    (not on qkv when `shared_qkv`)."""
    total = 0
    for i, (_, block) in enumerate(transformer_blocks(backbone)):
        for target in peft.targets:
            parent = block.attn if target in ("qkv", "proj") else block.mlp
            linear = getattr(parent, target)
            size = linear.in_features + linear.out_features
            total += peft.rank_shared * size
            if i in task_blocks and not (shared_qkv and target == "qkv"):
                total += len(TASKS) * peft.rank_task * size
    return total


@pytest.mark.parametrize(
    ("make", "task_blocks"),
    [(_vit, {3, 4, 5}), (_swin, {0, 1, 3, 4})],  # ViT: blocks feeding out_indices; Swin: last block of each stage
    ids=["vit", "swin"],
)
@pytest.mark.parametrize("passes", ["shared", "per_task"])
def test_trainable_count_matches_formula(make, task_blocks, passes, caplog):
    backbone = make()
    total_before = sum(p.numel() for p in backbone.parameters())
    peft = MTLoRA(
        rank_shared=2, rank_task=3, task_scale=2 / 3 if passes == "per_task" else None, passes=passes, train_original=()
    )
    with caplog.at_level(logging.INFO, logger="mtl_vision.models.peft"):
        peft.apply(backbone, TASKS)
    assert "MTLoRA: trainable" in caplog.text
    kind = LoRALinear if passes == "per_task" else MTLoRALinear
    wrapped = [m for m in backbone.modules() if isinstance(m, kind)]
    assert len(wrapped) == 4 * len(transformer_blocks(backbone))
    specific = [i for i, (_, b) in enumerate(transformer_blocks(backbone)) if getattr(b.mlp.fc1, "tasks", None)]
    assert set(specific) == task_blocks
    expected = _expected_adapter_params(backbone, peft, task_blocks, shared_qkv=passes == "shared")
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == expected == sum(m.trainable for m in wrapped)
    assert sum(p.numel() for p in backbone.parameters()) == total_before + expected
    assert backbone.task_conditioned
    # the decoder stays fully trainable
    model = _model(backbone)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + decoder_params


def test_authors_trainable_originals_and_downsample_adapters():
    """Besides the adapters their main.py trains the patch embedding, norms, relative position
    biases and (without MTLoRA+) the patch-merging reductions."""
    plain = _swin()
    MTLoRA(rank_shared=2, rank_task=1).apply(plain, TASKS)
    trained = {
        n for n, p in plain.model.named_parameters() if p.requires_grad and "lora_" not in n and "task_" not in n
    }
    assert any("patch_embed" in n for n in trained) and any("relative_position_bias_table" in n for n in trained)
    assert any(n.endswith("downsample.reduction.weight") for n in trained)
    assert all(
        any(k in n for k in ("patch_embed", "norm", "relative_position", "downsample.reduction")) for n in trained
    )
    assert not any(".base." in n for n in trained)  # the adapted linears stay frozen
    plus = _swin()
    MTLoRA(rank_shared=2, rank_task=1, targets=["qkv", "proj", "fc1", "fc2", "downsample"]).apply(plus, TASKS)
    reductions = [m for n, m in plus.model.named_modules() if n.endswith("downsample.reduction")]
    assert len(reductions) == 3 and all(isinstance(m, MTLoRALinear) and not m.tasks for m in reductions)
    assert not any(p.requires_grad for m in reductions for p in m.base.parameters())
    with pytest.raises(ValueError, match="no Swin"):
        MTLoRA(targets=["qkv", "proj", "fc1", "fc2", "downsample"]).apply(_vit(), TASKS)


def test_list_and_none_task_specific_blocks():
    backbone = _vit()
    MTLoRA(task_specific_blocks=[0, -1], **PER_TASK).apply(backbone, TASKS)
    kinds = [isinstance(b.mlp.fc1, TaskLoRALinear) for _, b in transformer_blocks(backbone)]
    assert kinds == [True, False, False, False, False, True]
    plain = _vit()
    MTLoRA(task_specific_blocks="none", targets=["qkv"], **PER_TASK).apply(plain, TASKS)
    assert not plain.task_conditioned  # shared adapters only: one backbone pass for all tasks
    assert isinstance(plain(torch.rand(1, 3, 32, 32)), list)
    shared = _vit()
    MTLoRA(task_specific_blocks="none").apply(shared, TASKS)
    out = shared(torch.rand(1, 3, 32, 32))
    assert all(torch.equal(a, b) for a, b in zip(out["semseg"], out["depth"]))  # every task reads the shared path
    with pytest.raises(ValueError, match="out of range"):
        MTLoRA(task_specific_blocks=[6]).apply(_vit(), TASKS)
    with pytest.raises(ValueError, match="targets"):
        MTLoRA(targets=["fc3"])
    with pytest.raises(ValueError, match="proj, fc1 and fc2"):
        MTLoRA(targets=["qkv", "fc1", "fc2"]).apply(_vit(), TASKS)


@pytest.mark.parametrize("passes", ["shared", "per_task"])
def test_zero_init_keeps_original_features(passes):
    torch.manual_seed(0)
    backbone = _vit().eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        before = backbone(x)
    MTLoRA(passes=passes).apply(backbone, TASKS)
    with torch.no_grad():
        after = backbone(x)
    assert set(after) == set(TASKS)
    for task in TASKS:
        for a, b in zip(after[task], before, strict=True):
            torch.testing.assert_close(a, b)


def test_swin_levels_are_the_authors_stage_outputs():
    """At zero init the levels are timm's stages 1-3 after the next stage's patch merging, and the last stage."""
    torch.manual_seed(0)
    backbone = _swin().eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        timm_levels = backbone(x)
        stages = [m for n, m in backbone.model.named_children() if n.startswith("layers")]
        merged = [
            stages[i + 1].downsample(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for i, f in enumerate(timm_levels[:3])
        ]
    channels, strides = backbone.channels, backbone.strides
    MTLoRA().apply(backbone, TASKS)
    assert backbone.channels == [*channels[1:], channels[-1]] and backbone.strides == [*strides[1:], strides[-1]]
    with torch.no_grad():
        after = backbone(x)
    for a, b in zip(after["semseg"], [*merged, timm_levels[-1]], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_one_pass_every_block_once(make):
    """Shared passes: every block runs once per forward, whatever the number of tasks."""
    backbone = make()
    MTLoRA(rank_shared=2, rank_task=2).apply(backbone, TASKS)
    _randomise_adapters(backbone)
    calls = []
    for name, block in transformer_blocks(backbone):
        block.attn.qkv.register_forward_hook(lambda *_, name=name: calls.append(name))
    model = _model(backbone, MTLoRADecoder if make is _swin else HeadsDecoder).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64))
    assert sorted(calls) == sorted(n for n, _ in transformer_blocks(backbone))
    assert set(out) == set(TASKS)
    feats = backbone.eval()(torch.rand(1, 3, 64, 64))
    assert not torch.allclose(feats["semseg"][-1], feats["depth"][-1], atol=1e-6)


@pytest.mark.parametrize("mode", ["matrix", "matrixv2", "addition", "lora_only"])
def test_shared_modes(mode):
    torch.manual_seed(0)
    layer = MTLoRALinear(nn.Linear(6, 5), rank=2, scale=2.0, tasks=TASKS, task_rank=1, task_scale=3.0, shared_mode=mode)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    x, xt = torch.randn(4, 6), {t: torch.randn(4, 6) for t in TASKS}
    shared, tasks = layer.forward_tasks(x, xt)
    frozen = layer.base(x)
    if mode == "lora_only":
        assert tasks is None and not layer.tasks
        torch.testing.assert_close(shared, frozen + 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t())
        return
    delta = {t: 3.0 * xt[t] @ layer.task_A[t].t() @ layer.task_B[t].t() for t in TASKS}
    if mode == "addition":
        assert layer.lora_A is None
        torch.testing.assert_close(shared, frozen + layer.lora_norm(sum(frozen + d for d in delta.values())))
    else:
        update = 2.0 * x @ layer.lora_A.t() @ layer.lora_B.t()
        torch.testing.assert_close(shared, frozen + update)
        for t in TASKS:
            torch.testing.assert_close(tasks[t], frozen + delta[t] + (update if mode == "matrixv2" else 0))
    torch.testing.assert_close(layer(x), layer.forward_tasks(x)[0])  # no task inputs: the tasks read x


def test_only_adapters_change_and_task_features_diverge():
    torch.manual_seed(0)
    backbone = _vit()
    MTLoRA(train_original=()).apply(backbone, TASKS)
    model = _model(backbone)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen and adapters
    assert all("lora_" in n or "task_" in n for n in adapters)
    assert any(".norm" in n for n in frozen)  # norms are frozen too
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(3):
        loss = sum(o.square().mean() for o in model(x).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = dict(backbone.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    # every B moved away from zero (A gets no gradient while B is zero, it changes from step 2), but
    # the last block's shared fc2 update: only the task branches of that block are read, as in theirs
    dead = {"model.model.blocks.5.mlp.fc2.lora_A", "model.model.blocks.5.mlp.fc2.lora_B"}
    for n, before in adapters.items():
        assert torch.equal(params[n], before) == (n in dead), f"adapter {n}"
    with torch.no_grad():
        feats = backbone.eval()(torch.rand(1, 3, 32, 32))
    assert not torch.allclose(feats["semseg"][-1], feats["depth"][-1], atol=1e-6)


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_merge_matches_adapted(make):
    torch.manual_seed(0)
    backbone = make()
    MTLoRA(**PER_TASK).apply(backbone, TASKS)
    _randomise_adapters(backbone)
    backbone.eval()
    x = torch.rand(2, 3, 64, 64)
    layer = next(m for m in backbone.modules() if isinstance(m, TaskLoRALinear))
    inp = torch.randn(5, layer.in_features)
    with torch.no_grad():
        adapted = backbone(x)
        for task in TASKS:
            with task_scope(task):
                torch.testing.assert_close(layer.merge(task)(inp), layer(inp), atol=1e-5, rtol=1e-5)
            merged = merge_adapters(backbone, task)
            assert not any(isinstance(m, LoRALinear) for m in merged.modules())
            assert not merged.task_conditioned
            assert all(not p.requires_grad for p in merged.parameters())
            for a, b in zip(merged(x), adapted[task]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs the task"):
        layer.merge()
    shared = next(m for m in backbone.modules() if isinstance(m, LoRALinear) and not isinstance(m, TaskLoRALinear))
    inp = torch.randn(5, shared.in_features)
    with torch.no_grad():
        torch.testing.assert_close(shared.merge()(inp), shared(inp), atol=1e-5, rtol=1e-5)
    assert isinstance(shared.merge(), nn.Linear)


def test_merge_of_shared_passes():
    """Task-agnostic adapters fold into plain linears; a task's branch cannot, and says so."""
    torch.manual_seed(0)
    backbone = _swin()
    MTLoRA(task_specific_blocks="none", train_original=()).apply(backbone, TASKS)
    _randomise_adapters(backbone)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        adapted = backbone.eval()(x)
        merged = merge_adapters(backbone)
        assert not any(isinstance(m, MTLoRALinear) for m in merged.modules())
        for a, b in zip(merged(x)["semseg"], adapted["semseg"], strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    branched = _swin()
    MTLoRA().apply(branched, TASKS)
    with pytest.raises(ValueError, match="branch off the shared pass"):
        merge_adapters(branched)


def test_cnn_backbone_is_rejected():
    backbone = Backbone(name="test_resnet", tasks=TASKS)
    with pytest.raises(ValueError, match="test_resnet"):
        MTLoRA().apply(backbone, TASKS)


def test_configs_instantiate(make_cfg):
    cfg = make_cfg(["backbone=test_vit", _peft("mtlora")])
    peft = instantiate(cfg.peft)
    assert isinstance(peft, MTLoRA) and (peft.rank_shared, peft.rank_task, peft.shared_scale) == (16, 4, 4.0)
    plus = instantiate(make_cfg(["backbone=test_vit", _peft("mtlora_plus")]).peft)
    assert "downsample" in plus.targets and plus.rank_task is None
    none = instantiate(make_cfg([_peft("none")]).peft)
    assert isinstance(none, NoPEFT)
    backbone = _vit()
    n = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    none.apply(backbone, TASKS)
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == n


def test_train_end_to_end(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "backbone=test_vit",
            _peft("mtlora"),
            "peft.rank_shared=2",
            "peft.rank_task=1",
            "data.tasks=[semseg,depth]",
            "data.dataset.height=32",
            "data.dataset.width=32",
            "data.batch_size=2",
            "data.val_batch_size=2",
            "data.dataset.num_samples={train:6,val:2}",  # one epoch = 3 optimiser steps
            "trainer.max_steps=3",
            "trainer.max_epochs=1",
            "summary=false",
        ]
    )
    train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert "val/semseg/mIoU" in metrics
