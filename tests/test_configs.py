"""Every option of every config group composes and builds what it promises."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import config_groups, decoder_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_vision.cli.build import build_datamodule, build_module, build_trainer
from mtl_vision.models.backbone import FeatureBackbone

GROUPS = config_groups()
OPTIONS = [(group, option) for group, options in GROUPS.items() for option in options if group != "local"]


def test_the_groups_of_the_design_exist():
    for group in ["data", "backbone", "decoder", "balancer", "optim", "sched", "trainer", "logger", "callbacks", "paths", "hydra", "debug"]:
        assert group in GROUPS, f"conf/{group}/ is missing"
    for name in ["test_resnet", "test_vit", "resnet18", "resnet50", "convnext_tiny", "swin_tiny", "vit_small", "vit_base", "vit_large", "hrnet_w18"]:
        assert name in GROUPS["backbone"]
    assert {"cpu", "gpu", "ddp", "ddp_cpu"} <= set(GROUPS["trainer"])
    assert {"csv", "tensorboard", "wandb"} <= set(GROUPS["logger"])
    assert {"poly", "cosine"} <= set(GROUPS["sched"])
    assert {"ew", "fixed"} <= set(GROUPS["balancer"])


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_resolves(make_cfg, group, option):
    # experiments choose their own data and backbone, which the tiny synthetic overrides do not fit
    cfg = make_cfg([f"{group}={option}"], tiny=group != "experiment")
    # Every interpolation resolves (missing keys and bad references fail here).
    container = {key: OmegaConf.select(cfg, key) for key in cfg if key != "hydra"}
    container = {key: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for key, v in container.items()}
    node = container.get(group)
    if group in ("data", "backbone", "decoder", "balancer", "optim", "sched", "trainer"):
        assert "_target_" in node, f"conf/{group}/{option}.yaml has no _target_"
    if group in ("optim", "sched"):
        assert node.get("_partial_") is True


@pytest.mark.parametrize("option", [o for o in GROUPS["trainer"] if o not in ("gpu", "ddp")])
def test_cpu_trainers_instantiate(make_cfg, option):
    trainer = build_trainer(make_cfg([f"trainer={option}"]))
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("option", GROUPS["logger"])
def test_loggers_instantiate_offline(make_cfg, option, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg([f"logger={option}"])
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(isinstance(lg, L.pytorch.loggers.Logger) for lg in loggers)
    csv_loggers = [lg for lg in loggers if isinstance(lg, L.pytorch.loggers.CSVLogger)]
    assert csv_loggers, "CSV logging must stay on beside other loggers"


@pytest.mark.parametrize("option", GROUPS["backbone"])
def test_backbone_configs_build_nchw_features(make_cfg, option):
    backbone = instantiate(make_cfg([f"backbone={option}"]).backbone)
    assert isinstance(backbone, FeatureBackbone)
    assert len(backbone.channels) == len(backbone.strides) >= 1
    if option.startswith(("test_", "resnet18", "hrnet", "swin", "convnext")):
        x = torch.rand(1, 3, 64, 96)
        with torch.no_grad():
            feats = backbone(x)
        for f, c, s in zip(feats, backbone.channels, backbone.strides):
            assert f.shape == (1, c, 64 // s, 96 // s), (option, f.shape, c, s)


@pytest.mark.parametrize("group", ["decoder", "balancer", "optim", "sched"])
def test_module_builds_with_every_option(make_cfg, group):
    # Dataset configs on disk are built and trained on their fixtures in test_real_data.py.
    for option in GROUPS[group]:
        extra = (decoder_overrides(option, "test_resnet") if group == "decoder" else None) or []
        if group == "decoder" and decoder_overrides(option, "test_resnet") is None:
            extra = ["backbone=test_vit", *decoder_overrides(option, "test_vit")]
        cfg = make_cfg([f"{group}={option}", *extra])
        datamodule = build_datamodule(cfg)
        module = build_module(cfg, datamodule)
        assert module.tasks == list(cfg.data.tasks)
