"""decoder=padnet and decoder=mtinet against MTI-Net's code base (SimonVandenhende/Multi-Task-
Learning-PyTorch; fixtures of scripts/fixtures/padnet.py and mtinet.py): their checkpoint goes
through mtl-import's conversion into the model our experiment config builds, and every output
equals theirs to 1e-5: the final predictions, the intermediate (deep-supervision) predictions at
their resolution and at the input size (upsampled as their PADNetLoss / MTINetLoss do), the HRNet
branches, PAD-Net's fused map, MTI-Net's FPM outputs and the distilled features of every scale.

padnet_nyud runs the real HRNet-W18-small-v2 (at a per-task width of 32 instead of their 256); the
others the smaller HRNet of scripts/fixtures/mtl_pytorch.py (TINY_HRNET, timm's hrnet_w18_small
with other stage widths)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import (
    FIXTURES,
    MTL_PYTORCH_ENCODING,
    assert_activated_equal_to_reference,
    assert_equal_to_reference,
    image_of,
    load_reference,
)

from mtl_vision.importing import mtinet as mtinet_import
from mtl_vision.importing import padnet as padnet_import
from mtl_vision.importing import read_state

NAMES = ["padnet_nyud", "padnet_nyud_en", "padnet_pascal", "mtinet_nyud", "mtinet_nyud_en", "mtinet_pascal"]

pytestmark = pytest.mark.usefixtures("one_thread")

def _run(name: str, make_cfg) -> tuple[dict, dict, dict]:
    """(the fixture's record, our model's outputs at the input size, what our modules computed)."""
    record, model = load_reference(name, make_cfg)
    decoder = model.decoder
    seen: dict = {"propagated": {}, "distilled": {}}
    hooks = [
        model.backbone.register_forward_hook(lambda m, i, o: seen.__setitem__("branches", o)),
        decoder.register_forward_hook(lambda m, i, o: seen.__setitem__("decoder", o)),
    ]
    if name.startswith("padnet"):
        hooks.append(decoder.fuse.register_forward_hook(lambda m, i, o: seen.__setitem__("fused", o)))
        hooks.append(decoder.distill.register_forward_hook(lambda m, i, o: seen.__setitem__("distilled", o)))
    else:
        for key, fpm in decoder.multiscale.fpm.items():
            hooks.append(fpm.register_forward_hook(lambda m, i, o, key=key: seen["propagated"].__setitem__(key, o)))
        for stride, distill in zip(decoder.scales, decoder.distill):
            hooks.append(
                distill.register_forward_hook(lambda m, i, o, s=stride: seen["distilled"].__setitem__(f"scale_{s}", o))
            )
    with torch.no_grad():
        out = model(image_of(record))
    for hook in hooks:
        hook.remove()
    return record, out, seen


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_intermediates_equal_the_authors(name, make_cfg):
    record, out, seen = _run(name, make_cfg)
    size = record["image"].shape[-2:]
    assert set(out) - {"aux"} == set(record["final_tasks"]) == set(record["outputs"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{name} {task}")
    assert set(out["aux"]) == set(record["aux"])
    for aux_set, maps in record["aux"].items():
        assert set(out["aux"][aux_set]) == set(maps) == set(record["tasks"])
        for task, theirs in maps.items():
            what = f"{name} {aux_set} {task}"
            assert_equal_to_reference(seen["decoder"]["aux"][aux_set][task], theirs, what)
            # their loss upsamples the intermediate predictions so: F.interpolate(pred, img_size, mode='bilinear')
            upsampled = F.interpolate(theirs, size, mode="bilinear", align_corners=False)
            assert_equal_to_reference(out["aux"][aux_set][task], upsampled, f"{what} at the input size")
    assert len(seen["branches"]) == len(record["branches"]) == 4
    for i, (ours, theirs) in enumerate(zip(seen["branches"], record["branches"])):
        assert_equal_to_reference(ours, theirs, f"{name} HRNet branch {i}")
    if name.startswith("padnet"):
        assert_equal_to_reference(seen["fused"], record["fused"], f"{name} fused map")
        assert set(seen["distilled"]) == set(record["distilled"])
        for task, theirs in record["distilled"].items():
            assert_equal_to_reference(seen["distilled"][task], theirs, f"{name} distilled {task}")
    else:
        for group in ("propagated", "distilled"):
            assert set(seen[group]) == set(record[group])
            for scale, maps in record[group].items():
                assert set(seen[group][scale]) == set(maps)
                for task, theirs in maps.items():
                    assert_equal_to_reference(seen[group][scale][task], theirs, f"{name} {group} {scale} {task}")


@pytest.mark.parametrize("name", NAMES)
def test_activated_predictions_equal_the_authors(name, make_cfg):
    record, out, _ = _run(name, make_cfg)
    assert_activated_equal_to_reference(out, record, name, MTL_PYTORCH_ENCODING)


def test_fixtures_store_float16_weights_and_the_import_casts_them():
    state = read_state(FIXTURES / "mtinet_nyud.pth")
    floats = [v for v in state.values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    ours = mtinet_import.to_ours(state, tasks=["semseg", "depth"])
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())


def test_mtinet_import_needs_the_authors_task_order():
    state = read_state(FIXTURES / "mtinet_nyud_en.pth")
    assert mtinet_import.authors_order(state) == ["semseg", "normals", "edge", "depth"]
    with pytest.raises(ValueError, match=r"data\.tasks=\['semseg', 'normals', 'edge', 'depth'\]"):
        mtinet_import.to_ours(state, tasks=["semseg", "depth", "normals", "edge"])


def test_import_drops_only_the_hrnet_classification_head_and_names_unknown_keys():
    state = read_state(FIXTURES / "padnet_nyud_en.pth")
    tasks = ["semseg", "normals", "edge", "depth"]
    plain = padnet_import.to_ours(state, tasks=tasks)
    extra = {**state, "backbone.0.incre_modules.0.0.conv1.weight": torch.zeros(1),
             "backbone.0.classifier.weight": torch.zeros(1)}
    assert padnet_import.to_ours(extra, tasks=tasks).keys() == plain.keys()
    with pytest.raises(ValueError, match="backbone.0.something_new"):
        padnet_import.to_ours({**state, "backbone.0.something_new.weight": torch.zeros(1)}, tasks=tasks)
    # PAD-Net is indifferent to the order of the tasks; the senders of a receiver must be the others
    assert padnet_import.to_ours(state, tasks=["depth", "edge", "normals", "semseg"]).keys() == plain.keys()
    with pytest.raises(ValueError, match="senders"):
        padnet_import.to_ours(state, tasks=["semseg", "normals", "depth"])


def test_mtl_import_writes_a_checkpoint_with_the_authors_weights(make_cfg, tmp_path):
    from mtl_vision.cli.build import load_run
    from mtl_vision.data.nyud_fixture import write_nyud_fixture
    from mtl_vision.importing import import_checkpoint

    record = torch.load(FIXTURES / "mtinet_nyud_en.pt", map_location="cpu", weights_only=True)
    data = write_nyud_fixture(tmp_path / "NYUD_MT", layout="nyud_mt", n=2, height=32, width=64)
    cfg = make_cfg([*record["overrides"], f"data.root={data}", "data.num_workers=0"], tiny=False)
    out = import_checkpoint(cfg, source="mtinet", file=FIXTURES / "mtinet_nyud_en.pth", out=tmp_path / "mtinet.ckpt")
    _, facts, state = load_run(out)
    assert facts.tasks == ["semseg", "normals", "edge", "depth"]
    theirs = read_state(FIXTURES / "mtinet_nyud_en.pth")
    for ours_key, their_key in [
        ("model.backbone.model.stage4.1.fuse_layers.0.3.0.weight", "backbone.stage4.1.fuse_layers.0.3.0.weight"),
        ("model.decoder.multiscale.fpm.scale_32.excite.edge.mlp.2.bias", "fpm_scale_3.se.edge.squeeze.2.bias"),
        ("model.decoder.heads.depth.1.weight", "heads.depth.last_layer.3.weight"),
    ]:
        assert state[ours_key].dtype == torch.float32
        assert torch.equal(state[ours_key], theirs[their_key].float()), ours_key


def test_backbone_runs_hrnet_as_the_segmentation_hrnet():
    from mtl_vision.models.backbone import Backbone

    kwargs = {"name": "hrnet_w18_small", "out_indices": [1, 2, 3, 4], "model_kwargs": {"feature_location": ""}}
    backbone = Backbone(**kwargs, bn_momentum=0.01, upsample_mode="bilinear")
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    upsamples = [m for m in backbone.modules() if isinstance(m, torch.nn.Upsample)]
    assert norms and all(m.momentum == 0.01 for m in norms)
    assert upsamples and all(m.mode == "bilinear" and m.align_corners is False for m in upsamples)
    assert all(m.momentum == 0.1 for m in Backbone(**kwargs).modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="backbone.bn_momentum"):
        Backbone(**kwargs, bn_momentum=2.0)
    with pytest.raises(ValueError, match="backbone.upsample_mode"):
        Backbone(**kwargs, upsample_mode="area")
