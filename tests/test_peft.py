"""MTLoRA: low-rank adapters on a frozen transformer backbone (conf/peft)."""

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
from mtl_vision.models.model import MultiTaskModel
from mtl_vision.models.peft import (
    LoRALinear,
    MTLoRA,
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


def _peft(option: str) -> str:
    """`peft=<option>` once conf/train.yaml has a `peft` default, `+peft=<option>` before."""
    defaults = OmegaConf.load(CONFIG_DIR / "train.yaml").get("defaults", [])
    has_default = any(isinstance(d, dict) and "peft" in d for d in OmegaConf.to_container(defaults))
    return f"{'' if has_default else '+'}peft={option}"


def _vit() -> Backbone:
    return Backbone(name="test_vit", model_kwargs={"dynamic_img_size": True}, tasks=TASKS)


def _swin() -> Backbone:
    return Backbone(name="swin_tiny_patch4_window7_224", model_kwargs=SWIN_KWARGS, tasks=TASKS)


def _model(backbone: Backbone) -> MultiTaskModel:
    decoder = HeadsDecoder(
        in_channels=backbone.channels, strides=backbone.strides, task_channels=TASK_CHANNELS, channels=8
    )
    return MultiTaskModel(backbone=backbone, decoder=decoder)


def _expected_adapter_params(backbone: Backbone, peft: MTLoRA, task_blocks: set[int]) -> int:
    """sum over wrapped linears of rank * (in + out): task-agnostic everywhere, + T task-specific."""
    total = 0
    for i, (_, block) in enumerate(transformer_blocks(backbone)):
        for target in peft.targets:
            parent = block.attn if target in ("qkv", "proj") else block.mlp
            linear = getattr(parent, target)
            size = linear.in_features + linear.out_features
            total += peft.rank_shared * size
            if i in task_blocks:
                total += len(TASKS) * peft.rank_task * size
    return total


@pytest.mark.parametrize(
    ("make", "task_blocks"),
    [(_vit, {3, 4, 5}), (_swin, {0, 1, 3, 4})],  # ViT: blocks feeding out_indices; Swin: last block of each stage
    ids=["vit", "swin"],
)
def test_trainable_count_matches_formula(make, task_blocks, caplog):
    backbone = make()
    total_before = sum(p.numel() for p in backbone.parameters())
    peft = MTLoRA(rank_shared=2, rank_task=3)
    with caplog.at_level(logging.INFO, logger="mtl_vision.models.peft"):
        peft.apply(backbone, TASKS)
    assert "MTLoRA: trainable" in caplog.text
    wrapped = [m for m in backbone.modules() if isinstance(m, LoRALinear)]
    assert len(wrapped) == 4 * len(transformer_blocks(backbone))
    specific = [i for i, (_, b) in enumerate(transformer_blocks(backbone)) if isinstance(b.attn.qkv, TaskLoRALinear)]
    assert set(specific) == task_blocks
    expected = _expected_adapter_params(backbone, peft, task_blocks)
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == expected == sum(m.trainable for m in wrapped)
    assert sum(p.numel() for p in backbone.parameters()) == total_before + expected
    assert backbone.task_conditioned
    # the decoder stays fully trainable
    model = _model(backbone)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected + decoder_params


def test_list_and_none_task_specific_blocks():
    backbone = _vit()
    MTLoRA(task_specific_blocks=[0, -1]).apply(backbone, TASKS)
    kinds = [isinstance(b.mlp.fc1, TaskLoRALinear) for _, b in transformer_blocks(backbone)]
    assert kinds == [True, False, False, False, False, True]
    plain = _vit()
    MTLoRA(task_specific_blocks="none", targets=["qkv"]).apply(plain, TASKS)
    assert not plain.task_conditioned  # shared adapters only: one backbone pass for all tasks
    assert isinstance(plain(torch.rand(1, 3, 32, 32)), list)
    with pytest.raises(ValueError, match="out of range"):
        MTLoRA(task_specific_blocks=[6]).apply(_vit(), TASKS)
    with pytest.raises(ValueError, match="targets"):
        MTLoRA(targets=["fc3"])


def test_zero_init_keeps_original_features():
    torch.manual_seed(0)
    backbone = _vit().eval()
    x = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        before = backbone(x)
    MTLoRA().apply(backbone, TASKS)
    with torch.no_grad():
        after = backbone(x)
    assert set(after) == set(TASKS)
    for task in TASKS:
        for a, b in zip(after[task], before):
            torch.testing.assert_close(a, b)


def _train_steps(model: MultiTaskModel, steps: int = 3) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32)
    for _ in range(steps):
        out = model(x)
        loss = sum(o.square().mean() for o in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_only_adapters_change_and_task_features_diverge():
    torch.manual_seed(0)
    backbone = _vit()
    MTLoRA().apply(backbone, TASKS)
    model = _model(backbone)
    frozen = {n: p.detach().clone() for n, p in backbone.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in backbone.named_parameters() if p.requires_grad}
    assert frozen and adapters
    assert all("lora_" in n or "task_" in n for n in adapters)
    assert any(".norm" in n for n in frozen)  # norms are frozen too
    _train_steps(model)
    params = dict(backbone.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), f"frozen {n} changed"
    # every B moved away from zero (A gets no gradient while B is zero, it changes from step 2)
    for n, before in adapters.items():
        assert not torch.equal(params[n], before), f"adapter {n} did not change"
    with torch.no_grad():
        feats = backbone.eval()(torch.rand(1, 3, 32, 32))
    assert not torch.allclose(feats["semseg"][-1], feats["depth"][-1], atol=1e-6)


@pytest.mark.parametrize("make", [_vit, _swin], ids=["vit", "swin"])
def test_merge_matches_adapted(make):
    torch.manual_seed(0)
    backbone = make()
    MTLoRA().apply(backbone, TASKS)
    with torch.no_grad():  # non-zero B, as after training
        for m in backbone.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(0, 0.1)
                if isinstance(m, TaskLoRALinear):
                    for b in m.task_B.values():
                        b.normal_(0, 0.1)
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


def test_cnn_backbone_is_rejected():
    backbone = Backbone(name="test_resnet", tasks=TASKS)
    with pytest.raises(ValueError, match="test_resnet"):
        MTLoRA().apply(backbone, TASKS)


def test_configs_instantiate(make_cfg):
    cfg = make_cfg(["backbone=test_vit", _peft("mtlora")])
    peft = instantiate(cfg.peft)
    assert isinstance(peft, MTLoRA) and peft.rank_shared == 4 and peft.rank_task == 4
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
