"""FairGrad and SDMGrad against their authors' code (OptMN-Lab/fairgrad, OptMN-Lab/sdmgrad) and
LibMTL's: the shared update and the heads' gradients after every step on the fixed gradients and
losses of tests/fixtures/balancers/{fairgrad,sdmgrad}.pt (scripts/balancer_fixtures.py fairgrad|sdmgrad
--repo <checkout>), through GradientBalancer and TaskGradientStep as training calls them, to 1e-5
of the largest magnitude; the configs' defaults and errors."""

from __future__ import annotations

import inspect
import pickle

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchjd.aggregation import FairGrad as TorchjdFairGrad

from mtl_vision.balancing.fairgrad import FairGradWeighting, fairgrad
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.sdmgrad import SDMGrad, SDMGradWeighting, project_onto_simplex
from mtl_vision.cli import CONFIG_DIR
from tests.test_balancers_reference_gradient import FIXTURES, TASKS, _close, _load, _run

FAIRGRAD = _load("fairgrad") if (FIXTURES / "fairgrad.pt").exists() else {"cases": {}}
SDMGRAD = _load("sdmgrad") if (FIXTURES / "sdmgrad.pt").exists() else {"cases": {}}

# fixture variant -> (our aggregator's options, heads)
FAIRGRAD_OPTIONS = {
    "default": ({"alpha": 2.0}, "plain"),
    "alpha1": ({"alpha": 1.0}, "plain"),
    "noclip": ({"alpha": 2.0, "max_norm": 0.0}, "plain"),
    "libmtl": ({"alpha": 1.0, "scale": "mean", "max_norm": 0.0}, "weighted"),
    "libmtl_alpha2": ({"alpha": 2.0, "scale": "mean", "max_norm": 0.0}, "weighted"),
}
SDMGRAD_OPTIONS = {
    "default": {},
    "noclip": {"max_norm": 0.0},
    "libmtl": {"lr": 5.0, "normalization": "libmtl", "scale": "mean", "max_norm": 0.0},
}


def _heads(heads: list[dict], t: int) -> torch.Tensor:
    return torch.stack([torch.stack([h[task] for task in TASKS[:t]]) for h in heads])


@pytest.mark.parametrize("case", sorted(FAIRGRAD["cases"]))
def test_fairgrad_equals_the_authors_and_libmtl(case):
    data = FAIRGRAD["cases"][case]
    t = data["grads"].shape[1]
    for variant, (options, heads) in FAIRGRAD_OPTIONS.items():
        balancer = GradientBalancer(tasks=TASKS[:t], aggregator=fairgrad(**options), heads=heads)
        updates, got_heads = _run(balancer, data["grads"], data["losses"], data["heads"])
        _close(updates, data[variant]["update"], f"fairgrad {case} {variant} update")
        _close(_heads(got_heads, t), data[variant]["heads"], f"fairgrad {case} {variant} heads")


@pytest.mark.parametrize("case", sorted(SDMGRAD["cases"]))
def test_sdmgrad_equals_the_authors_and_libmtl(case):
    data = SDMGRAD["cases"][case]
    t = data["grads"].shape[1]
    for variant, options in SDMGRAD_OPTIONS.items():
        aggregator = SDMGrad(n_tasks=t, **options)
        balancer = GradientBalancer(tasks=TASKS[:t], aggregator=aggregator, heads="weighted")
        updates, got_heads = _run(balancer, data["grads"], data["losses"], data["heads"])
        ref = data[variant]
        _close(updates, ref["update"], f"sdmgrad {case} {variant} update")
        _close(_heads(got_heads, t), ref["heads"], f"sdmgrad {case} {variant} heads")  # 3 batches' worth
        _close(aggregator.gramian_weighting.w, ref["w"][-1], f"sdmgrad {case} {variant} task weights")


@pytest.mark.parametrize("case", sorted(SDMGRAD["cases"]))
def test_sdmgrad_authors_update_uses_only_their_last_batch(case):
    # their three gradient buffers are one tensor: with two other batches first, their shared
    # update is the one of the last batch alone, which is what ours computes from the step's batch
    data = SDMGRAD["cases"][case]
    t = data["grads"].shape[1]
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=SDMGrad(n_tasks=t), heads="weighted")
    updates, _ = _run(balancer, data["grads"], data["losses"], data["heads"])
    _close(updates, data["distinct"]["update"], f"sdmgrad {case} distinct batches")
    assert torch.equal(data["distinct"]["update"], data["default"]["update"])


def test_torchjd_fairgrad_is_the_libmtl_shared_update():
    data = FAIRGRAD["cases"].get("t3")
    if data is None:
        pytest.skip("fairgrad.pt missing")
    balancer = GradientBalancer(tasks=TASKS[:3], aggregator=TorchjdFairGrad(alpha=2.0))
    updates, _ = _run(balancer, data["grads"], data["losses"])
    _close(updates, data["libmtl_alpha2"]["update"], "torchjd FairGrad vs LibMTL")


def test_simplex_projection():
    w = project_onto_simplex(torch.tensor([0.9, 0.4, -0.5]))
    torch.testing.assert_close(w, torch.tensor([0.75, 0.25, 0.0]))
    inside = torch.tensor([0.25, 0.75], dtype=torch.float32)
    assert torch.equal(project_onto_simplex(inside), inside)


def test_sdmgrad_resumes_exactly_from_its_checkpoint_state():
    data = SDMGRAD["cases"].get("t4")
    if data is None:
        pytest.skip("sdmgrad.pt missing")
    grads, losses = data["grads"], data["losses"]
    first = GradientBalancer(tasks=TASKS, aggregator=SDMGrad(n_tasks=4), heads="weighted")
    _run(first, grads[:3], losses[:3])
    state = first.checkpoint_state()
    assert state is not None
    resumed = GradientBalancer(tasks=TASKS, aggregator=SDMGrad(n_tasks=4), heads="weighted")
    resumed.load_checkpoint_state(state)
    updates, _ = _run(resumed, grads[3:], losses[3:])
    _close(updates, data["default"]["update"][3:], "sdmgrad resumed")
    fresh, _ = _run(GradientBalancer(tasks=TASKS, aggregator=SDMGrad(n_tasks=4)), grads[3:], losses[3:])
    assert not torch.allclose(fresh, data["default"]["update"][3:]), "the task weights should carry over"
    assert pickle.loads(state).gramian_weighting.w.shape == (4,)


def _config(name: str, **overrides):
    node = OmegaConf.load(CONFIG_DIR / "balancer" / f"{name}.yaml")
    node.seed = 0
    for key, value in overrides.items():
        OmegaConf.update(node, key, value)
    return instantiate(node, tasks=TASKS[:3])


@pytest.mark.parametrize(("name", "cls"), [("fairgrad", FairGradWeighting), ("sdmgrad", SDMGradWeighting)])
def test_configs_build_the_authors_defaults(name, cls):
    node = OmegaConf.load(CONFIG_DIR / "balancer" / f"{name}.yaml")
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items() if k != "n_tasks"}
    assert {k: v for k, v in node.aggregator.items() if not k.startswith("_")} == defaults
    balancer = _config(name)
    assert isinstance(balancer, GradientBalancer)
    assert balancer.mode == "params"
    assert balancer.heads == ("weighted" if name == "sdmgrad" else "plain")
    assert type(balancer.aggregator.gramian_weighting) is cls
    assert isinstance(_config(name, mode="features"), GradientBalancer)


@pytest.mark.parametrize(
    ("name", "key", "value", "expected"),
    [
        ("fairgrad", "alpha", -1.0, "balancer.aggregator.alpha must be >= 0, got -1.0"),
        ("fairgrad", "scale", "total", "balancer.aggregator.scale must be one of ['sum', 'mean'], got 'total'"),
        ("fairgrad", "max_norm", -1.0, "balancer.aggregator.max_norm must be >= 0 (0: no clipping), got -1.0"),
        ("sdmgrad", "lamda", -0.1, "balancer.aggregator.lamda must be >= 0, got -0.1"),
        ("sdmgrad", "niter", 0, "balancer.aggregator.niter must be >= 1, got 0"),
        ("sdmgrad", "lr", 0.0, "balancer.aggregator.lr must be > 0, got 0.0"),
        ("sdmgrad", "momentum", 1.0, "balancer.aggregator.momentum must be in [0, 1), got 1.0"),
        ("sdmgrad", "head_batches", 0, "balancer.aggregator.head_batches must be >= 1, got 0"),
        (
            "sdmgrad",
            "normalization",
            "unit",
            "balancer.aggregator.normalization must be one of ['authors', 'libmtl'], got 'unit'",
        ),
        ("sdmgrad", "scale", "total", "balancer.aggregator.scale must be one of ['sum', 'mean'], got 'total'"),
    ],
)
def test_config_errors_name_the_key_and_value(name, key, value, expected):
    with pytest.raises(Exception) as info:
        _config(name, **{f"aggregator.{key}": value})
    error = info.value
    while not isinstance(error, ValueError) and error.__cause__ is not None:  # Hydra wraps it
        error = error.__cause__
    assert isinstance(error, ValueError)
    assert expected in str(error)
