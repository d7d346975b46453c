"""Aligned-MTL, MGDA, CAGrad, Nash-MTL, DB-MTL and IMTL against their authors' code: the shared
update and the heads' gradients after every step on the fixed gradients and losses of
tests/fixtures/balancers/{aligned_mtl,mgda,cagrad,nashmtl,libmtl_gradient}.pt (written by
scripts/balancer_fixtures.py from the authors' repositories), through our GradientBalancer and
TaskGradientStep as training calls them, to 1e-5 of the largest magnitude."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from mtl_vision.balancing.aligned_mtl import aligned_mtl
from mtl_vision.balancing.cagrad import cagrad
from mtl_vision.balancing.dbmtl import DBMTL
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.imtl import imtl
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


def _run(balancer: GradientBalancer, grads, losses, heads=None, own_lr: float | None = None):
    """Per step: (shared update (D,), {task: head gradient}) our TaskGradientStep writes; with
    `own_lr`, the balancer's own parameters take an SGD step of that rate after every step (as the
    model's optimiser moves them in training)."""
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
        if own_lr is not None:
            with torch.no_grad():
                for p in balancer.parameters():
                    p -= own_lr * p.grad
                    p.grad = None
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


LIBMTL = _load("libmtl_gradient") if (FIXTURES / "libmtl_gradient.pt").exists() else {"cases": {}, "args": {}}


def _heads_of(heads: list[dict], tasks: list[str]) -> torch.Tensor:
    return torch.stack([torch.stack([h[task] for task in tasks]) for h in heads])


@pytest.mark.parametrize("case", sorted(LIBMTL["cases"]))
@pytest.mark.parametrize("variant", ["DB_MTL", "DB_MTL_decay"])
def test_dbmtl_equals_libmtl(case, variant):
    """DB-MTL as its authors' LibMTL: log-loss gradients, moving averages, rows scaled to the
    largest norm; heads with their log-loss gradients."""
    data = LIBMTL["cases"][case]
    t = data["grads"].shape[1]
    args = LIBMTL["args"][variant]
    aggregator = DBMTL(beta=args["DB_beta"], beta_sigma=args["DB_beta_sigma"])
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=aggregator, transform="log")
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"])
    _close(updates, data[variant]["update"], f"db_mtl {case} {variant} update")
    _close(_heads_of(heads, TASKS[:t]), data[variant]["heads"], f"db_mtl {case} {variant} heads")
    assert aggregator.step == data["grads"].shape[0]


@pytest.mark.parametrize("case", sorted(LIBMTL["cases"]))
def test_imtl_hybrid_equals_libmtl(case):
    """IMTL (IMTL-G on the gradients of IMTL-L's e^s L - s, s learned) as LibMTL: the update, the
    heads (e^s times their gradient) and the loss scales moved by SGD at the fixture's rate."""
    data = LIBMTL["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=imtl(), transform="learned_scale")
    ref = data["IMTL"]
    updates, heads = _run(balancer, data["grads"], data["losses"], data["heads"], own_lr=LIBMTL["lr"])
    _close(updates, ref["update"], f"imtl {case} update")
    _close(_heads_of(heads, TASKS[:t]), ref["heads"], f"imtl {case} heads")
    _close(balancer.loss_scale.detach(), ref["own"][-1], f"imtl {case} loss scales")


def test_dbmtl_state_resumes_from_a_checkpoint_and_refuses_features_mode():
    """The moving averages travel in the checkpoint (GradientBalancer.checkpoint_state): a balancer
    restored after step 3 continues exactly as the uninterrupted one; features mode is refused by name."""
    data = LIBMTL["cases"]["t3"] if LIBMTL["cases"] else pytest.skip("libmtl_gradient.pt missing")
    grads, losses = data["grads"], data["losses"]
    first = GradientBalancer(tasks=TASKS[:3], aggregator=DBMTL(), transform="log")
    _run(first, grads[:3], losses[:3])
    resumed = GradientBalancer(tasks=TASKS[:3], aggregator=DBMTL(), transform="log")
    resumed.load_checkpoint_state(first.checkpoint_state())
    assert resumed.aggregator.step == 3
    rest, _ = _run(resumed, grads[3:], losses[3:])
    _close(rest, data["DB_MTL"]["update"][3:], "db_mtl resumed at step 3")
    with pytest.raises(ValueError, match=r"balancer.mode='features': DBMTL keeps state per shared parameter"):
        GradientBalancer(tasks=TASKS[:3], aggregator=DBMTL(), transform="log", mode="features")
    with pytest.raises(ValueError, match=r"balancer.transform must be one of \['none', 'log', 'learned_scale'\], got 'exp'"):
        GradientBalancer(tasks=TASKS[:3], aggregator=DBMTL(), transform="exp")
    with pytest.raises(ValueError, match=r"balancer.aggregator.beta must lie in \[0, 1\], got 1.5"):
        DBMTL(beta=1.5)
    with pytest.raises(ValueError, match=r"balancer.aggregator.solver must be one of \['inverse', 'pinv'\], got 'lu'"):
        imtl(solver="lu")
