"""Weighting balancers (uncertainty, DWA, GradNorm, RLW, GLS, FAMO) against hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mtl_vision.balancing import (
    FAMO,
    DynamicWeightAverage,
    GeometricLossStrategy,
    GradNorm,
    RandomLossWeighting,
    UncertaintyWeighting,
)

TASKS = ["semseg", "depth"]


def _losses(a: float, b: float, grad: bool = False) -> dict[str, torch.Tensor]:
    return {"semseg": torch.tensor(a, requires_grad=grad), "depth": torch.tensor(b, requires_grad=grad)}


def _weights(bal) -> list[float]:
    return [float(bal.last_weights[t]) for t in bal.tasks]


# --- uncertainty -------------------------------------------------------------------------------


def test_uncertainty_total_and_zero_gradient_at_log_loss():
    bal = UncertaintyWeighting(tasks=TASKS, init=0.0)  # the default, -0.5, is MTAN's/LibMTL's
    total = bal(_losses(2.0, 0.5))
    # s = 0: 0.5 * 2 + 0.5 * 0.5 + 0
    assert total.item() == pytest.approx(1.25)
    assert _weights(bal) == [0.5, 0.5]
    total.backward()
    # d/ds = -0.5 exp(-s) L + 0.5 = [-0.5, 0.25]
    assert bal.log_vars.grad.tolist() == pytest.approx([-0.5, 0.25])

    with torch.no_grad():
        bal.log_vars.copy_(torch.tensor([math.log(2.0), math.log(0.5)]))
    bal.log_vars.grad = None
    bal(_losses(2.0, 0.5)).backward()
    assert bal.log_vars.grad.tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_uncertainty_sgd_converges_to_log_loss():
    bal = UncertaintyWeighting(tasks=TASKS, init=1.0)
    opt = torch.optim.SGD(bal.parameters(), lr=1.0)
    for _ in range(300):
        opt.zero_grad()
        bal(_losses(2.0, 0.5)).backward()
        opt.step()
    assert bal.log_vars.tolist() == pytest.approx([math.log(2.0), math.log(0.5)], abs=1e-5)
    bal(_losses(2.0, 0.5))
    assert _weights(bal) == pytest.approx([0.25, 1.0], abs=1e-5)


def test_uncertainty_rejects_bad_init():
    with pytest.raises(ValueError, match="init"):
        UncertaintyWeighting(tasks=TASKS, init=float("nan"))


# --- DWA ---------------------------------------------------------------------------------------


def test_dwa_ones_for_two_epochs_then_softmax_of_rates():
    bal = DynamicWeightAverage(tasks=TASKS, temperature=2.0)
    # epoch 1: mean of [3, 1] and [1, 1] is [2, 1]
    for losses in ([3.0, 1.0], [1.0, 1.0]):
        bal(_losses(*losses))
        assert _weights(bal) == [1.0, 1.0]
    bal.on_train_epoch_end()
    # a validation-mode call must not enter the history
    bal.eval()
    bal(_losses(100.0, 100.0))
    bal.train()
    bal(_losses(1.0, 1.0))  # epoch 2: [1, 1]
    assert _weights(bal) == [1.0, 1.0]
    bal.on_train_epoch_end()

    total = bal(_losses(4.0, 2.0))
    # r = [1/2, 1/1]; w = 2 * exp(r/2) / sum exp(r/2) = [2 / (1 + e^0.25), 2 e^0.25 / (1 + e^0.25)]
    e = math.exp(0.25)
    expected = [2 / (1 + e), 2 * e / (1 + e)]
    assert _weights(bal) == pytest.approx(expected)
    assert total.item() == pytest.approx(4.0 * expected[0] + 2.0 * expected[1])
    assert bal.history.tolist() == [[2.0, 1.0], [1.0, 1.0]]


def test_dwa_every_n_steps_windows_ignore_epoch_ends():
    bal = DynamicWeightAverage(tasks=TASKS, temperature=1.0, every_n_steps=2)
    for losses in ([1.0, 2.0], [1.0, 2.0], [0.5, 2.0], [0.5, 2.0]):
        bal(_losses(*losses))
        assert _weights(bal) == [1.0, 1.0]
        bal.on_train_epoch_end()  # no effect with step windows
        bal.after_step()
    bal(_losses(1.0, 1.0))
    # r = [0.5 / 1, 2 / 2] = [0.5, 1]; temperature 1: w = [2 / (1 + e^0.5), 2 e^0.5 / (1 + e^0.5)]
    e = math.exp(0.5)
    assert _weights(bal) == pytest.approx([2 / (1 + e), 2 * e / (1 + e)])
    assert int(bal.windows) == 2


def test_dwa_state_survives_state_dict():
    bal = DynamicWeightAverage(tasks=TASKS)
    for losses in ([2.0, 1.0], [1.0, 1.0]):
        bal(_losses(*losses))
        bal.on_train_epoch_end()
    restored = DynamicWeightAverage(tasks=TASKS)
    restored.load_state_dict(bal.state_dict())
    bal(_losses(1.0, 1.0))
    restored(_losses(1.0, 1.0))
    assert _weights(restored) == _weights(bal) != [1.0, 1.0]


def test_dwa_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="temperature"):
        DynamicWeightAverage(tasks=TASKS, temperature=0.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        DynamicWeightAverage(tasks=TASKS, every_n_steps=0)


# --- GLS ---------------------------------------------------------------------------------------


def test_gls_weights_and_value_of_the_geometric_mean():
    bal = GeometricLossStrategy(tasks=TASKS)
    total = bal(_losses(2.0, 8.0))
    # Gm = sqrt(16) = 4; w = Gm / (2 L) = [1, 0.25]
    assert total.item() == pytest.approx(4.0)
    assert _weights(bal) == pytest.approx([1.0, 0.25])


def test_gls_gradient_equals_that_of_the_geometric_mean():
    tasks = ["semseg", "depth", "normals"]
    values = torch.tensor([0.3, 1.7, 4.0])
    a = values.clone().requires_grad_(True)
    bal = GeometricLossStrategy(tasks=tasks)
    bal({t: a[i] for i, t in enumerate(tasks)}).backward()
    b = values.clone().requires_grad_(True)
    b.prod().pow(1 / 3).backward()
    assert a.grad.tolist() == pytest.approx(b.grad.tolist())


# --- RLW ---------------------------------------------------------------------------------------


def test_rlw_is_reproducible_per_seed_and_step():
    one, two = RandomLossWeighting(tasks=TASKS, seed=7), RandomLossWeighting(tasks=TASKS, seed=7)
    one(_losses(1.0, 1.0))
    two(_losses(5.0, 3.0))
    assert _weights(one) == _weights(two)
    assert all(w > 0 for w in _weights(one)) and sum(_weights(one)) == pytest.approx(1.0)
    # softmax of two normals: w_0 = 1 / (1 + exp(z_1 - z_0))
    z = torch.randn(2, generator=torch.Generator().manual_seed(7 * 1_000_003)).tolist()
    assert _weights(one)[0] == pytest.approx(1 / (1 + math.exp(z[1] - z[0])))

    first = _weights(one)
    one(_losses(1.0, 1.0))
    assert _weights(one) == first  # micro-batches of one step share the draw
    one.after_step()
    one(_losses(1.0, 1.0))
    assert _weights(one) != first
    assert int(one.state_dict()["step"]) == 1


def test_rlw_rejects_non_integer_seed():
    with pytest.raises(ValueError, match="seed"):
        RandomLossWeighting(tasks=TASKS, seed="a")


# --- FAMO --------------------------------------------------------------------------------------


def test_famo_weights_sum_to_one_and_start_equal():
    bal = FAMO(tasks=TASKS)
    bal(_losses(1.5, 1.5))
    assert _weights(bal) == pytest.approx([0.5, 0.5])
    total = bal(_losses(2.0, 0.5))
    # z = [0.5, 0.5]; w ∝ z / L = [0.25, 1] -> [0.2, 0.8]
    assert _weights(bal) == pytest.approx([0.2, 0.8])
    assert total.item() == pytest.approx(0.2 * 2.0 + 0.8 * 0.5)


def _first_adam_logits(prev, curr, lr=0.025):
    # delta = log(prev + eps) - log(curr + eps); z = [1/2, 1/2]; grad = z*delta - z*(z.delta) (xi = 0, no decay)
    delta = [math.log(p + 1e-8) - math.log(c + 1e-8) for p, c in zip(prev, curr)]
    mean = 0.5 * (delta[0] + delta[1])
    grad = [0.5 * (d - mean) for d in delta]
    # first Adam step: m_hat = g, sqrt(v_hat) = |g|, so xi = -lr * g / (|g| + 1e-8)
    return [-lr * g / (abs(g) + 1e-8) for g in grad]


def test_famo_next_batch_updates_once_per_step():
    bal = FAMO(tasks=TASKS, update="next_batch")
    assert not bal.needs_losses_after_step
    bal(_losses(2.0, 0.5))
    assert bal.logits.tolist() == [0.0, 0.0]
    bal(_losses(1.0, 1.0))  # second micro-batch of the first step: no previous step yet
    assert bal.logits.tolist() == [0.0, 0.0]
    bal.after_step(None)

    bal(_losses(0.5, 1.0))  # prev = last losses of step 1 = [1, 1]
    expected = _first_adam_logits([1.0, 1.0], [0.5, 1.0])
    assert bal.logits.tolist() == pytest.approx(expected)
    assert expected[0] == pytest.approx(-0.025, rel=1e-5) and expected[1] == pytest.approx(0.025, rel=1e-5)
    bal(_losses(0.1, 3.0))  # same step: logits unchanged
    assert bal.logits.tolist() == pytest.approx(expected)

    # the weights use the updated logits: w ∝ softmax(xi) / L
    bal(_losses(1.0, 1.0))
    z0 = 1 / (1 + math.exp(expected[1] - expected[0]))
    assert _weights(bal) == pytest.approx([z0, 1 - z0])


def test_famo_same_batch_uses_after_step_losses_and_matches_torch_adam():
    bal = FAMO(tasks=TASKS, update="same_batch", gamma=0.01)
    assert bal.needs_losses_after_step
    reference = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([reference], lr=0.025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    steps = [([2.0, 0.5], [1.0, 0.45]), ([1.0, 0.45], [0.9, 0.2]), ([0.9, 0.2], [0.5, 0.19])]
    for prev, curr in steps:
        bal(_losses(*prev))
        bal(_losses(*prev))  # forward never moves the logits in same_batch mode
        bal.after_step(_losses(*curr))
        delta = torch.tensor(prev).add(1e-8).log() - torch.tensor(curr).add(1e-8).log()
        opt.zero_grad()
        torch.softmax(reference, dim=0).backward(delta)
        opt.step()
        assert bal.logits.tolist() == pytest.approx(reference.detach().tolist(), abs=1e-7)
    first = _first_adam_logits(*steps[0])
    assert first[0] == pytest.approx(-0.025, rel=1e-5)
    with pytest.raises(ValueError, match="same_batch"):
        bal.after_step(None)


def test_famo_state_survives_state_dict():
    bal = FAMO(tasks=TASKS, update="next_batch")
    for losses in ([2.0, 0.5], [1.0, 0.4], [0.8, 0.1]):
        bal(_losses(*losses))
        bal.after_step()
    restored = FAMO(tasks=TASKS, update="next_batch")
    restored.load_state_dict(bal.state_dict())
    for key in ("logits", "exp_avg", "exp_avg_sq", "adam_step", "prev_losses", "has_prev"):
        assert torch.equal(getattr(restored, key), getattr(bal, key)), key
    bal(_losses(0.5, 0.05))
    restored(_losses(0.5, 0.05))
    assert restored.logits.tolist() == bal.logits.tolist() != [0.0, 0.0]
    assert _weights(restored) == _weights(bal)
    assert not any(True for _ in bal.parameters())  # logits stay out of the model optimiser


def test_famo_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="update"):
        FAMO(tasks=TASKS, update="every_epoch")
    with pytest.raises(ValueError, match="lr"):
        FAMO(tasks=TASKS, lr=0.0)
    with pytest.raises(ValueError, match="gamma"):
        FAMO(tasks=TASKS, gamma=-1.0)


# --- GradNorm ----------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in TASKS})

    def losses(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        scale = {"semseg": 1.0, "depth": 3.0}
        return {t: (self.heads[t](feats) - scale[t]).pow(2).mean() for t in TASKS}


def _paper_gradnorm(**kwargs) -> GradNorm:
    """The paper's parametrisation (the default is LibMTL's, tested against it in
    test_balancers_reference_weighting.py)."""
    return GradNorm(tasks=TASKS, weights="renormalised", initial="first_step", heads="weighted", **kwargs)


def test_gradnorm_gradients_of_weights_and_model():
    model = _Tiny()
    bal = _paper_gradnorm(alpha=1.5, layer=None)
    bal.bind(model)
    assert bal.layer_name == "backbone.2.weight"  # last weight with ndim > 1 of the backbone
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        bal.weights.copy_(torch.tensor([0.5, 1.5]))
    losses = model.losses(x)
    L = [losses[t].item() for t in TASKS]
    bal.initial_losses.copy_(torch.tensor([2 * L[0], L[1]]))
    bal.has_initial.fill_(True)

    W = model.backbone[2].weight
    n = [torch.autograd.grad(losses[t], W, retain_graph=True)[0].norm().item() for t in TASKS]
    w = [0.5, 1.5]
    G = [w[0] * n[0], w[1] * n[1]]
    gbar = (G[0] + G[1]) / 2
    ratio = [0.5, 1.0]  # L / L(0)
    r = [ratio[0] / 0.75, ratio[1] / 0.75]
    target = [gbar * r[0] ** 1.5, gbar * r[1] ** 1.5]
    expected_w_grad = [math.copysign(n[i], G[i] - target[i]) for i in range(2)]

    total = bal(losses)
    assert total.item() == pytest.approx(0.5 * L[0] + 1.5 * L[1] + abs(G[0] - target[0]) + abs(G[1] - target[1]))
    model.zero_grad()
    total.backward()
    assert bal.weights.grad.tolist() == pytest.approx(expected_w_grad, rel=1e-5)
    assert expected_w_grad[0] != expected_w_grad[1]

    # model parameters get the gradient of the weighted loss only
    fresh = model.losses(x)
    reference = torch.autograd.grad(0.5 * fresh["semseg"] + 1.5 * fresh["depth"], list(model.parameters()))
    for got, want in zip((p.grad for p in model.parameters()), reference):
        assert torch.allclose(got, want, atol=1e-6)
    assert _weights(bal) == [0.5, 1.5]


def test_gradnorm_records_initial_losses_and_renormalises():
    model = _Tiny()
    bal = _paper_gradnorm(layer="backbone.0.weight")
    bal.bind(model)
    losses = model.losses(torch.ones(2, 3))
    bal(losses)
    assert bal.initial_losses.tolist() == pytest.approx([losses[t].item() for t in TASKS])
    with torch.no_grad():
        bal.weights.copy_(torch.tensor([1.0, 3.0]))
    bal.after_step()
    assert bal.weights.tolist() == pytest.approx([0.5, 1.5])
    with torch.no_grad():
        bal.weights.copy_(torch.tensor([-1.0, 1.0]))
    bal.after_step()
    assert bal.weights.tolist() == pytest.approx([2e-6 / (1 + 1e-6), 2 / (1 + 1e-6)])


def test_gradnorm_errors_name_the_problem():
    with pytest.raises(ValueError, match="backbone.9.weight"):
        GradNorm(tasks=TASKS, layer="backbone.9.weight", heads="weighted").bind(_Tiny())
    with pytest.raises(ValueError, match=r"balancer.heads=plain .* needs balancer.layer=shared \(got 'backbone.2.weight'\)"):
        GradNorm(tasks=TASKS, layer="backbone.2.weight")
    with pytest.raises(ValueError, match=r"balancer.heads must be one of \['plain', 'weighted'\], got 'mixed'"):
        GradNorm(tasks=TASKS, heads="mixed")
    with pytest.raises(ValueError, match="alpha"):
        GradNorm(tasks=TASKS, alpha=-1.0)
    model = _Tiny()
    with pytest.raises(RuntimeError, match="bind"):
        GradNorm(tasks=TASKS)(model.losses(torch.ones(2, 3)))
    # outside training (validation) it is the plain weighted sum and needs no bind
    bal = GradNorm(tasks=TASKS).eval()
    assert bal(_losses(1.0, 2.0)).item() == pytest.approx(3.0)


def test_gradnorm_default_warms_up_for_an_epoch_on_all_shared_parameters():
    model = _Tiny()
    bal = GradNorm(tasks=TASKS)  # LibMTL: softmax weights, equal weighting in epoch 0, all shared parameters
    bal.bind(model)
    assert len(bal._shared) == len(list(model.backbone.parameters()))
    g = torch.Generator().manual_seed(2)
    seen = []
    for _ in range(3):  # epoch 0: plain sum, the weights' parameter gets no gradient
        losses = model.losses(torch.randn(4, 3, generator=g))
        seen.append([losses[t].item() for t in TASKS])
        total = bal(losses)
        assert total.item() == pytest.approx(sum(seen[-1]), rel=1e-6)
        assert _weights(bal) == [1.0, 1.0]
    assert not bool(bal.has_initial)
    bal.on_train_epoch_end()
    assert bal.initial_losses.tolist() == pytest.approx(torch.tensor(seen).mean(0).tolist(), rel=1e-6)
    with torch.no_grad():
        bal.logits.copy_(torch.tensor([0.0, math.log(3.0)]))
    total = bal(model.losses(torch.randn(4, 3, generator=g)))
    assert _weights(bal) == pytest.approx([0.5, 1.5])  # T * softmax
    total.backward()
    assert bal.logits.grad is not None and bal.logits.grad.abs().sum() > 0
    bal.on_train_epoch_end()  # later epochs leave L(0) alone
    assert bal.initial_losses.tolist() == pytest.approx(torch.tensor(seen).mean(0).tolist(), rel=1e-6)


@pytest.mark.parametrize("heads", ["plain", "weighted"])
def test_gradnorm_heads_get_the_plain_or_the_weighted_gradient(heads):
    """After the warm-up, the shared parameters get sum_t w_t dL_t in both; the heads sum_t dL_t
    (`plain`, LibMTL's) or sum_t w_t dL_t (`weighted`, the paper's); the value is sum_t w_t L_t plus
    the gradient loss either way."""
    model = _Tiny()
    bal = GradNorm(tasks=TASKS, heads=heads)
    bal.bind(model)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(5))
    bal(model.losses(x))
    bal.on_train_epoch_end()
    with torch.no_grad():
        bal.logits.copy_(torch.tensor([0.0, math.log(3.0)]))  # w = (0.5, 1.5)
    model.zero_grad()
    total = bal(model.losses(x))
    total.backward()
    losses = model.losses(x)
    weighted = torch.autograd.grad(0.5 * losses["semseg"] + 1.5 * losses["depth"], list(model.parameters()), retain_graph=True)
    plain = torch.autograd.grad(losses["semseg"] + losses["depth"], list(model.parameters()))
    for (name, param), w, p in zip(model.named_parameters(), weighted, plain, strict=True):
        want = w if name.startswith("backbone.") or heads == "weighted" else p
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.allclose(weighted[-1], plain[-1])  # the heads' two gradients differ
    value = 0.5 * losses["semseg"] + 1.5 * losses["depth"]
    assert float(total) >= float(value) - 1e-6  # + |G - target| >= 0


class _Dense(nn.Module):
    """Dense-prediction-like losses: means over 32 x 4096 outputs with small task losses, so the
    per-element activation gradients (~1e-8) underflow in fp16 unless the loss is scaled."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64))
        self.heads = nn.ModuleDict({t: nn.Linear(64, 4096) for t in TASKS})

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        return {t: (self.heads[t](feats).float() - y[i]).pow(2).mean() * 10.0 ** (i - 3) for i, t in enumerate(TASKS)}


def _gradnorm_step(amp: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One GradNorm step after its warm-up epoch, as automatic optimisation runs it under
    `16-mixed`: the module sets `grad_scale`, the scaler multiplies the total by the same scale and
    unscales the gradients. Returns the (unscaled) gradients of the logits and of the backbone."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=g), torch.randn(2, 32, 4096, generator=g)
    model = _Dense()
    bal = GradNorm(tasks=TASKS)
    bal.bind(model)
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        bal(model.losses(x, y))
    bal.on_train_epoch_end()
    with torch.no_grad():
        bal.logits.copy_(torch.tensor([0.7, 1.3]))
    bal.grad_scale = scale
    with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
        total = bal(model.losses(x, y))
    (total * scale).backward()
    backbone = torch.cat([p.grad.flatten() for p in model.backbone.parameters()])
    return bal.logits.grad / scale, backbone / scale


def test_gradnorm_weight_gradient_under_fp16_amp_equals_fp32():
    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    fp32_logits, fp32_backbone = _gradnorm_step(amp=False, scale=1.0)
    amp_logits, amp_backbone = _gradnorm_step(amp=True, scale=65536.0)  # GradScaler's initial scale
    amp_error = rel(amp_backbone, fp32_backbone)  # the weighted loss's own AMP error
    assert 0 < amp_error < 1e-2
    assert rel(amp_logits, fp32_logits) <= 2 * amp_error
    # the losses differentiated unscaled (the old behaviour) lose the small activation gradients
    unscaled_logits, _ = _gradnorm_step(amp=True, scale=1.0)
    assert rel(unscaled_logits, fp32_logits) > 10 * amp_error


def test_gradnorm_gets_the_grad_scaler_scale_in_training(make_cfg):
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.utils.data import DataLoader

    from mtl_vision.cli.build import build_datamodule, build_module

    cfg = make_cfg(["balancer=gradnorm", "balancer.initial=first_step"])
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    module = build_module(cfg, datamodule)
    loader = DataLoader([datamodule.val_set[i] for i in range(4)], batch_size=4)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=65536.0))
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, plugins=[plugin],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    assert module.balancer.grad_scale == 65536.0  # what its per-task gradients were computed with
    assert torch.isfinite(module.balancer.logits).all()
