"""Every decoder in conf/decoder/, on a CNN and a transformer backbone: shapes, gradients,
single-batch overfitting, determinism; plus the shared decoder parts and the startup summary."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config_groups, decoder_overrides

from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.train import train
from mtl_vision.losses import MultiTaskLoss
from mtl_vision.models.decoders.common import ScalePyramid, select_levels
from mtl_vision.models.summary import model_summary
from mtl_vision.tasks import get_task

DECODERS = config_groups()["decoder"]
BACKBONES = ["test_resnet", "test_vit"]
TASKS = "[semseg,depth,normals,edge,saliency,human_parts]"
OVERFIT_TASKS = "[semseg,depth,edge]"  # one of each kind of loss; all six would multiply the cost

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(make_cfg, decoder: str, backbone: str, seed: int = 0, tasks: str = TASKS):
    extra = decoder_overrides(decoder, backbone)
    if extra is None:
        pytest.skip(f"{decoder} does not run on {backbone} (its backbone_kind)")
    cfg = make_cfg([f"decoder={decoder}", f"backbone={backbone}", f"data.tasks={tasks}", *extra])
    datamodule = build_datamodule(cfg)
    torch.manual_seed(seed)
    module = build_module(cfg, datamodule)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    return cfg, module, batch


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_outputs_every_task_and_aux_at_input_size(make_cfg, decoder, backbone):
    _, module, batch = _setup(make_cfg, decoder, backbone)
    image = batch["image"]
    out = module.model(image)
    for task in module.tasks:
        assert out[task].shape[0] == image.shape[0] and out[task].shape[-2:] == image.shape[-2:], task
        assert torch.isfinite(out[task]).all(), task
    assert out[module.tasks[0]].shape[1] == 6  # synthetic: 6 semantic classes
    decoder_module = module.model.decoder
    assert set(out.get("aux", {})) == set(decoder_module.aux_names)
    for name, maps in out.get("aux", {}).items():
        for task, pred in maps.items():
            assert pred.shape == out[task].shape, (name, task)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_gradients_reach_the_backbone(make_cfg, decoder, backbone):
    _, module, batch = _setup(make_cfg, decoder, backbone)
    losses = module.loss(module.model(batch["image"]), batch)
    sum(losses.values()).backward()
    backbone_grads = [p.grad for p in module.model.backbone.parameters() if p.requires_grad]
    assert backbone_grads and all(g is not None for g in backbone_grads)
    assert sum(float(g.abs().sum()) for g in backbone_grads) > 0
    unused = [n for n, p in module.model.decoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"decoder parameters without gradient (DDP would fail on them): {unused[:5]}"


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("decoder", DECODERS)
def test_overfits_one_batch(make_cfg, decoder, backbone):
    _, module, batch = _setup(make_cfg, decoder, backbone, tasks=OVERFIT_TASKS)
    optimizer = torch.optim.AdamW(module.parameters(), lr=5e-3)
    module.train()
    first = None
    for _ in range(50):
        losses = module.loss(module.model(batch["image"]), batch)
        total = sum(losses.values())
        first = float(total) if first is None else first
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
    with torch.no_grad():
        final = float(sum(module.loss(module.model(batch["image"]), batch).values()))
    assert final < 0.5 * first, f"{decoder}/{backbone}: loss {first:.3f} -> {final:.3f}"


@pytest.mark.parametrize("decoder", DECODERS)
def test_same_seed_same_outputs(make_cfg, decoder):
    backbone = next(b for b in BACKBONES if decoder_overrides(decoder, b) is not None)
    _, a, batch = _setup(make_cfg, decoder, backbone, seed=3)
    _, b, _ = _setup(make_cfg, decoder, backbone, seed=3)
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a.model(batch["image"]), b.model(batch["image"])
    for task in a.tasks:
        torch.testing.assert_close(out_a[task], out_b[task], rtol=0, atol=0)


def test_select_levels_and_pyramid():
    assert select_levels([2, 4, 8, 16, 32], min_stride=4) == [1, 2, 3, 4]
    assert select_levels([16, 16, 16], levels=[-1]) == [2]
    with pytest.raises(ValueError, match="levels"):
        select_levels([4, 8], levels=[3])
    # ViT-like input: every level at stride 16 -> maps at strides 4..32
    pyramid = ScalePyramid([8, 8, 8], [16, 16, 16], channels=4)
    maps = pyramid([torch.rand(1, 8, 4, 6) for _ in range(3)])
    assert [m.shape[-2:] for m in maps] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    # CNN input with matching strides: each output comes from its own level
    assert ScalePyramid([4, 8, 16, 32], [4, 8, 16, 32], channels=4).sources == [0, 1, 2, 3]


def test_aux_losses_are_added_to_their_task_with_their_weight():
    loss = MultiTaskLoss(tasks=["depth", "semseg"], aux_weight=0.5, aux_weights={"scale_1": 2.0})
    target = {"depth": torch.rand(2, 1, 8, 8) + 0.5, "semseg": torch.randint(0, 3, (2, 8, 8))}
    preds = {"depth": torch.rand(2, 1, 8, 8), "semseg": torch.randn(2, 3, 8, 8)}
    aux = {"initial": {"depth": torch.rand(2, 1, 8, 8)}, "scale_1": {"depth": torch.rand(2, 1, 8, 8)}}
    plain = loss(preds, target)
    with_aux = loss({**preds, "aux": aux}, target)
    depth_fn = get_task("depth").loss
    expected = plain["depth"] + 0.5 * depth_fn(aux["initial"]["depth"], target["depth"])
    expected = expected + 2.0 * depth_fn(aux["scale_1"]["depth"], target["depth"])
    torch.testing.assert_close(with_aux["depth"], expected)
    torch.testing.assert_close(with_aux["semseg"], plain["semseg"])
    assert set(loss.last_aux) == {"depth/initial", "depth/scale_1"}
    with pytest.raises(ValueError, match="not trained"):
        loss({**preds, "aux": {"initial": {"edge": torch.rand(2, 1, 8, 8)}}}, target)


def test_summary_counts_parameters_and_flops(make_cfg):
    cfg = make_cfg(["decoder=heads"])
    module = build_module(cfg, build_datamodule(cfg))
    summary = model_summary(module.model, (64, 80))
    assert summary["backbone/params"] == sum(p.numel() for p in module.model.backbone.parameters())
    assert summary["total/params"] == summary["backbone/params"] + summary["decoder/params"]
    assert summary["backbone/gflops"] > 0 and summary["decoder/gflops"] > 0
    # FLOPs of convolutions grow with the pixel count
    double = model_summary(module.model, (128, 160))
    assert double["total/gflops"] == pytest.approx(4 * summary["total/gflops"], rel=0.05)


@pytest.mark.parametrize("dataset", ["nyud", "pascal_context"])
@pytest.mark.parametrize("decoder", [d for d in DECODERS if d != "heads"])  # heads: test_real_data.py
def test_trains_on_the_real_dataset_layouts(make_cfg, tmp_path, decoder, dataset):
    from test_real_data import _fixture

    root = _fixture(tmp_path, "nyud_mt" if dataset == "nyud" else "pascal_mt")
    overrides = [f"data={dataset}", f"data.root={root}", f"decoder={decoder}", "data.crop_size=[48,64]"]
    if decoder_overrides(decoder, "test_resnet") is None:
        overrides += ["backbone=test_vit", *decoder_overrides(decoder, "test_vit", (48, 64))]
    else:
        overrides += decoder_overrides(decoder, "test_resnet")
    cfg = make_cfg([*overrides, "data.batch_size=2", "trainer.max_steps=2", "trainer.max_epochs=3"])
    value = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/semseg/mIoU"] == value
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2


def test_hrnet_heads_are_one_hrnet_segmentation_head_per_task():
    """decoder.head=hrnet (MTI-Net code base's baseline): per task, all levels upsampled bilinearly
    to the finest, concatenated, 1x1 conv + BN + ReLU at the full width, 1x1 prediction."""
    import torch.nn.functional as F

    from mtl_vision.models.decoders.heads import HeadsDecoder

    torch.manual_seed(0)
    widths, strides = [4, 8, 12, 16], [4, 8, 16, 32]
    decoder = HeadsDecoder(in_channels=widths, strides=strides, task_channels={"semseg": 5, "depth": 1}, head="hrnet")
    for m in decoder.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
    decoder.eval()
    maps = [torch.randn(2, c, 32 // s * 2, 32 // s * 2) for c, s in zip(widths, strides)]
    with torch.no_grad():
        out = decoder(maps)
    assert set(out) == {"semseg", "depth"} and decoder.output_stride == 4
    for task, n in (("semseg", 5), ("depth", 1)):
        fuse, predict = decoder.heads[task][0].fuse, decoder.heads[task][1]
        x = torch.cat([maps[0], *(F.interpolate(m, size=maps[0].shape[-2:], mode="bilinear") for m in maps[1:])], 1)
        conv, bn = fuse[0], fuse[1]
        y = F.relu(F.batch_norm(F.conv2d(x, conv.weight, conv.bias), bn.running_mean, bn.running_var, bn.weight, bn.bias))
        expected = F.conv2d(y, predict.weight, predict.bias)
        assert out[task].shape == (2, n, 16, 16)
        torch.testing.assert_close(out[task], expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in decoder.heads["depth"].parameters()) == 40 * 40 + 40 + 2 * 40 + 40 + 1
    with pytest.raises(ValueError, match="decoder.head"):
        HeadsDecoder(in_channels=widths, strides=strides, task_channels={"depth": 1}, head="aspp")
