"""TaskExpert decoder: softmax gates per pixel, the feature memory as an expert of the later stages,
expert-health statistics, one task and single-scale (ViT) inputs, on random features."""

from __future__ import annotations

import pytest
import torch
from conftest import random_features

from mtl_vision.models.decoders.taskexpert import TaskExpertDecoder

CNN = {"in_channels": [8, 12, 16, 24], "strides": [4, 8, 16, 32]}
VIT = {"in_channels": [16, 16, 16], "strides": [16, 16, 16]}
TASKS = {"semseg": 5, "depth": 1, "normals": 3}
SIZE = (32, 64)
NUM_EXPERTS = 3

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(backbone: dict, seed: int = 0) -> list[torch.Tensor]:
    return random_features(backbone, SIZE, seed=seed)


def _build(tasks=TASKS, backbone=CNN, **kwargs) -> TaskExpertDecoder:
    torch.manual_seed(0)
    return TaskExpertDecoder(**backbone, task_channels=tasks, channels=8, num_experts=NUM_EXPERTS, **kwargs).eval()


@pytest.mark.parametrize("backbone", [CNN, VIT], ids=["cnn", "vit"])
def test_gates_are_a_distribution_over_experts_per_pixel(backbone):
    decoder = _build(backbone=backbone)
    with torch.no_grad():
        out, gates = decoder(_features(backbone), return_gates=True)
    stride = decoder.output_stride
    assert stride == min(backbone["strides"])
    size = (SIZE[0] // stride, SIZE[1] // stride)
    assert len(gates) == len(backbone["strides"])
    for k, stage in enumerate(gates):
        for task, g in stage.items():
            # the memory joins the experts from the second stage on
            assert g.shape == (2, NUM_EXPERTS + (k > 0), *size), (k, task)
            assert (g >= 0).all()
            torch.testing.assert_close(g.sum(dim=1), torch.ones(2, *size))
    for task, n in TASKS.items():
        assert out[task].shape == (2, n, *size)


def test_working_stride_resamples_every_level():
    decoder = _build(stride=16)
    with torch.no_grad():
        out, gates = decoder(_features(CNN), return_gates=True)
    assert all(g.shape[-2:] == (2, 4) for stage in gates for g in stage.values())
    assert out["depth"].shape[-2:] == (2, 4)


def test_the_memory_is_an_expert_of_the_later_stages():
    decoder = _build()
    features = _features(CNN)
    with torch.no_grad():
        _, gates = decoder(features, return_gates=True)
    for stage in gates[1:]:
        for g in stage.values():
            assert float(g[:, -1].mean()) > 0  # the memory's share of the gates

    # Perturb the memory after the first stage and look at what the heads decode (the final
    # memory). If the later stages ignored the memory, the heads' input would move by exactly the
    # perturbation (the memory is a running sum); as they gate it in, it moves by more.
    head_inputs: dict[str, torch.Tensor] = {}
    hooks = [
        decoder.heads[t].register_forward_hook(lambda m, args, out, t=t: head_inputs.__setitem__(t, args[0]))
        for t in TASKS
    ]
    gen = torch.Generator().manual_seed(1)
    noise = {t: torch.rand(2, 8, 8, 16, generator=gen) for t in TASKS}
    with torch.no_grad():
        clean = decoder(features)
        clean_inputs = dict(head_inputs)
        perturbed = decoder(features, memory_noise=noise)
    for h in hooks:
        h.remove()
    for t in TASKS:
        assert not torch.allclose(clean[t], perturbed[t])
        moved = head_inputs[t] - clean_inputs[t]
        assert (moved - noise[t]).abs().max() > 1e-3, t
        # every later stage adds g_memory * memory: the shift exceeds the perturbation itself
        assert float(moved.sum()) > float(noise[t].sum())


def test_expert_stats_names_and_usage_sums_to_one():
    decoder = _build()
    assert decoder.expert_stats() == {}
    with torch.no_grad():
        decoder(_features(CNN))
        decoder(_features(CNN, seed=1))
    stats = decoder.expert_stats()
    names = [str(e) for e in range(NUM_EXPERTS)] + ["memory"]
    for task in TASKS:
        usage = [stats[f"usage/{task}/{name}"] for name in names]
        assert sum(usage) == pytest.approx(1.0)
        assert all(u > 0 for u in usage)
        assert 0 < stats[f"memory_usage/{task}"] < 1
        assert 0 < stats[f"gate_entropy/{task}"] <= torch.log(torch.tensor(NUM_EXPERTS + 1.0)).item()
        assert 0 <= stats[f"dead_share/{task}"] <= 1
    assert set(stats) == {
        f"{kind}/{task}" for kind in ("memory_usage", "gate_entropy", "dead_share") for task in TASKS
    } | {f"usage/{task}/{name}" for task in TASKS for name in names}
    # no gradient through the statistics, and a reset clears them
    assert not decoder._stat_gate.requires_grad
    decoder.reset_expert_stats()
    assert decoder.expert_stats() == {}


def test_one_task_and_one_stage():
    decoder = _build(tasks={"depth": 1})
    features = _features(CNN)
    decoder.train()
    out = decoder(features)
    assert set(out) == {"depth"} and out["depth"].shape == (2, 1, 8, 16)
    out["depth"].square().mean().backward()
    assert all(p.grad is not None for p in decoder.parameters())
    assert sum(decoder.expert_stats()[f"usage/depth/{n}"] for n in ("0", "1", "2", "memory")) == pytest.approx(1)

    # a single stage: no memory expert yet, the experts alone share the gates
    single = _build(tasks={"depth": 1}, levels=[-1])
    with torch.no_grad():
        out, gates = single(features, return_gates=True)
    assert out["depth"].shape == (2, 1, 1, 2) and gates[0]["depth"].shape[1] == NUM_EXPERTS
    stats = single.expert_stats()
    assert "memory_usage/depth" not in stats and "usage/depth/memory" not in stats
    assert sum(stats[f"usage/depth/{e}"] for e in range(NUM_EXPERTS)) == pytest.approx(1.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="task"):
        TaskExpertDecoder(**CNN, task_channels={}, channels=8)
    with pytest.raises(ValueError, match="num_experts"):
        TaskExpertDecoder(**CNN, task_channels=TASKS, channels=8, num_experts=0)
