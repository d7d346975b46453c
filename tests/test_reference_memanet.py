"""decoder=memanet against the authors' multi-scale EMA-Net (MEMANet, fixture of
scripts/fixtures/memanet.py): their checkpoint goes through mtl-import's conversion into the model
our config builds, and the final predictions, the four scales' initial predictions, the HRNet
branches, every scale's task features, the FPM outputs, each task's fused map and affinity matrix,
the fused cross-task affinity and the propagated features equal theirs to 1e-5; so do their losses."""

from __future__ import annotations

import pytest
import torch
from reference import (
    FIXTURES,
    assert_activated_equal_to_reference,
    assert_equal_to_reference,
    image_of,
    load_reference,
)

from mtl_vision.importing import read_state
from mtl_vision.importing.memanet import to_ours

NAME = "memanet_nyud"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def reference(make_cfg) -> tuple[dict, torch.nn.Module, dict, list, dict]:
    """(record, our model, its outputs, backbone levels and decoder intermediates on the fixture image)."""
    record, model = load_reference(NAME, make_cfg)
    model.decoder.record_intermediates = True
    image = image_of(record)
    with torch.no_grad():
        out = model(image)
        levels = model.encode(image)
    return record, model, out, levels, model.decoder.last_intermediates


def _first(x):
    """The first image of every tensor in a nest of dicts (the fixture keeps one image's intermediates)."""
    return {k: _first(v) for k, v in x.items()} if isinstance(x, dict) else x[:1]


def test_outputs_and_initial_predictions_equal_the_authors(reference):
    record, model, out, _, _ = reference
    assert model.backbone.mean.flatten().tolist() == record["mean"]  # their images go in as they are
    assert model.backbone.std.flatten().tolist() == record["std"]
    assert model.decoder.affinity.gamma == pytest.approx(record["gamma"])
    assert model.decoder.multiscale.levels == [0, 1, 2, 3]  # the HRNet branches are the scales, no pyramid
    assert set(out) - {"aux"} == set(record["outputs"]) and set(out["aux"]) == set(record["aux"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"final {task}")
    for name, maps in record["aux"].items():
        for task, theirs in maps.items():
            # their MTINetLoss upsamples each scale's prediction to the image as our model does
            up = torch.nn.functional.interpolate(theirs, size=out[task].shape[-2:], mode="bilinear")
            assert_equal_to_reference(out["aux"][name][task], up, f"{name} {task}")


def test_intermediates_equal_the_authors(reference):
    record, _, _, levels, seen = reference
    theirs = record["intermediates"]
    for i, (ours, branch) in enumerate(zip(levels, theirs["branches"], strict=True)):
        assert_equal_to_reference(ours[:1], branch, f"HRNet branch {i}")
    for group in ("scale_features", "fpm"):
        assert set(seen[group]) == set(theirs[group]), group
        for scale, maps in theirs[group].items():
            for task, value in maps.items():
                assert_equal_to_reference(seen[group][scale][task][:1], value, f"{group} {scale} {task}")
    assert set(theirs["fpm"]) == {"scale_8", "scale_16", "scale_32"}  # every scale but the finest
    for key in ("fused", "affinities", "propagated"):
        for task, value in theirs[key].items():
            assert_equal_to_reference(_first(seen[key])[task], value, f"{key} {task}")
    assert_equal_to_reference(seen["fused_affinity"][:1], theirs["fused_affinity"], "fused affinity")


def test_activated_predictions_equal_the_authors(reference):
    record, _, out, _, _ = reference
    assert_activated_equal_to_reference(out, record, NAME)


def test_losses_equal_the_authors(reference):
    # their MTINetLoss + Scalarization: sum_t w_t (L_initial_t + L_final_t), L_initial_t the mean of
    # the four scales' losses (each prediction upsampled to the image first); ours: loss.aux_weight
    # 0.25 adds each scale's loss to its task's, the balancer weighs the tasks (memanet_nyud: ew);
    # normals: their 1 - mean cosine is loss.task_kwargs.normals.distance=cosine (memanet_nyud's)
    from mtl_vision.balancing import EqualWeighting, FixedWeighting
    from mtl_vision.losses import MultiTaskLoss

    record, _, out, _, _ = reference
    theirs = record["loss"]
    loss = MultiTaskLoss(tasks=record["tasks"], task_kwargs={"normals": {"distance": "cosine"}}, aux_weight=0.25)
    ours = loss(out, theirs["targets"])
    for task in record["tasks"]:
        initial = sum(loss.last_aux[f"{task}/{name}"] for name in record["aux"]) / 4
        assert_equal_to_reference(initial, theirs["initial"][task], f"initial {task}")
        assert_equal_to_reference(ours[task], theirs["initial"][task] + theirs["final"][task], f"{task}")
    assert set(theirs["weights"].values()) == {1.0}
    assert_equal_to_reference(FixedWeighting(tasks=record["tasks"], weights=theirs["weights"])(ours), theirs["total"], "total")
    assert_equal_to_reference(EqualWeighting(tasks=record["tasks"])(ours), theirs["total"], "total (ew)")


def test_import_is_strict_and_needs_their_task_order():
    state = read_state(FIXTURES / f"{NAME}.pth")
    assert all(k.startswith("model.") for k in state)  # MTR_Net.state_dict(), no wrapper dict
    tasks = ["semseg", "depth", "normals"]
    ours = to_ours(dict(state), tasks=tasks)
    assert all(v.dtype != torch.float16 for v in ours.values())  # their float16 tensors, cast
    # their Uncertainty loss weighting keeps log-variances beside the network: no weights of ours
    with_loss = {**state, "criterion.loss_weighting.weights.semseg": torch.zeros(())}
    assert set(to_ours(with_loss, tasks=tasks)) == set(ours)
    assert {
        "decoder.affinity.fusion.conv.weight",
        "decoder.fuse.depth.fuse.0.weight",
        "decoder.multiscale.fpm.scale_32.reduce.body.1.weight",
    } <= set(ours)
    assert any(k.startswith("backbone.model.stage4.") for k in ours)
    with pytest.raises(ValueError, match="model.something_new"):
        to_ours({**state, "model.something_new.weight": torch.zeros(1)}, tasks=tasks)
    with pytest.raises(ValueError, match="order of the tasks"):
        to_ours(dict(state), tasks=["depth", "semseg", "normals"])
    with pytest.raises(ValueError, match="order of the tasks"):
        to_ours(dict(state), tasks=["semseg", "depth"])


def test_configuration_errors_name_the_key_and_a_vit_gets_a_pyramid():
    from mtl_vision.models.decoders.memanet import MEMANetDecoder

    hrnet = {"in_channels": [4, 8, 12, 16], "strides": [4, 8, 16, 32]}
    tasks = {"semseg": 3, "depth": 1}
    kwargs = {"channels": 4, "width_multipliers": [1, 2, 3, 4], "affinity_channels": 8, "grid": [4, 4]}
    with pytest.raises(ValueError, match="decoder.gamma"):
        MEMANetDecoder(**hrnet, task_channels=tasks, **kwargs, gamma=0.0)
    with pytest.raises(ValueError, match="decoder.inputs=levels"):
        MEMANetDecoder(**hrnet, task_channels=tasks, **{**kwargs, "channels": 5}, inputs="levels")
    with pytest.raises(ValueError, match="decoder.width_multipliers"):
        MEMANetDecoder(**hrnet, task_channels=tasks, **{**kwargs, "width_multipliers": [1, 2]})
    # ViT-like levels (all at stride 16): the scales come from ScalePyramid; the fusion's weights
    # are resampled from the 4x4 grid to the 8x8 grid of a 32x32 input
    decoder = MEMANetDecoder(in_channels=[6, 6], strides=[16, 16], task_channels=tasks, **kwargs).eval()
    assert decoder.multiscale.levels is None and decoder.multiscale.pyramid is not None
    with torch.no_grad():
        out = decoder([torch.randn(2, 6, 2, 2), torch.randn(2, 6, 2, 2)])
    assert out["semseg"].shape == (2, 3, 16, 16) and out["depth"].shape == (2, 1, 16, 16)
    assert {name: out["aux"][name]["semseg"].shape[-1] for name in decoder.aux_names} == {
        "scale_4": 8, "scale_8": 4, "scale_16": 2, "scale_32": 1
    }
