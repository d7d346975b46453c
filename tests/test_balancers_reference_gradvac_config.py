"""GradVac (LibMTL) and ConFIG (tum-pbs/ConFIG) against their reference code: the shared update and
the internal state after every step on the fixed gradients of tests/fixtures/balancers/{gradvac,
conflictfree}.pt (written by scripts/balancer_fixtures.py), through GradientBalancer and
TaskGradientStep as training calls them, to 1e-5 of the largest magnitude; plus the config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_balancers_reference_gradient import _close, _run
from torch import nn
from torchjd.aggregation import ConFIG as TorchJDConFIG
from torchjd.aggregation import GradVac as TorchJDGradVac

from mtl_vision.balancing.config import ConFIGWeighting, config
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.gradvac import GradVacWeighting, GroupedGradVac, gradvac
from mtl_vision.engine.task_gradients import TaskGradientStep

FIXTURES = Path(__file__).parent / "fixtures" / "balancers"
TASKS = ["semseg", "depth", "normals", "edge"]


def _fixture(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    return torch.load(path, weights_only=False) if path.exists() else {"cases": {}}


def _replay(orders: list) -> callable:
    """A `draw_order` that gives LibMTL's recorded orders (per step, per task) in turn."""
    flat = iter([order for step in orders for order in step])

    def draw_order(others: list[int]) -> list[int]:
        order = next(flat)
        assert sorted(order) == others, (order, others)
        return list(order)

    return draw_order


class _Layered(nn.Module):
    """The fixture's encoder layout as the shared backbone: two linear layers and a layer norm
    (40 numbers), so that GradVac's layers and matrices are different groups."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4, bias=False), nn.LayerNorm(4))

    def forward(self, image: torch.Tensor) -> dict:
        return {}


def _run_layered(balancer: GradientBalancer, grads: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """Per step, the shared update TaskGradientStep writes for losses linear in the concatenated
    backbone parameters (the layered twin of `_run`)."""
    model = _Layered()
    balancer.bind(model)
    step = TaskGradientStep(model, balancer, balancer.tasks)
    updates = []
    for s in range(grads.shape[0]):

        def compute(_, s=s):
            flat = torch.cat([p.reshape(-1) for p in model.backbone.parameters()])
            out = {}
            for k, task in enumerate(balancer.tasks):
                term = (grads[s, k] * flat).sum()
                out[task] = term - term.detach() + losses[s, k]
            return out

        step.micro_batch(torch.zeros(1), compute, lambda: None, scale=1.0, divide=1)
        assert step.write_gradients(scale=1.0)[0]
        updates.append(torch.cat([p.grad.reshape(-1) for p in model.backbone.parameters()]))
        balancer.after_step(None)
        model.zero_grad(set_to_none=True)
    return torch.stack(updates)


# -- GradVac ------------------------------------------------------------------------------------

GRADVAC = _fixture("gradvac")
GROUPS = ["whole_model", "all_layer", "all_matrix"]


@pytest.mark.parametrize("group_type", GROUPS)
@pytest.mark.parametrize("case", sorted(GRADVAC["cases"]))
def test_gradvac_equals_libmtl(case, group_type):
    data = GRADVAC["cases"][case]
    ref = data[group_type]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=gradvac(beta=GRADVAC["beta"], group_type=group_type))
    agg = balancer.aggregator
    state = agg.gramian_weighting if group_type == "whole_model" else agg
    state.draw_order = _replay(ref["orders"])
    if group_type == "whole_model":  # one vector of 40 shared numbers, as the other balancers' tests
        updates, _ = _run(balancer, data["grads"], data["losses"])
        targets = state.targets.unsqueeze(0)
    else:
        updates = _run_layered(balancer, data["grads"], data["losses"])
        targets = state.targets
    _close(updates, ref["update"], f"gradvac {case} {group_type} update")
    _close(targets, ref["targets"][-1], f"gradvac {case} {group_type} targets")


def test_gradvac_whole_model_equals_torchjd_on_the_same_draws():
    g = torch.Generator().manual_seed(0)
    ours, theirs = GradVacWeighting(beta=0.5), TorchJDGradVac(beta=0.5).gramian_weighting
    for step in range(5):
        jacobian = torch.randn(4, 30, generator=g, dtype=torch.float64)
        jacobian[1] -= 0.9 * jacobian[0]
        gramian = jacobian @ jacobian.T
        torch.manual_seed(step)
        a = ours.weigh(gramian)[0]
        torch.manual_seed(step)
        b = theirs(gramian)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_gradvac_state_survives_a_checkpoint():
    data = GRADVAC["cases"].get("t3") or pytest.skip("gradvac.pt missing")
    grads, losses = data["grads"], data["losses"]
    whole = GradientBalancer(tasks=TASKS[:3], aggregator=gradvac())
    first, _ = _run(whole, grads[:3], losses[:3])
    resumed = GradientBalancer(tasks=TASKS[:3], aggregator=gradvac())
    resumed.load_checkpoint_state(whole.checkpoint_state())
    resumed.steps.copy_(whole.steps)
    rest, _ = _run(resumed, grads[3:], losses[3:])
    straight, _ = _run(GradientBalancer(tasks=TASKS[:3], aggregator=gradvac()), grads, losses)
    torch.testing.assert_close(torch.cat([first, rest]), straight, rtol=0, atol=0)


def test_gradvac_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"aggregator\.beta must be in \[0, 1\], got 1.5"):
        gradvac(beta=1.5)
    with pytest.raises(ValueError, match=r"aggregator\.group_type must be one of .*'layers'"):
        gradvac(group_type="layers")
    with pytest.raises(ValueError, match=r"balancer\.mode='features'"):
        GradientBalancer(tasks=TASKS[:2], aggregator=gradvac(group_type="all_layer"), mode="features")
    grouped = GroupedGradVac(group_type="all_matrix")
    with pytest.raises(ValueError, match="group_type=all_matrix needs the shared parameters' columns"):
        grouped.combine(torch.ones(2, 5), None)


# -- ConFIG and M-ConFIG ------------------------------------------------------------------------

CONFIG = _fixture("conflictfree")


def _heads(heads: list[dict], t: int) -> torch.Tensor:
    return torch.stack([torch.stack([h[task] for task in TASKS[:t]]) for h in heads])


@pytest.mark.parametrize("case", sorted(CONFIG["cases"]))
def test_config_equals_the_authors(case):
    data = CONFIG["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=config())
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"])
    _close(updates, data["config"]["update"], f"config {case} update")
    _close(_heads(heads, t), data["config"]["heads"], f"config {case} heads")


@pytest.mark.parametrize("num_updates", [1, 2])
@pytest.mark.parametrize("case", sorted(CONFIG["cases"]))
def test_m_config_equals_the_authors(case, num_updates):
    data = CONFIG["cases"][case]
    ref = data[f"m_config_{num_updates}"]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=config(momentum=True, num_updates=num_updates))
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"])
    _close(updates, ref["update"], f"m_config {case} x{num_updates} update")
    _close(_heads(heads, t), ref["heads"], f"m_config {case} x{num_updates} heads")


def test_config_equals_torchjd_on_well_conditioned_gradients():
    g = torch.Generator().manual_seed(0)
    for t in (2, 3, 5):
        jacobian = torch.randn(t, 50, generator=g, dtype=torch.float64)
        jacobian[1] -= 0.7 * jacobian[0]
        weights = ConFIGWeighting().weigh(jacobian @ jacobian.T)[0]
        torch.testing.assert_close(weights @ jacobian, TorchJDConFIG()(jacobian), rtol=1e-10, atol=1e-10)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match=r"aggregator\.num_updates must be >= 1, got 0"):
        config(momentum=True, num_updates=0)
    with pytest.raises(ValueError, match=r"aggregator\.beta_2 must be in \[0, 1\), got 1.0"):
        config(momentum=True, beta_2=1.0)
    with pytest.raises(ValueError, match=r"balancer\.mode='features'"):
        GradientBalancer(tasks=TASKS[:2], aggregator=config(momentum=True), mode="features")
    with pytest.raises(ValueError, match="num_updates=3 exceeds the 2 tasks"):
        config(momentum=True, num_updates=3).combine(torch.ones(2, 4), None)
