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
    return CTALDecoder(
        **backbone, task_channels=tasks, **{"channels": 16, "affinity_channels": 8, "grid": [16, 20], **kwargs}
    )


# ---------------------------------------------------------------- InvPT
# (equality with the authors' code: tests/test_reference_models.py)

VIT4 = {"in_channels": [8, 8, 8, 8], "strides": [16, 16, 16, 16]}


@pytest.mark.parametrize("backbone", [VIT, CNN], ids=["vit", "cnn"])
def test_invpt_attention_mixes_tasks(backbone):
    decoder = _invpt(backbone=backbone).eval()
    features = random_features(backbone, (128, 128))
    with torch.no_grad():
        before = decoder(features)
        # perturb only the depth task's preliminary feature map
        handle = decoder.preliminary_decoder["depth"].register_forward_hook(lambda m, i, out: out + 1.0)
        after = decoder(features)
        handle.remove()
    assert not torch.allclose(before["depth"], after["depth"])
    # every other task's final output changes too: only the attention connects the tasks
    for task in ("semseg", "normals"):
        assert not torch.allclose(before[task], after[task]), task
        torch.testing.assert_close(before["aux"]["preliminary"][task], after["aux"]["preliminary"][task])


def test_invpt_stages_follow_the_inverted_pyramid():
    decoder = _invpt(backbone=VIT4)
    seen = []
    hooks = [s.register_forward_hook(lambda m, i, out: seen.append([tuple(x.shape) for x in out[0]]))
             for s in decoder.invpt_stages]
    out = decoder(random_features(VIT4, (128, 192)))
    for h in hooks:
        h.remove()
    # stride 32, 16, 8; width 16 + 64 halved twice; one map per task
    assert seen == [[(2, 80, 4, 6)] * 3, [(2, 40, 8, 12)] * 3, [(2, 20, 16, 24)] * 3]
    assert out["semseg"].shape == (2, 5, 32, 48)
    assert out["aux"]["preliminary"]["semseg"].shape == (2, 5, 4, 6)
    # ViT: blocks of the third- and fourth-last level join the second and third stage, the
    # latter through a stride-2 transposed conv (stride 16 -> 8)
    assert decoder.skip_levels == [1, 0]
    assert isinstance(decoder.scale_embed["1"], torch.nn.Conv2d)
    assert isinstance(decoder.scale_embed["0"], torch.nn.ConvTranspose2d)


def test_invpt_keys_stay_on_one_grid_and_scores_pass_between_stages():
    decoder = _invpt(backbone=VIT4).eval()
    features = random_features(VIT4, (256, 256))  # stage grids 8x8, 16x16, 32x32
    scores = []
    hooks = [s.blocks[0].attn.register_forward_hook(lambda m, i, out: scores.append(tuple(out[1].shape)))
             for s in decoder.invpt_stages]
    with torch.no_grad():
        before = decoder(features)
    for h in hooks:
        h.remove()
    tasks = len(TASKS)
    # (N, heads, all tasks' queries at half the grid, all tasks' keys pooled by 2, 4, 8 to 4x4)
    assert scores == [(2, 2, tasks * 16, tasks * 16), (2, 2, tasks * 64, tasks * 16), (2, 2, tasks * 256, tasks * 16)]
    assert decoder.invpt_stages[0].blocks[0].attn.fuse_attn is None
    # the second stage's scores depend on the first stage's: cut the message, the output changes
    fuse = decoder.invpt_stages[1].blocks[0].attn.fuse_attn
    with torch.no_grad():
        fuse.weight[:, 2:] = 0
        after = decoder(features)
    assert not torch.allclose(before["semseg"], after["semseg"])


def test_invpt_checks_heads_against_the_widths():
    with pytest.raises(ValueError, match="num_heads"):
        _invpt(channels=16, extra_channels=8, num_heads=(2, 2, 4))  # stage widths 24, 12, 6
    with pytest.raises(ValueError, match="divisible"):
        _invpt(channels=16, extra_channels=2)  # 18 cannot be halved twice
    assert _invpt(channels=16, extra_channels=16).dims == [32, 16, 8]


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
    assert out["semseg"].shape == (2, 5, 32, 40)  # affinities on the fused stride-4 map, final at stride 2
    assert out["aux"]["initial"]["depth"].shape == (2, 1, 16, 20)
    assert sum(p.numel() for p in decoder.affinity.fusion.parameters()) == 16 * 20 * (len(TASKS) * 9 + 1)
    # the authors' full-width fusion of all four levels: 4 + 8 + 16 + 32 channels
    assert decoder.fuse.out_channels == 60 and decoder.levels == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="gamma"):
        _ctal(gamma=0.0)


def test_ctal_variants_stride_mean_propagation_and_projected_fuse():
    features = random_features(CNN, (64, 80))
    coarse = _ctal(stride=8, grid=[8, 10], fuse="project")
    out = coarse(features)
    assert out["semseg"].shape == (2, 5, 16, 20) and out["aux"]["initial"]["depth"].shape == (2, 1, 8, 10)
    # "mean" divides the propagated messages by the number of positions
    plain, mean = _ctal().eval(), _ctal(propagation="mean").eval()
    plain.record_intermediates = mean.record_intermediates = True
    with torch.no_grad():
        plain(features), mean(features)
    torch.testing.assert_close(mean.last_intermediates["fused_affinity"] * 320, plain.last_intermediates["fused_affinity"])
    for bad, match in (({"fuse": "dense"}, "fuse"), ({"propagation": "max"}, "propagation"), ({"grid": [0, 4]}, "grid")):
        with pytest.raises(ValueError, match=match):
            _ctal(**bad)


def test_ctal_propagation_mixes_tasks():
    decoder = _ctal().eval()
    features = random_features(CNN, (64, 80))
    with torch.no_grad():
        before = decoder(features)
        handle = decoder.affinity.conv_in["depth"].register_forward_hook(lambda m, i, out: out * 2.0 + 1.0)
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
