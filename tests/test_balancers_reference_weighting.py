"""Loss-weighting balancers against their authors' code on the shared fixture inputs.

Fixtures (scripts/balancer_fixtures.py {libmtl,famo,mtan}): LibMTL's UW, GradNorm, DWA, GLS, FAMO,
the official FAMO, and MTAN's own DWA and uncertainty weighting, each driven as its trainer drives
it over 6 steps (epochs of `epoch_steps` steps) on per-step task gradients of one shared vector x
and loss sequences, for 2, 3, 4 tasks and a nearly rank-deficient case. Here our balancer classes
run the same steps through their public interface, the way the training module calls them:
`bind(model)`, `total = balancer(losses)`, `total.backward()`, the optimiser step,
`after_step(losses after the step)` for FAMO, `on_train_epoch_end()` at epoch ends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtl_vision.balancing import (
    FAMO,
    DynamicWeightAverage,
    GeometricLossStrategy,
    GradNorm,
    UncertaintyWeighting,
)
from tests.reference import assert_equal_to_reference

FIXTURES = Path(__file__).parent / "fixtures" / "balancers"
ORDER = ("semseg", "depth", "normals", "edge")


def _fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} missing: run scripts/balancer_fixtures.py {name} --repo <checkout>")
    return torch.load(path, weights_only=False)


class _Shared(nn.Module):
    """A model whose only shared parameter is the vector x (D,), under `backbone`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.x = nn.Parameter(torch.zeros(dim))


def _run(balancer: nn.Module, case: dict, *, epoch_steps: int | None, lr: float, after_step_losses: bool = False):
    """Our balancer over the case's steps: per step, d total / d L_t, x.grad and the balancer's own
    parameters / logits after the step (float64 copies)."""
    grads, values = case["grads"], case["losses"]
    tasks = ORDER[: grads.shape[1]]
    model = _Shared(grads.shape[2])
    balancer.bind(model)
    balancer.train()
    own = list(balancer.parameters())
    optimiser = torch.optim.SGD([{"params": [model.backbone.x], "lr": 0.0}, {"params": own, "lr": lr}])
    record: dict[str, list] = {"loss_grad": [], "shared_grad": [], "own": [], "weights": []}
    x = model.backbone.x
    for k in range(grads.shape[0]):
        # a leaf for the loss values, so d total / d L is read off its .grad (GradNorm's own
        # autograd.grad calls on the losses do not accumulate into it)
        value = values[k].float().requires_grad_()
        lin = grads[k].float() @ x
        stacked = lin - lin.detach() + value
        losses = {t: stacked[i] for i, t in enumerate(tasks)}
        optimiser.zero_grad(set_to_none=False)
        total = balancer(losses)
        total.backward()
        record["loss_grad"].append(value.grad.double())
        record["weights"].append(torch.stack([torch.as_tensor(balancer.last_weights[t]) for t in tasks]).double())
        record["shared_grad"].append(x.grad.detach().double().clone())
        optimiser.step()
        after = None
        if after_step_losses:
            after = balancer.reference_losses({t: values[k + 1, i].float() for i, t in enumerate(tasks)})
        balancer.after_step(after)
        if epoch_steps is not None and (k + 1) % epoch_steps == 0:
            balancer.on_train_epoch_end()
        state = torch.cat([p.detach().double().flatten() for p in own]) if own else torch.zeros(0)
        if isinstance(balancer, FAMO):
            state = balancer.logits.detach().double().clone()
        record["own"].append(state)
    return {key: torch.stack(v) for key, v in record.items()}


def _tasks(case: dict) -> tuple[str, ...]:
    return ORDER[: case["grads"].shape[1]]


CASES = ("t2", "t3", "t4", "t3_near_rank_deficient")


@pytest.mark.parametrize("case", CASES)
def test_uncertainty_equals_libmtl(case):
    fx = _fixture("libmtl")
    data, theirs = fx["cases"][case], fx["results"]["UW"][case]
    ours = _run(UncertaintyWeighting(tasks=_tasks(data)), data, epoch_steps=fx["epoch_steps"], lr=fx["lr"])
    assert_equal_to_reference(ours["loss_grad"], theirs["loss_grad"], f"UW {case} weights")
    assert_equal_to_reference(ours["loss_grad"], theirs["weights"], f"UW {case} returned weights")
    assert_equal_to_reference(ours["shared_grad"], theirs["shared_grad"], f"UW {case} shared gradient")
    assert_equal_to_reference(ours["own"], theirs["own_params"], f"UW {case} log-variances")


@pytest.mark.parametrize("case", ("t3", "t3_near_rank_deficient"))
def test_uncertainty_and_dwa_equal_mtan(case):
    fx = _fixture("mtan")
    data = fx["cases"][case]
    ours = _run(UncertaintyWeighting(tasks=_tasks(data)), data, epoch_steps=fx["epoch_steps"], lr=fx["lr"])
    theirs = fx["results"]["uncert"][case]
    assert_equal_to_reference(ours["loss_grad"], theirs["loss_grad"], f"MTAN uncert {case} weights")
    assert_equal_to_reference(ours["own"], theirs["logsigma"], f"MTAN uncert {case} logsigma")
    dwa = DynamicWeightAverage(tasks=_tasks(data), temperature=fx["temp"])
    ours = _run(dwa, data, epoch_steps=fx["epoch_steps"], lr=fx["lr"])
    assert_equal_to_reference(ours["loss_grad"], fx["results"]["dwa"][case]["loss_grad"], f"MTAN DWA {case}")


@pytest.mark.parametrize("case", CASES)
def test_gradnorm_equals_libmtl(case):
    fx = _fixture("libmtl")
    data, theirs = fx["cases"][case], fx["results"]["GradNorm"][case]
    balancer = GradNorm(tasks=_tasks(data), alpha=fx["args"]["GradNorm"]["alpha"])
    ours = _run(balancer, data, epoch_steps=fx["epoch_steps"], lr=fx["lr"])
    # LibMTL back-propagates every loss plainly while it collects the per-task gradients and then
    # overwrites the shared gradient only: d objective / d L_t is 1 (what every head's gradient is
    # multiplied by, `heads: plain`), and the weights are what it returns
    assert_equal_to_reference(ours["loss_grad"], theirs["loss_grad"], f"GradNorm {case} d objective / d L (heads)")
    assert_equal_to_reference(ours["weights"], theirs["weights"], f"GradNorm {case} weights")
    assert_equal_to_reference(ours["shared_grad"], theirs["shared_grad"], f"GradNorm {case} shared gradient")
    assert_equal_to_reference(ours["own"], theirs["own_params"], f"GradNorm {case} softmax logits")
    assert not torch.allclose(theirs["weights"][-1], torch.ones_like(theirs["weights"][-1]))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", ("DWA", "GLS"))
def test_dwa_and_gls_equal_libmtl(case, name):
    fx = _fixture("libmtl")
    data, theirs = fx["cases"][case], fx["results"][name][case]
    tasks = _tasks(data)
    if name == "DWA":
        balancer = DynamicWeightAverage(tasks=tasks, temperature=fx["args"]["DWA"]["T"])
    else:
        balancer = GeometricLossStrategy(tasks=tasks)
    ours = _run(balancer, data, epoch_steps=fx["epoch_steps"], lr=fx["lr"])
    assert_equal_to_reference(ours["loss_grad"], theirs["loss_grad"], f"{name} {case} weights")
    assert_equal_to_reference(ours["shared_grad"], theirs["shared_grad"], f"{name} {case} shared gradient")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("source", ("famo", "libmtl"))
def test_famo_equals_the_official_code_and_libmtl(case, source):
    fx = _fixture(source)
    data = fx["cases"][case]
    if source == "famo":
        runs = {gamma: (fx["results"][gamma][case], "logits") for gamma in fx["results"]}
    else:
        runs = {fx["args"]["FAMO"]["FAMO_w_gamma"]: (fx["results"]["FAMO"][case], "own_params")}
    for gamma, (theirs, logits) in runs.items():
        balancer = FAMO(tasks=_tasks(data), gamma=gamma)  # the default update: same_batch
        ours = _run(balancer, data, epoch_steps=None, lr=0.0, after_step_losses=True)
        what = f"FAMO ({source}, gamma {gamma}) {case}"
        assert_equal_to_reference(ours["loss_grad"], theirs["loss_grad"], f"{what} weights")
        # their max_norm=1 clip runs before backward, so the step sees the unclipped gradient
        assert_equal_to_reference(ours["shared_grad"], theirs["shared_grad"], f"{what} shared gradient")
        assert_equal_to_reference(ours["own"], theirs[logits], f"{what} logits")


def test_the_defaults_are_the_references():
    tasks = ORDER[:2]
    assert UncertaintyWeighting(tasks=tasks).log_vars.tolist() == [-0.5, -0.5]
    famo = FAMO(tasks=tasks)
    assert (famo.update, famo.gamma, famo.lr, famo.needs_losses_after_step) == ("same_batch", 0.001, 0.025, True)
    gradnorm = GradNorm(tasks=tasks)
    assert (gradnorm.parametrisation, gradnorm.initial, gradnorm.layer) == ("softmax", "first_epoch", "shared")
