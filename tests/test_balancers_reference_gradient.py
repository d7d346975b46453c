"""Aligned-MTL, MGDA, CAGrad and Nash-MTL against their authors' code: the shared update and the
heads' gradients after every step on the fixed gradients and losses of
tests/fixtures/balancers/{aligned_mtl,mgda,cagrad,nashmtl}.pt (written by
scripts/balancer_fixtures.py from the authors' repositories), through our GradientBalancer and
TaskGradientStep as training calls them, to 1e-5 of the largest magnitude."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtl_vision.balancing.aligned_mtl import aligned_mtl
from mtl_vision.balancing.cagrad import cagrad
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.mgda import mgda
from mtl_vision.balancing.nashmtl import NashMTL
from mtl_vision.engine.task_gradients import TaskGradientStep

FIXTURES = Path(__file__).parent / "fixtures" / "balancers"
TASKS = ["semseg", "depth", "normals", "edge"]


class _Linear(nn.Module):
    """A 'model' whose task losses are linear in its parameters: loss_t has exactly the gradient
    grads[t] on the shared `backbone.weight` and heads[t] on `decoder.<task>`."""

    def __init__(self, dim: int, tasks: list[str], head_dim: int) -> None:
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.weight = nn.Parameter(torch.zeros(dim))
        self.decoder = nn.ParameterDict({t: nn.Parameter(torch.zeros(head_dim)) for t in tasks})

    def forward(self, image: torch.Tensor) -> dict:
        return {}


def _run(balancer: GradientBalancer, grads, losses, heads=None):
    """Per step: (shared update (D,), {task: head gradient}) our TaskGradientStep writes."""
    steps, _, dim = grads.shape
    tasks = balancer.tasks
    model = _Linear(dim, tasks, 1 if heads is None else heads.shape[-1])
    balancer.bind(model)
    step = TaskGradientStep(model, balancer, tasks)
    updates, head_grads = [], []
    for s in range(steps):

        def compute(_, s=s):
            out = {}
            for k, task in enumerate(tasks):
                term = (grads[s, k] * model.backbone.weight).sum()
                if heads is not None:
                    term = term + (heads[s, k] * model.decoder[task]).sum()
                out[task] = term - term.detach() + losses[s, k]
            return out

        step.micro_batch(torch.zeros(1), compute, lambda: None, scale=1.0, divide=1)
        finite, _, _ = step.write_gradients(scale=1.0)
        assert finite
        updates.append(model.backbone.weight.grad.clone())
        head_grads.append({task: model.decoder[task].grad.clone() for task in tasks} if heads is not None else {})
        balancer.after_step(None)
        model.zero_grad(set_to_none=True)
    return torch.stack(updates), head_grads


def _close(got: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    scale = float(ref.abs().max())
    diff = float((got.double() - ref.double()).abs().max())
    assert diff <= 1e-5 * scale, f"{what}: max |ours - authors'| = {diff:.3g}, 1e-5 * max|ref| = {1e-5 * scale:.3g}"
    return diff / scale


def _load(name: str) -> dict:
    path = FIXTURES / f"{name}.pt"
    if not path.exists():
        pytest.skip(f"{path} missing: python scripts/balancer_fixtures.py {name} --repo <checkout>")
    return torch.load(path, weights_only=False)


ALIGNED = _load("aligned_mtl") if (FIXTURES / "aligned_mtl.pt").exists() else {"cases": {}}


@pytest.mark.parametrize("case", sorted(ALIGNED["cases"]))
@pytest.mark.parametrize("mode", ["min", "median", "rmse"])
def test_aligned_mtl_equals_the_authors(case, mode):
    data = ALIGNED["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=aligned_mtl(scale_mode=mode))
    updates, _ = _run(balancer, data["grads"], data["losses"])
    _close(updates, data[mode]["update"], f"aligned_mtl {case} {mode}")


MGDA = _load("mgda") if (FIXTURES / "mgda.pt").exists() else {"cases": {}}


@pytest.mark.parametrize("case", sorted(MGDA["cases"]))
@pytest.mark.parametrize("normalization", ["loss+", "l2", "loss", "none"])
def test_mgda_equals_the_authors(case, normalization):
    data = MGDA["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=mgda(normalization=normalization), heads="weighted")
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"])
    ref = data[normalization]
    _close(updates, ref["update"], f"mgda {case} {normalization} update")
    got_heads = torch.stack([torch.stack([h[task] for task in TASKS[:t]]) for h in heads])
    _close(got_heads, ref["heads"], f"mgda {case} {normalization} heads")


CAGRAD = _load("cagrad") if (FIXTURES / "cagrad.pt").exists() else {"cases": {}}
CAGRAD_RUNS = [(case, "authors") for case in sorted(CAGRAD["cases"]) if "authors" in CAGRAD["cases"][case]]
CAGRAD_RUNS += [(case, "libmtl") for case in sorted(CAGRAD["cases"])]
CAGRAD_OPTIONS = {
    "authors": {"c": 0.4, "rescale": 1, "scale": "sum"},
    "libmtl": {"c": 0.5, "rescale": 1, "scale": "mean"},
}


@pytest.mark.parametrize(("case", "reference"), CAGRAD_RUNS)
def test_cagrad_equals_the_authors_and_libmtl(case, reference):
    data = CAGRAD["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=cagrad(**CAGRAD_OPTIONS[reference]))
    # SLSQP (ftol 1e-6) amplifies the last-bit differences of a multi-threaded float32 Gramian up
    # to ~1e-5 (4 tasks); one thread forms it in the order of the fixture's run, bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        updates, _ = _run(balancer, data["grads"], data["losses"])
    finally:
        torch.set_num_threads(threads)
    _close(updates, data[reference], f"cagrad {case} {reference}")


NASH = _load("nashmtl") if (FIXTURES / "nashmtl.pt").exists() else {"cases": {}, "variants": {}}


@pytest.mark.filterwarnings("ignore:You are solving a parameterized problem that is not DPP")
@pytest.mark.parametrize("case", sorted(NASH["cases"]))
@pytest.mark.parametrize("variant", sorted(NASH["variants"]))
def test_nashmtl_equals_the_authors(case, variant):
    data = NASH["cases"][case]
    t = data["grads"].shape[1]
    aggregator = NashMTL(n_tasks=t, **NASH["variants"][variant])
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=aggregator, heads="weighted")
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"])
    ref = data[variant]
    _close(updates, ref["update"], f"nashmtl {case} {variant} update")
    got_heads = torch.stack([torch.stack([h[task] for task in TASKS[:t]]) for h in heads])
    _close(got_heads, ref["heads"], f"nashmtl {case} {variant} heads")
