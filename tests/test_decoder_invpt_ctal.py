"""What makes InvPT and CTAL what they are: cross-task attention over an inverted pyramid with
pooled keys (InvPT); task affinity matrices fused by a convolution grouped by position (CTAL)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import random_features

from mtl_vision.models.decoders.ctal import AffinityFusion, CTALDecoder, task_affinities
from mtl_vision.models.decoders.invpt import InvPTDecoder

TASKS = {"semseg": 5, "depth": 1, "normals": 3}
VIT = {"in_channels": [8, 8, 8], "strides": [16, 16, 16]}
CNN = {"in_channels": [4, 8, 16, 32], "strides": [4, 8, 16, 32]}

pytestmark = pytest.mark.usefixtures("one_thread")


def _invpt(tasks=TASKS, backbone=VIT, **kwargs) -> InvPTDecoder:
    torch.manual_seed(0)
    return InvPTDecoder(**backbone, task_channels=tasks, **{"channels": 16, **kwargs})


def _ctal(tasks=TASKS, backbone=CNN, **kwargs) -> CTALDecoder:
    torch.manual_seed(0)
    return CTALDecoder(**backbone, task_channels=tasks, **{"channels": 16, "grid": [8, 10], **kwargs})


# ---------------------------------------------------------------- InvPT


@pytest.mark.parametrize("backbone", [VIT, CNN], ids=["vit", "cnn"])
def test_invpt_attention_mixes_tasks(backbone):
    decoder = _invpt(backbone=backbone).eval()
    features = random_features(backbone, (64, 80))
    with torch.no_grad():
        before = decoder(features)
        # perturb only the depth task's preliminary feature map
        handle = decoder.preliminary["depth"].register_forward_hook(lambda m, i, out: out + 1.0)
        after = decoder(features)
        handle.remove()
    # depth's own output and preliminary prediction change...
    assert not torch.allclose(before["depth"], after["depth"])
    # ...and so does every other task's final output: only the attention connects the tasks
    for task in ("semseg", "normals"):
        assert not torch.allclose(before[task], after[task]), task
        torch.testing.assert_close(before["aux"]["preliminary"][task], after["aux"]["preliminary"][task])


def test_invpt_stages_follow_the_inverted_pyramid():
    decoder = _invpt()
    sizes, out_size = decoder.plan((64, 80))
    assert sizes == [(2, 3), (4, 5), (8, 10)] and out_size == (16, 20)
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, out: seen.append(tuple(out.shape))) for s in decoder.stages]
    out = decoder(random_features(VIT, (64, 80)))
    for h in hooks:
        h.remove()
    # (N, tasks, h, w, width): resolution doubles, width halves, stage after stage
    assert seen == [(2, 3, 2, 3, 16), (2, 3, 4, 5, 8), (2, 3, 8, 10, 4)]
    assert out["semseg"].shape == (2, 5, 16, 20)
    assert out["aux"]["preliminary"]["semseg"].shape == (2, 5, 2, 3)
    assert decoder.fuse_levels == [None, 1, 0]  # ViT: earlier blocks join the finer stages


@pytest.mark.parametrize(
    ("kv_strides", "keys_per_task"),
    [((2, 4, 8), [4, 4, 4]), ((1, 1, 1), [16, 64, 256]), ((1, 2, 4), [16, 16, 16])],
)
def test_invpt_key_value_pooling_sets_the_key_length(monkeypatch, kv_strides, keys_per_task):
    decoder = _invpt(kv_strides=kv_strides)
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, *args, **kwargs):
        calls.append((q.shape[-2], k.shape[-2]))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    decoder(random_features(VIT, size=(128, 128)))  # stages at 4x4, 8x8, 16x16
    n_tasks = len(TASKS)
    # queries at half the stage resolution (q_strides 2), keys pooled by kv_strides, all tasks in one sequence
    assert [q for q, _ in calls] == [n_tasks * 4, n_tasks * 16, n_tasks * 64]
    assert [k for _, k in calls] == [n_tasks * k for k in keys_per_task]


def test_invpt_checks_heads_against_the_widths():
    with pytest.raises(ValueError, match="num_heads"):
        _invpt(channels=24, num_heads=(2, 2, 4))  # stage widths 24, 12, 6
    with pytest.raises(ValueError, match="divisible"):
        _invpt(channels=18)  # cannot be halved twice
    assert _invpt(channels=16).dims == [16, 8, 4]


# ---------------------------------------------------------------- CTAL


def test_ctal_affinities_are_gram_matrices():
    torch.manual_seed(0)
    feats = [torch.randn(2, 6, 4, 5) for _ in range(3)]
    a = task_affinities(feats)
    assert a.shape == (2, 3, 20, 20)
    torch.testing.assert_close(a, a.transpose(-1, -2))
    torch.testing.assert_close(torch.diagonal(a, dim1=-2, dim2=-1), torch.ones(2, 3, 20))
    assert a.abs().max() <= 1 + 1e-5
    # entry (p, q) is the cosine similarity of positions p and q of that task
    f = feats[1][0].flatten(1)
    torch.testing.assert_close(a[0, 1, 3, 17], F.cosine_similarity(f[:, 3], f[:, 17], dim=0))


def test_ctal_fusion_is_grouped_by_position():
    tasks, grid, k = 3, (4, 5), 3
    fusion = AffinityFusion(tasks, grid, kernel_size=k)
    positions = grid[0] * grid[1]
    # one T x k x k kernel and one bias per position, instead of a dense (T*P) -> P convolution
    assert sum(p.numel() for p in fusion.parameters()) == positions * (tasks * k * k + 1)
    torch.manual_seed(0)
    affinities = torch.randn(2, tasks, positions, positions)
    fused = fusion(affinities, grid)
    assert fused.shape == (2, positions, positions)
    # row p fuses exactly the tasks' rows p (as maps over the key positions)
    p = 7
    rows = affinities[:, :, p].reshape(2, tasks, *grid)
    expected = F.conv2d(rows, fusion.conv.weight[p : p + 1], fusion.conv.bias[p : p + 1], padding=k // 2)
    torch.testing.assert_close(fused[:, p], expected.flatten(1))
    # changing another position's affinities leaves row p alone
    other = affinities.clone()
    other[:, :, p + 1] += 1.0
    torch.testing.assert_close(fusion(other, grid)[:, p], fused[:, p])


def test_ctal_fusion_resamples_its_weights_to_other_grids():
    fusion = AffinityFusion(2, (8, 10))
    weight, bias = fusion.weights_for((8, 10))
    assert weight is fusion.conv.weight and bias is fusion.conv.bias
    weight, bias = fusion.weights_for((4, 5))
    assert weight.shape == (20, 2, 3, 3) and bias.shape == (20,)
    fusion(torch.randn(1, 2, 20, 20), (4, 5)).sum().backward()
    # antialiased downsampling: every reference position's weights take part
    assert (fusion.conv.weight.grad.abs().flatten(1).sum(1) > 0).all()
    # a smooth weight field is kept by the resampling
    with torch.no_grad():
        fusion.conv.weight.fill_(0.5)
        fusion.conv.bias.fill_(-1.0)
    weight, bias = fusion.weights_for((5, 7))
    torch.testing.assert_close(weight, torch.full_like(weight, 0.5))
    torch.testing.assert_close(bias, torch.full_like(bias, -1.0))


def test_ctal_decoder_outputs_and_parameter_formula():
    decoder = _ctal()
    out = decoder(random_features(CNN, (64, 80)))
    assert out["semseg"].shape == (2, 5, 16, 20)  # stride 8 affinities, final at stride 4
    assert out["aux"]["initial"]["depth"].shape == (2, 1, 8, 10)
    assert sum(p.numel() for p in decoder.fusion.parameters()) == 8 * 10 * (len(TASKS) * 9 + 1)
    with pytest.raises(ValueError, match="gamma"):
        _ctal(gamma=0.0)


def test_ctal_propagation_mixes_tasks():
    decoder = _ctal().eval()
    features = random_features(CNN, (64, 80))
    with torch.no_grad():
        before = decoder(features)
        handle = decoder.conv_in["depth"].register_forward_hook(lambda m, i, out: out * 2.0 + 1.0)
        after = decoder(features)
        handle.remove()
    assert not torch.allclose(before["semseg"], after["semseg"])
    torch.testing.assert_close(before["aux"]["initial"]["semseg"], after["aux"]["initial"]["semseg"])


# ---------------------------------------------------------------- both


@pytest.mark.parametrize("build", [_invpt, _ctal], ids=["invpt", "ctal"])
@pytest.mark.parametrize("backbone", [VIT, CNN], ids=["vit", "cnn"])
def test_one_task_trains_every_parameter(build, backbone):
    decoder = build(tasks={"depth": 1}, backbone=backbone)
    out = decoder(random_features(backbone, (64, 80)))
    loss = out["depth"].mean() + sum(m.mean() for maps in out["aux"].values() for m in maps.values())
    loss.backward()
    assert set(out["aux"]) == set(decoder.aux_names)
    missing = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not missing, missing
