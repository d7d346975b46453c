"""Backbone contract (NCHW, channels, strides, freezing, local weights) and the full model."""

from __future__ import annotations

import pytest
import timm
import torch

from mtl_vision.models.backbone import Backbone
from mtl_vision.models.decoders.heads import HeadsDecoder
from mtl_vision.models.model import MultiTaskModel

TASK_CHANNELS = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1}


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_convnext"])
def test_model_outputs_every_task_at_input_size(name):
    kwargs = {"dynamic_img_size": True} if "vit" in name else None
    backbone = Backbone(name=name, model_kwargs=kwargs)
    decoder = HeadsDecoder(in_channels=backbone.channels, strides=backbone.strides, task_channels=TASK_CHANNELS, channels=16)
    model = MultiTaskModel(backbone=backbone, decoder=decoder)
    out = model(torch.rand(2, 3, 64, 96))
    assert set(out) == set(TASK_CHANNELS)
    for task, c in TASK_CHANNELS.items():
        assert out[task].shape == (2, c, 64, 96)
    sum(o.mean() for o in out.values()).backward()
    assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad), "gradient must reach the backbone"


def test_swin_nhwc_outputs_become_nchw():
    backbone = Backbone(name="swin_tiny_patch4_window7_224", model_kwargs={"dynamic_img_size": True})
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == backbone.channels == [96, 192, 384, 768]
    assert [64 // f.shape[-1] for f in feats] == backbone.strides


def test_freeze_stages():
    backbone = Backbone(name="test_resnet", freeze_stages=2)
    frozen = {n for n, p in backbone.named_parameters() if not p.requires_grad}
    assert any("conv1" in n for n in frozen) and any("layer1" in n for n in frozen)
    assert not any("layer2" in n or "layer3" in n for n in frozen)
    assert all(not p.requires_grad for p in Backbone(name="test_resnet", freeze_stages=-1).parameters())
    with pytest.raises(ValueError, match="freeze_stages"):
        Backbone(name="test_resnet", freeze_stages=9)


def test_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    backbone = Backbone(name="test_resnet", checkpoint_path=str(path))
    loaded = dict(backbone.model.named_parameters())
    expected = dict(source.named_parameters())
    shared = [n for n in loaded if n in expected]
    assert len(shared) > 10 and "layer3.0.conv1.weight" in shared
    assert all(torch.equal(loaded[n], expected[n]) for n in shared)
    fresh = dict(Backbone(name="test_resnet").model.named_parameters())
    assert not torch.equal(fresh["layer3.0.conv1.weight"], expected["layer3.0.conv1.weight"])


def test_backbone_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_path"):
        Backbone(name="test_resnet", checkpoint_path=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a timm model"):
        Backbone(name="resnet_does_not_exist")


def test_model_normalises_with_the_backbone_statistics():
    backbone = Backbone(name="test_resnet")
    assert backbone.mean.flatten().tolist() == pytest.approx(list(timm.create_model("test_resnet").pretrained_cfg["mean"]))
    decoder = HeadsDecoder(in_channels=backbone.channels, strides=backbone.strides, task_channels={"depth": 1}, channels=8)
    model = MultiTaskModel(backbone=backbone, decoder=decoder).eval()
    image = torch.rand(1, 3, 32, 32)
    expected = decoder(backbone((image - backbone.mean) / backbone.std))["depth"]
    got = model(image)["depth"]
    assert torch.allclose(torch.nn.functional.interpolate(expected, size=(32, 32), mode="bilinear", align_corners=False), got)


def test_out_of_range_out_indices_are_reported():
    with pytest.raises(ValueError, match="out_indices"):
        Backbone(name="test_convnext", out_indices=[1, 2, 3, 4])


def test_auxiliary_tasks_on_a_task_conditioned_backbone(make_cfg):
    """decoder.auxiliary_tasks with one backbone pass per task (MoE layers): the auxiliary task has
    intermediate predictions and a loss, but no final map and no metric."""
    from mtl_vision.cli.build import build_datamodule, build_module

    cfg = make_cfg(
        [
            "backbone=test_vit",
            "backbone.moe_layers=[1]",
            "decoder=padnet",
            "decoder.auxiliary_tasks=[depth]",
            "data.tasks=[semseg,depth]",
        ]
    )
    module = build_module(cfg, build_datamodule(cfg))
    assert module.tasks == ["semseg", "depth"] and module.eval_tasks == ["semseg"]
    image = torch.rand(2, 3, 64, 80)
    out = module.model(image)
    assert "depth" not in out and out["semseg"].shape[-2:] == (64, 80)
    assert set(out["aux"]["initial"]) == {"semseg", "depth"}
    targets = {"semseg": torch.zeros(2, 64, 80, dtype=torch.long), "depth": torch.ones(2, 1, 64, 80)}
    losses = module.loss(out, targets)
    assert set(losses) == {"semseg", "depth"} and losses["depth"] > 0
