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


def test_fpm_attention_is_a_softmax_over_tasks_and_reaches_every_task():
    torch.manual_seed(0)
    fpm = FeaturePropagation(["a", "b", "c"], channels=8, se_reduction=4).eval()
    feats = {t: torch.randn(2, 8, 4, 5) for t in "abc"}
    out, weights = fpm(feats, return_attention=True)
    assert weights.shape == (2, 3, 8, 4, 5)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 8, 4, 5))
    # the shared representation carries task b's feature into a and c
    changed = fpm({**feats, "b": feats["b"] + 1.0})
    assert not torch.allclose(changed["a"], out["a"]) and not torch.allclose(changed["c"], out["c"])
    single = FeaturePropagation(["a"], channels=8)
    assert single.attention is None
    assert single({"a": feats["a"]}, return_attention=True)[1] is None


def test_mtinet_propagates_coarse_information_to_finer_scales_only():
    decoder = _build(MTINetDecoder)
    maps = [pyramid(_features(CNN))[0] for pyramid in decoder.pyramid]
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
            refine = decoder.initial[i].refine["depth"]
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
