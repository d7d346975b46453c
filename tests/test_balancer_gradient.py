"""Gradient balancers: hand-worked aggregations, and the task-gradient step against gradients
computed independently with torch.autograd and torchjd on a real tiny timm model."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import balancer_modes, config_groups
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchjd.aggregation import MGDA, GradDrop, NashMTL, PCGrad, UPGrad

from mtl_vision.balancing.gradient import GradientBalancer, gramian_stats, psd_root
from mtl_vision.cli import CONFIG_DIR
from mtl_vision.engine.task_gradients import TaskGradientStep
from mtl_vision.losses import MultiTaskLoss
from mtl_vision.models.backbone import Backbone
from mtl_vision.models.decoders.heads import HeadsDecoder
from mtl_vision.models.model import MultiTaskModel

TASKS = ["semseg", "depth", "edge"]
CHANNELS = {"semseg": 5, "depth": 1, "edge": 1}


def _balancer(aggregator, tasks=("semseg", "depth"), **kwargs) -> GradientBalancer:
    return GradientBalancer(tasks=list(tasks), aggregator=aggregator, **kwargs)


def test_pcgrad_projects_two_conflicting_gradients_exactly():
    # g1.g2 = -1 < 0: g1 -> g1 - (g1.g2/|g2|^2) g2 = (0.5, 0.5); g2 -> g2 - (g2.g1/|g1|^2) g1 = (0, 1)
    jacobian = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    vector, weights = _balancer(PCGrad()).aggregate(jacobian, jacobian @ jacobian.T)
    torch.testing.assert_close(vector, torch.tensor([0.5, 1.5]))
    # as weights of the original rows: 2 g1 + 1.5 g2 = (0.5, 1.5)
    torch.testing.assert_close(weights, torch.tensor([2.0, 1.5]))


def test_pcgrad_leaves_agreeing_gradients_alone():
    jacobian = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    vector, _ = _balancer(PCGrad()).aggregate(jacobian, jacobian @ jacobian.T)
    torch.testing.assert_close(vector, torch.tensor([2.0, 1.0]))


def test_mgda_finds_the_min_norm_point_of_the_convex_hull():
    # min over a in [0,1] of |a (2,0) + (1-a) (0,1)|^2 = 4a^2 + (1-a)^2  ->  a = 0.2, point (0.4, 0.8)
    jacobian = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    vector, weights = _balancer(MGDA(epsilon=1e-6, max_iters=1000)).aggregate(jacobian, jacobian @ jacobian.T)
    torch.testing.assert_close(weights, torch.tensor([0.2, 0.8]), atol=1e-3, rtol=0)
    torch.testing.assert_close(vector, torch.tensor([0.4, 0.8]), atol=2e-3, rtol=0)


def test_random_aggregators_are_seeded_by_step_and_leave_the_global_rng_alone():
    # three mutually conflicting gradients: PCGrad's result depends on its random task order
    jacobian = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.1], [-0.3, -0.9, 1.0]])
    gramian = jacobian @ jacobian.T
    tasks = ("semseg", "depth", "edge")
    a, b = _balancer(PCGrad(), tasks, seed=7), _balancer(PCGrad(), tasks, seed=7)
    state = torch.random.get_rng_state()
    results_a = []
    for _ in range(6):
        results_a.append(a.aggregate(jacobian, gramian)[0])
        assert torch.equal(results_a[-1], b.aggregate(jacobian, gramian)[0])
        a.after_step()
        b.after_step()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert any(not torch.allclose(results_a[0], r) for r in results_a[1:]), "the order never changed"


def test_gramian_weights_equal_full_matrix_weights_for_nash_mtl():
    torch.manual_seed(0)
    jacobian = torch.randn(3, 50)
    gramian = jacobian.double() @ jacobian.double().T
    root = psd_root(gramian)
    torch.testing.assert_close(root @ root.T, gramian)
    bal = _balancer(functools.partial(NashMTL, max_norm=0.0), ("semseg", "depth", "edge"))
    reference = NashMTL(n_tasks=3, max_norm=0.0)
    expected = reference.weighting(jacobian.double())
    torch.testing.assert_close(bal.weights_from_gramian(gramian), expected.float(), atol=1e-4, rtol=1e-4)


def test_gramian_stats_give_norms_and_cosines():
    jacobian = torch.tensor([[3.0, 4.0], [-4.0, 3.0], [-3.0, -4.0]])
    stats = gramian_stats(jacobian.double() @ jacobian.double().T, ["a", "b", "c"])
    assert stats["grad_norm/a"] == pytest.approx(5.0)
    assert stats["grad_cos/a-b"] == pytest.approx(0.0, abs=1e-12)
    assert stats["grad_cos/a-c"] == pytest.approx(-1.0)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="mode"):
        _balancer(PCGrad(), mode="layers")
    with pytest.raises(ValueError, match=r"shared must be \[backbone\]"):
        _balancer(PCGrad(), mode="features", shared=["backbone", "decoder"])
    with pytest.raises(TypeError, match="torchjd Aggregator"):
        _balancer(lambda: "pcgrad")
    model = _model()
    with pytest.raises(ValueError, match="encoder"):
        _balancer(PCGrad(), shared=["encoder"]).bind(model)


# -- the task-gradient step on a real model -----------------------------------------------------


def _model(seed: int = 0) -> MultiTaskModel:
    torch.manual_seed(seed)
    backbone = Backbone(name="test_resnet", pretrained=False)
    decoder = HeadsDecoder(in_channels=backbone.channels, strides=backbone.strides, task_channels=CHANNELS, channels=8)
    model = MultiTaskModel(backbone=backbone, decoder=decoder)
    model.train()
    for module in model.modules():  # batch statistics would make micro-batches differ from the batch
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()
    return model


def _batch(n: int = 4, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    h, w = 32, 40
    return {
        "image": torch.rand(n, 3, h, w, generator=g),
        "semseg": torch.randint(0, 5, (n, h, w), generator=g),
        "depth": torch.rand(n, 1, h, w, generator=g) + 0.5,
        "edge": (torch.rand(n, 1, h, w, generator=g) > 0.8).float(),
    }


def _losses(loss: MultiTaskLoss, batch: dict):
    return lambda preds: loss(preds, batch)


def _grads(model) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _independent_jacobian(model, losses, names):
    params = dict(model.named_parameters())
    rows = []
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], [params[n] for n in names], retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(params[n].numel()) if g is None else g.reshape(-1)
                    for n, g in zip(names, grads, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def test_params_mode_aggregates_shared_and_gives_task_parameters_their_own_gradient():
    model, batch = _model(), _batch()
    loss = MultiTaskLoss(tasks=TASKS)
    step = TaskGradientStep(model, _balancer(UPGrad(), TASKS), TASKS)
    step.micro_batch(batch["image"], _losses(loss, batch), lambda: None, scale=1.0, divide=1)
    finite, weights, stats = step.write_gradients(scale=1.0)
    assert finite and set(weights) == set(TASKS) and "grad_cos/semseg-depth" in stats
    got = _grads(model)

    reference = _model()
    losses = loss(reference(batch["image"]), batch)
    backbone = [n for n, p in reference.named_parameters() if n.startswith("backbone.")]
    jacobian = _independent_jacobian(reference, losses, backbone)
    expected = UPGrad()(jacobian)
    offset = 0
    for name in backbone:
        size = got[name].numel()
        torch.testing.assert_close(got[name].reshape(-1), expected[offset : offset + size], atol=1e-6, rtol=1e-5)
        offset += size
    # a task's head: the plain gradient of its own loss; the fusion shared by all heads but not
    # under `shared`: the plain gradient of the summed losses
    params = dict(reference.named_parameters())
    head = "decoder.heads.depth.1.weight"
    torch.testing.assert_close(got[head], torch.autograd.grad(losses["depth"], params[head], retain_graph=True)[0])
    fuse = "decoder.fuse.fuse.0.weight"
    torch.testing.assert_close(
        got[fuse], torch.autograd.grad(sum(losses.values()), params[fuse])[0], rtol=1e-5, atol=1e-7
    )


def test_params_mode_accumulation_equals_the_whole_batch():
    batch = _batch(4)
    halves = [{k: v[i::2] for k, v in batch.items()} for i in range(2)]
    loss = MultiTaskLoss(tasks=TASKS)

    whole = _model()
    step = TaskGradientStep(whole, _balancer(PCGrad(), TASKS), TASKS)
    step.micro_batch(batch["image"], _losses(loss, batch), lambda: None, scale=1.0, divide=1)
    step.write_gradients(scale=1.0)

    accumulated = _model()
    step = TaskGradientStep(accumulated, _balancer(PCGrad(), TASKS), TASKS)
    for half in halves:
        step.micro_batch(half["image"], _losses(loss, half), lambda: None, scale=1.0, divide=2)
    step.write_gradients(scale=1.0)
    for (name, a), b in zip(_grads(whole).items(), _grads(accumulated).values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4, msg=name)


def test_features_mode_backpropagates_the_aggregated_feature_gradient():
    model, batch = _model(), _batch()
    loss = MultiTaskLoss(tasks=TASKS)
    step = TaskGradientStep(model, _balancer(UPGrad(), TASKS, mode="features"), TASKS)
    step.micro_batch(batch["image"], _losses(loss, batch), lambda: None, scale=1.0, divide=1)
    assert step.write_gradients(scale=1.0)[0]
    got = _grads(model)

    reference = _model()
    features = reference.encode(batch["image"])
    detached = [f.detach().requires_grad_() for f in features]
    losses = loss(reference.decode(detached, tuple(batch["image"].shape[-2:])), batch)
    rows = []
    for task in TASKS:  # the stride-2 level feeds no head: its rows are zero
        grads = torch.autograd.grad(losses[task], detached, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([torch.zeros(f.numel()) if g is None else g.reshape(-1) for g, f in zip(grads, detached)])
        )
    vector = UPGrad()(torch.stack(rows))
    feature_grads = [
        v.view_as(f) for v, f in zip(torch.split(vector, [f.numel() for f in features]), features, strict=True)
    ]
    backbone = [(n, p) for n, p in reference.named_parameters() if n.startswith("backbone.")]
    expected = torch.autograd.grad(features, [p for _, p in backbone], feature_grads, allow_unused=True)
    for (name, _), grad in zip(backbone, expected, strict=True):
        if grad is not None:
            torch.testing.assert_close(got[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    params = dict(reference.named_parameters())
    head = "decoder.heads.semseg.1.weight"
    torch.testing.assert_close(got[head], torch.autograd.grad(losses["semseg"], params[head])[0])


def test_features_mode_batch_sum_gramian_weighs_the_per_sample_rows():
    """`gramian: batch_sum`: the weights are MGDA's on the Gramian of the feature gradients summed
    over the batch (LibMTL's rep_grad), and they combine the per-sample feature rows."""
    model, batch = _model(), _batch()
    loss = MultiTaskLoss(tasks=TASKS)
    balancer = _balancer(MGDA(), TASKS, mode="features", gramian="batch_sum")
    step = TaskGradientStep(model, balancer, TASKS)
    step.micro_batch(batch["image"], _losses(loss, batch), lambda: None, scale=1.0, divide=1)
    assert step.write_gradients(scale=1.0)[0]
    got_weights = torch.stack([balancer.last_weights[t] for t in TASKS])

    reference = _model()
    detached = [f.detach().requires_grad_() for f in reference.encode(batch["image"])]
    losses = loss(reference.decode(detached, tuple(batch["image"].shape[-2:])), batch)
    rows, sums = [], []
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], detached, retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(f) if g is None else g for g, f in zip(grads, detached, strict=True)]
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
        sums.append(torch.cat([g.sum(0).reshape(-1) for g in grads]))
    summed, jacobian = torch.stack(sums), torch.stack(rows)
    expected = MGDA().gramian_weighting((summed @ summed.T).double()).float()
    torch.testing.assert_close(got_weights, expected, rtol=1e-5, atol=1e-6)
    per_sample = MGDA().gramian_weighting((jacobian @ jacobian.T).double()).float()
    assert not torch.allclose(expected, per_sample, atol=1e-3)  # the two Gramians weigh differently here
    with pytest.raises(ValueError, match=r"balancer.gramian=batch_sum .* needs balancer.mode=features \(got 'params'"):
        _balancer(MGDA(), TASKS, mode="params", gramian="batch_sum")
    with pytest.raises(ValueError, match=r"GradDrop acts on the Jacobian's entries themselves"):
        _balancer(GradDrop(), TASKS, mode="features", gramian="batch_sum")
    with pytest.raises(ValueError, match=r"balancer.gramian must be one of \['per_sample', 'batch_sum'\], got 'mean'"):
        _balancer(MGDA(), TASKS, mode="features", gramian="mean")


def test_non_finite_losses_are_reported_not_aggregated():
    model, batch = _model(), _batch()
    batch["image"][0, 0, 0, 0] = float("nan")
    step = TaskGradientStep(model, _balancer(UPGrad(), TASKS), TASKS)
    step.micro_batch(batch["image"], _losses(MultiTaskLoss(tasks=TASKS), batch), lambda: None, scale=1.0, divide=1)
    finite, weights, _ = step.write_gradients(scale=1.0)
    assert not finite and weights == {}


def test_features_mode_refuses_task_conditioned_backbones():
    from mtl_vision.models.peft import MTLoRA

    backbone = Backbone(name="test_vit", pretrained=False, tasks=TASKS)
    MTLoRA().apply(backbone, TASKS)
    decoder = HeadsDecoder(in_channels=backbone.channels, strides=backbone.strides, task_channels=CHANNELS, channels=8)
    model = MultiTaskModel(backbone=backbone, decoder=decoder)
    with pytest.raises(ValueError, match="mode=params"):
        _balancer(UPGrad(), TASKS, mode="features").bind(model)


def test_features_mode_trains_the_decoder_modules_that_work_inside_the_encoder(make_cfg):
    """TaskPrompter's prompts join the ViT's attention: their only gradient comes through the
    features, so features-mode balancers count them as shared, as the backbone."""
    from conftest import decoder_overrides

    from mtl_vision.cli.build import TaskFacts, build_module

    overrides = ["decoder=taskprompter", "backbone=test_vit", *decoder_overrides("taskprompter", "test_vit", (32, 48))]
    cfg = make_cfg([*overrides, "data.tasks=[semseg,depth,edge]"])
    facts = TaskFacts(tasks=TASKS, task_channels=CHANNELS, class_names={}, edge_tolerance=0.011)
    model = build_module(cfg, facts).model.train()
    g = torch.Generator().manual_seed(1)
    batch = {
        "image": torch.rand(2, 3, 32, 48, generator=g),
        "semseg": torch.randint(0, 5, (2, 32, 48), generator=g),
        "depth": torch.rand(2, 1, 32, 48, generator=g) + 0.5,
        "edge": (torch.rand(2, 1, 32, 48, generator=g) > 0.8).float(),
    }
    step = TaskGradientStep(model, _balancer(UPGrad(), TASKS, mode="features"), TASKS)
    step.micro_batch(batch["image"], _losses(MultiTaskLoss(tasks=TASKS), batch), lambda: None, scale=1.0, divide=1)
    assert step.write_gradients(scale=1.0)[0]
    prompts = dict(model.named_parameters())["decoder.prompter.prompts.semseg"]
    assert prompts.grad is not None and prompts.grad.abs().sum() > 0
    assert "decoder.prompter.prompts.semseg" in [step.names[i] for i in step.shared_idx]


# -- mixed precision: the aggregation is float32 whatever the autocast ------------------------------

AMP_SCALE = 65536.0  # GradScaler's initial scale
GRADIENT_BALANCERS = [
    name
    for name in config_groups()["balancer"]
    if "mtl_vision.balancing.gradient.GradientBalancer" in (CONFIG_DIR / "balancer" / f"{name}.yaml").read_text()
]


@functools.cache
def _amp_batch() -> dict:
    """Depth targets around the initial predictions, as after a few steps of training: with all
    residuals of one sign the depth bias gradient is exactly the scale, 65536 > fp16's 65504, and
    GradScaler skips the step (equal weighting's as well)."""
    batch = _batch(n=2, seed=3)
    with torch.no_grad():
        depth = _model()(batch["image"])["depth"]
    g = torch.Generator().manual_seed(4)
    batch["depth"] = (depth + 0.1 * torch.randn(depth.shape, generator=g)).abs() + 1e-3
    return batch


def _flat_grads(model, scale: float) -> torch.Tensor:
    """The backbone's gradient (the aggregated part), unscaled in float32 as GradScaler.unscale_ does."""
    return torch.cat([
        torch.zeros(p.numel()) if p.grad is None else (p.grad.float() / scale).reshape(-1)
        for p in model.backbone.parameters()
    ])  # fmt: skip


def _ew_updates(batch, dtype) -> torch.Tensor:
    """Equal weighting's backbone gradients under a precision: rows = each task alone, last = all."""
    scale = AMP_SCALE if dtype == torch.float16 else 1.0
    out = []
    for weights in [[float(i == k) for i in range(len(TASKS))] for k in range(len(TASKS))] + [[1.0] * len(TASKS)]:
        model, loss = _model(), MultiTaskLoss(tasks=TASKS)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            losses = loss(model(batch["image"]), batch)
            (sum(w * losses[t] for w, t in zip(weights, TASKS, strict=True)) * scale).backward()
        update = _flat_grads(model, scale)
        assert torch.isfinite(update).all(), "equal weighting's fp16 step overflows: GradScaler would skip it"
        out.append(update)
    return torch.stack(out)


def _strategy_update(make_balancer, batch, dtype) -> torch.Tensor:
    model, loss = _model(), MultiTaskLoss(tasks=TASKS)
    balancer = make_balancer()
    balancer.bind(model)
    step = TaskGradientStep(model, balancer, TASKS)
    scale = AMP_SCALE if dtype == torch.float16 else 1.0
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):  # as in training_step
        step.micro_batch(batch["image"], _losses(loss, batch), lambda: None, scale=scale, divide=1)
        assert step.write_gradients(scale=scale)[0]
    return _flat_grads(model, scale)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _gradient_balancer(name: str, mode: str):
    """A factory of fresh balancers from conf/balancer/<name>.yaml (stateful ones start anew)."""
    node = OmegaConf.load(CONFIG_DIR / "balancer" / f"{name}.yaml")
    node.seed, node.mode = 0, mode
    return lambda: instantiate(node, tasks=TASKS)


@functools.cache
def _amp_reference(dtype) -> float:
    """Equal weighting's AMP error: the largest over all tasks and each task alone."""
    batch = _amp_batch()
    return max(_relative(a, b) for a, b in zip(_ew_updates(batch, dtype), _ew_updates(batch, None), strict=True))


@functools.cache
def _fp32_update(name: str, mode: str) -> torch.Tensor:
    return _strategy_update(_gradient_balancer(name, mode), _amp_batch(), None)


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize(
    ("name", "mode"), [(name, mode) for name in GRADIENT_BALANCERS for mode in balancer_modes(name)]
)
def test_mixed_precision_update_is_as_close_to_fp32_as_equal_weighting(name, mode, dtype):
    """Under autocast (CPU fp16 with GradScaler's initial scale 65536, or bf16), each strategy's
    backbone update is within 2x of equal weighting's own AMP error relative to fp32: the error of
    equal weighting on all tasks or on any one task alone (a task's own gradient is the input of
    the aggregation; methods that equalise the tasks, Aligned-MTL, IMTL-G, PCGrad, pass a small
    task's error on: here the depth gradient, 6x smaller than the others, is 23% off under bf16,
    the sum 4%)."""
    reference = _amp_reference(dtype)
    got = _relative(_strategy_update(_gradient_balancer(name, mode), _amp_batch(), dtype), _fp32_update(name, mode))
    assert got <= 2 * reference, f"{name} ({mode}) under {dtype}: {got:.3g} off fp32, equal weighting {reference:.3g}"


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("name", GRADIENT_BALANCERS)
def test_fp16_aggregation_is_the_float32_aggregation_of_the_unscaled_task_gradients(name):
    """Under fp16 autocast with scale 65536, the backbone update equals, to float32 rounding, the
    float32 aggregation (outside autocast) of the task gradients of the same fp16 forward,
    unscaled in float32: no Gramian, solve or weighted sum runs in fp16."""
    make_balancer = _gradient_balancer(name, "params")
    batch = _amp_batch()
    got = _strategy_update(make_balancer, batch, torch.float16)

    model, loss = _model(), MultiTaskLoss(tasks=TASKS)
    backbone = list(model.backbone.parameters())
    with torch.autocast("cpu", dtype=torch.float16):
        losses = loss(model(batch["image"]), batch)
        rows = []
        for task in TASKS:
            grads = torch.autograd.grad(losses[task] * AMP_SCALE, backbone, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([
                torch.zeros(p.numel()) if g is None else g.float().reshape(-1) / AMP_SCALE
                for g, p in zip(grads, backbone, strict=True)
            ]))  # fmt: skip
    jacobian = torch.stack(rows)
    balancer = make_balancer()
    expected, _ = balancer.aggregate(jacobian, (jacobian @ jacobian.T).double(), torch.stack(
        [losses[t].detach().float() for t in TASKS]))  # fmt: skip
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
