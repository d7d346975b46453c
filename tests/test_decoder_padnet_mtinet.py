"""PAD-Net and MTI-Net decoders: what makes them PAD-Net and MTI-Net (cross-task distillation,
attention gates, coarse-to-fine feature propagation, deep supervision sets), on random features."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features

from mtl_vision.models.decoders.mtinet import FeaturePropagation, MTINetDecoder
from mtl_vision.models.decoders.padnet import MultiModalDistillation, PADNetDecoder

CNN = {"in_channels": [8, 12, 16, 24], "strides": [4, 8, 16, 32]}
VIT = {"in_channels": [16, 16], "strides": [16, 16]}
TASKS = {"semseg": 5, "depth": 1, "normals": 3}
SIZE = (32, 64)  # divisible by 32: every backbone gives the same map sizes

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(backbone: dict, seed: int = 0) -> list[torch.Tensor]:
    return random_features(backbone, SIZE, seed=seed)


def _total(out: dict) -> torch.Tensor:
    total = sum(v.square().mean() for k, v in out.items() if k != "aux")
    return total + sum(v.square().mean() for maps in out["aux"].values() for v in maps.values())


def _build(cls, tasks=TASKS, backbone=CNN, **kwargs):
    torch.manual_seed(0)
    return cls(**backbone, task_channels=tasks, channels=8, **kwargs).eval()


# ----------------------------------------------------------------------------- distillation


@pytest.mark.parametrize("gate", ["self", "source"])
def test_distillation_mixes_in_the_other_tasks_through_gates_in_0_1(gate):
    torch.manual_seed(0)
    module = MultiModalDistillation(["a", "b", "c"], channels=4, gate=gate)
    feats = {t: torch.randn(2, 4, 6, 5) for t in "abc"}
    out, gates = module(feats, return_gates=True)
    assert set(gates) == {"a", "b", "c"} and set(gates["a"]) == {"b", "c"}
    for receiver in gates.values():
        for g in receiver.values():
            assert g.shape == (2, 4, 6, 5) and bool((g > 0).all() and (g < 1).all())
    if gate == "self":  # PAD-Net: one map per receiver, computed from its own feature
        assert gates["a"]["b"] is gates["a"]["c"]
        changed_own = module({**feats, "a": feats["a"] + 1.0}, return_gates=True)[1]
        assert not torch.allclose(changed_own["a"]["b"], gates["a"]["b"])
    # another task's feature changes this task's output
    perturbed = module({**feats, "b": feats["b"] + torch.randn_like(feats["b"])})
    assert not torch.allclose(perturbed["a"], out["a"]) and not torch.allclose(perturbed["c"], out["c"])
    # the own feature is a residual: zero sources send zero messages
    zero = module({"a": feats["a"], "b": torch.zeros_like(feats["b"]), "c": torch.zeros_like(feats["c"])})
    torch.testing.assert_close(zero["a"], feats["a"])


def test_distillation_with_one_task_has_no_messages():
    module = MultiModalDistillation(["depth"], channels=4)
    assert not list(module.parameters())
    x = torch.randn(1, 4, 3, 3)
    out, gates = module({"depth": x}, return_gates=True)
    assert out["depth"] is x and gates == {}
    with pytest.raises(ValueError, match="gate"):
        MultiModalDistillation(["a", "b"], channels=4, gate="other")


def test_padnet_final_output_depends_on_the_other_tasks_intermediate_features():
    decoder = _build(PADNetDecoder)
    feats = _features(CNN)
    with torch.no_grad():
        base = decoder(feats)
        handle = decoder.initial["depth"].register_forward_hook(lambda m, i, o: o + 1.0)
        try:
            changed = decoder(feats)
        finally:
            handle.remove()
    # the initial (pre-distillation) semseg prediction does not see depth, the final one does
    torch.testing.assert_close(changed["aux"]["initial"]["semseg"], base["aux"]["initial"]["semseg"])
    assert not torch.allclose(changed["semseg"], base["semseg"])
    assert not torch.allclose(changed["normals"], base["normals"])


@pytest.mark.parametrize("backbone", [CNN, VIT], ids=["cnn", "vit"])
def test_padnet_shapes_aux_and_gradients(backbone):
    decoder = _build(PADNetDecoder, backbone=backbone).train()
    out = decoder(_features(backbone))
    assert PADNetDecoder.aux_names == ("initial",) and set(out["aux"]) == {"initial"}
    stride = decoder.output_stride
    for task, n in TASKS.items():
        assert out[task].shape == (2, n, SIZE[0] // stride, SIZE[1] // stride)
        assert out["aux"]["initial"][task].shape == out[task].shape
    _total(out).backward()
    assert not [n for n, p in decoder.named_parameters() if p.grad is None]


# ----------------------------------------------------------------------------- MTI-Net


@pytest.mark.parametrize("softmax", ["channel_groups", "tasks"])
def test_fpm_attention_is_a_softmax_and_reaches_every_task(softmax):
    torch.manual_seed(0)
    fpm = FeaturePropagation(["a", "b", "c"], channels=8, se_reduction=4, softmax=softmax).eval()
    feats = {t: torch.randn(2, 8, 4, 5) for t in "abc"}
    out, weights = fpm(feats, return_attention=True)
    assert weights.shape == (2, 24, 4, 5)  # one weight per channel of the concatenation
    # channel_groups: groups of T=3 consecutive channels sum to one; tasks: the 3 tasks of a channel
    groups = weights.unflatten(1, (8, 3)).sum(dim=2) if softmax == "channel_groups" else weights.unflatten(1, (3, 8)).sum(dim=1)
    torch.testing.assert_close(groups, torch.ones(2, 8, 4, 5))
    # the shared representation carries task b's feature into a and c
    changed = fpm({**feats, "b": feats["b"] + 1.0})
    assert not torch.allclose(changed["a"], out["a"]) and not torch.allclose(changed["c"], out["c"])
    single = FeaturePropagation(["a"], channels=8)
    assert single.attention is None
    assert single({"a": feats["a"]}, return_attention=True)[1] is None
    with pytest.raises(ValueError, match="fpm_softmax"):
        FeaturePropagation(["a", "b"], channels=8, softmax="other")


def test_fpm_channel_groups_is_the_code_bases_view_softmax():
    """MTI-Net's code: mask = softmax(logits.view(B, C // T, T, H, W), dim=2), applied to the
    concatenation viewed the same way: written out here by hand, channel by channel."""
    torch.manual_seed(0)
    fpm = FeaturePropagation(["a", "b"], channels=6, se_reduction=4).eval()
    feats = {t: torch.randn(1, 6, 3, 2) for t in "ab"}
    concat = torch.cat([feats["a"], feats["b"]], dim=1)
    logits = fpm.attention(concat)
    expected = torch.empty_like(concat)
    for g in range(6):  # group g: channels 2g and 2g+1 of the concatenation
        pair = logits[:, 2 * g : 2 * g + 2]
        expected[:, 2 * g : 2 * g + 2] = pair.exp() / pair.exp().sum(dim=1, keepdim=True)
    _, weights = fpm(feats, return_attention=True)
    torch.testing.assert_close(weights, expected)


def test_mtinet_propagates_coarse_information_to_finer_scales_only():
    decoder = _build(MTINetDecoder)
    maps = [pyramid(_features(CNN))[0] for pyramid in decoder.multiscale.pyramid]
    with torch.no_grad():
        base = decoder.decode(maps)
        coarse = decoder.decode([*maps[:3], maps[3] + torch.randn_like(maps[3])])
        fine = decoder.decode([maps[0] + torch.randn_like(maps[0]), *maps[1:]])
    # a change at stride 32 reaches every finer scale's initial predictions through the FPMs ...
    for name in ("scale_32", "scale_16", "scale_8", "scale_4"):
        assert not torch.allclose(coarse["aux"][name]["depth"], base["aux"][name]["depth"]), name
    # ... while the finest scale's input never flows back to coarser ones
    for name in ("scale_32", "scale_16", "scale_8"):
        torch.testing.assert_close(fine["aux"][name]["depth"], base["aux"][name]["depth"])
    assert not torch.allclose(fine["aux"]["scale_4"]["depth"], base["aux"]["scale_4"]["depth"])


def test_mtinet_final_output_depends_on_the_other_tasks_at_every_scale():
    decoder = _build(MTINetDecoder)
    feats = _features(CNN)
    with torch.no_grad():
        base = decoder(feats)
        for i in range(4):  # perturb depth's features after FPM, before distillation, at one scale
            refine = decoder.multiscale.initial[i].refine["depth"]
            handle = refine.register_forward_hook(lambda m, inp, o: o + 1.0)
            try:
                changed = decoder(feats)
            finally:
                handle.remove()
            assert not torch.allclose(changed["semseg"], base["semseg"]), i


@pytest.mark.parametrize("backbone", [CNN, VIT], ids=["cnn", "vit"])
def test_mtinet_aux_sets_shapes_and_gradients(backbone):
    decoder = _build(MTINetDecoder, backbone=backbone).train()
    out = decoder(_features(backbone))
    assert decoder.aux_names == ("scale_4", "scale_8", "scale_16", "scale_32") == MTINetDecoder.aux_names
    assert set(out["aux"]) == set(decoder.aux_names)
    assert decoder.widths == [8, 16, 32, 64]
    for stride in (4, 8, 16, 32):
        for task, n in TASKS.items():
            assert out["aux"][f"scale_{stride}"][task].shape == (2, n, SIZE[0] // stride, SIZE[1] // stride)
    for task, n in TASKS.items():
        assert out[task].shape == (2, n, SIZE[0] // 4, SIZE[1] // 4)
    _total(out).backward()
    assert not [n for n, p in decoder.named_parameters() if p.grad is None]


# ----------------------------------------------------------------------------- both


@pytest.mark.parametrize("cls", [PADNetDecoder, MTINetDecoder])
@pytest.mark.parametrize("gate", ["self", "source"])
def test_one_task_works_without_messages(cls, gate):
    decoder = _build(cls, tasks={"depth": 1}, gate=gate).train()
    distillers = [decoder.distill] if cls is PADNetDecoder else list(decoder.distill)
    assert all(not list(d.parameters()) for d in distillers)
    out = decoder(_features(CNN))
    assert set(out) == {"depth", "aux"} and set(out["aux"]) == set(decoder.aux_names)
    _total(out).backward()
    assert not [n for n, p in decoder.named_parameters() if p.grad is None]


def test_configuration_errors():
    with pytest.raises(ValueError, match="width_multipliers"):
        MTINetDecoder(**CNN, task_channels=TASKS, channels=4, width_multipliers=[1, 2])
    with pytest.raises(ValueError, match="scales"):
        MTINetDecoder(**CNN, task_channels=TASKS, channels=4, scales=[8, 4], width_multipliers=[1, 2])
    with pytest.raises(ValueError, match="task"):
        PADNetDecoder(**CNN, task_channels={}, channels=4)
    # other scale sets name their aux sets after their strides
    decoder = MTINetDecoder(**CNN, task_channels=TASKS, channels=4, scales=[8, 16], width_multipliers=[1, 2])
    assert decoder.aux_names == ("scale_8", "scale_16") and decoder.output_stride == 8


# ----------------------------------------------------------------------------- the code base's setting

HRNET = {"in_channels": [8, 16, 32, 64], "strides": [4, 8, 16, 32]}  # branches c, 2c, 4c, 8c


def test_padnet_fuses_hrnet_branches_at_their_summed_width_and_projects_a_vit():
    hrnet = _build(PADNetDecoder, backbone=HRNET)
    assert hrnet.fuse_mode == "hrnet" and hrnet.fuse.out_channels == 120 and hrnet.output_stride == 4
    # the first bottleneck narrows the fused map to `channels` through its 1x1 shortcut
    assert hrnet.initial["depth"][0].shortcut[0].in_channels == 120
    vit = _build(PADNetDecoder, backbone=VIT)
    assert vit.fuse_mode == "project" and vit.output_stride == 16
    projected = _build(PADNetDecoder, backbone=HRNET, fuse="project")
    assert projected.fuse_mode == "project"
    with pytest.raises(ValueError, match="decoder.fuse"):
        _build(PADNetDecoder, fuse="other")


def test_mtinet_reads_the_backbone_levels_when_they_have_the_scales_widths():
    direct = _build(MTINetDecoder, backbone=HRNET)  # channels=8: widths 8/16/32/64 = the branches
    assert direct.multiscale.pyramid is None and direct.multiscale.levels == [0, 1, 2, 3]
    feats = _features(HRNET)
    with torch.no_grad():
        torch.testing.assert_close(direct(feats)["depth"], direct.decode(feats)["depth"])
    assert _build(MTINetDecoder, backbone=HRNET, inputs="pyramid").multiscale.pyramid is not None
    assert _build(MTINetDecoder, backbone=CNN).multiscale.pyramid is not None  # widths differ: auto -> pyramid
    with pytest.raises(ValueError, match="decoder.inputs=levels"):
        _build(MTINetDecoder, backbone=CNN, inputs="levels")


@pytest.mark.parametrize("cls", [PADNetDecoder, MTINetDecoder])
def test_auxiliary_tasks_get_only_intermediate_predictions_and_still_send(cls):
    tasks = {"semseg": 5, "depth": 1, "normals": 3, "edge": 1}
    decoder = _build(cls, tasks=tasks, backbone=HRNET, auxiliary_tasks=["normals", "edge"])
    assert decoder.final_tasks == ["semseg", "depth"] and decoder.auxiliary_tasks == ["normals", "edge"]
    assert set(decoder.heads) == {"semseg", "depth"}
    feats = _features(HRNET)
    with torch.no_grad():
        out = decoder(feats)
        assert set(out) == {"semseg", "depth", "aux"}
        for maps in out["aux"].values():
            assert set(maps) == set(tasks)
        # an auxiliary task's features reach the final predictions through the distillation
        initial = decoder.initial["normals"] if cls is PADNetDecoder else decoder.multiscale.initial[0].refine["normals"]
        handle = initial.register_forward_hook(lambda m, i, o: o + 1.0)
        try:
            changed = decoder(feats)
        finally:
            handle.remove()
    assert not torch.allclose(changed["semseg"], out["semseg"])


@pytest.mark.parametrize("cls", [PADNetDecoder, MTINetDecoder])
def test_auxiliary_tasks_must_be_some_of_the_tasks(cls):
    with pytest.raises(ValueError, match=r"decoder\.auxiliary_tasks.*not among"):
        _build(cls, auxiliary_tasks=["saliency"])
    with pytest.raises(ValueError, match=r"decoder\.auxiliary_tasks.*every trained task"):
        _build(cls, auxiliary_tasks=list(TASKS))
