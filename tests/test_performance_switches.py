"""trainer.sync_batchnorm through timm's converter, channels_last and compile."""

from __future__ import annotations

import copy

import torch
from timm.layers import BatchNormAct2d
from timm.layers.norm_act import SyncBatchNormAct

from mtl_vision.cli.build import build_datamodule, build_module, build_trainer
from mtl_vision.cli.train import train


def _bn_act(model) -> list:
    return [m for m in model.modules() if isinstance(m, BatchNormAct2d | SyncBatchNormAct)]


def test_sync_batchnorm_keeps_the_activations_of_timm_layers(make_cfg):
    cfg = make_cfg(["backbone.name=test_efficientnet", "trainer.sync_batchnorm=true"])
    module = build_module(cfg, build_datamodule(cfg))
    before = _bn_act(module.model)
    assert before and any(not isinstance(m.act, torch.nn.Identity) for m in before)
    acts = [type(m.act) for m in before]

    # Lightning's converter (torch's) turns BatchNormAct2d into a plain SyncBatchNorm: the
    # activation is gone, which is what the guard is for
    lightning_way = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module.model))
    assert not _bn_act(lightning_way)

    image = torch.rand(2, 3, 64, 80)
    module.model.eval()
    with torch.no_grad():
        expected = module.model(image)
    trainer = build_trainer(cfg, module)
    assert trainer._accelerator_connector._layer_sync is None, "Lightning must not convert a second time"
    converted = _bn_act(module.model)
    assert all(isinstance(m, SyncBatchNormAct) for m in converted)
    assert [type(m.act) for m in converted] == acts
    assert not any(type(m) is torch.nn.BatchNorm2d for m in module.model.modules())
    module.model.eval()
    with torch.no_grad():  # without a process group SyncBatchNorm computes plain batch norm
        got = module.model(image)
    for task, value in expected.items():
        torch.testing.assert_close(got[task], value)


def test_channels_last_trains(make_cfg, tmp_path):
    cfg = make_cfg(["channels_last=true", "trainer.max_steps=2"])
    module = build_module(cfg, build_datamodule(cfg))
    build_trainer(cfg, module)
    convs = [m.weight for m in module.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert module.model.channels_last
    train(cfg)
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_compile_keeps_checkpoint_keys(make_cfg, tmp_path):
    # the eager backend exercises graph capture without needing a C++ compiler for inductor
    cfg = make_cfg(["compile=true", "compile_backend=eager", "trainer.max_steps=2", "data.tasks=[semseg,depth]"])
    module = build_module(cfg, build_datamodule(cfg))
    build_trainer(cfg, module)
    assert module.model.backbone._compiled_call_impl is not None
    assert module.model.decoder._compiled_call_impl is not None
    train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert not any("_orig_mod" in key for key in ckpt["state_dict"])
    uncompiled = build_module(make_cfg(["data.tasks=[semseg,depth]"]), build_datamodule(cfg))
    uncompiled.load_state_dict(ckpt["state_dict"])  # strict: the keys of the plain model
