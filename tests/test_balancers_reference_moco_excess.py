"""MoCo and ExcessMTL against their authors' code and LibMTL's: the shared update, the heads'
gradients and the weights after every step on the fixed gradients and losses of
tests/fixtures/balancers/{moco,excess_mtl}.pt (written by scripts/balancer_fixtures.py from the
authors' repositories), through GradientBalancer and TaskGradientStep as training calls them, to
1e-5 of the largest magnitude; their state survives a checkpoint; their options are checked by name."""

from __future__ import annotations

import pickle

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_vision.balancing.excess_mtl import ExcessMTL
from mtl_vision.balancing.gradient import GradientBalancer
from mtl_vision.balancing.moco import MoCo
from mtl_vision.cli import CONFIG_DIR
from tests.test_balancers_reference_gradient import FIXTURES, TASKS, _close, _heads_of, _load, _run

MOCO = _load("moco") if (FIXTURES / "moco.pt").exists() else {"cases": {}, "variants": {}, "epoch_steps": 1}
EXCESS = _load("excess_mtl") if (FIXTURES / "excess_mtl.pt").exists() else {"cases": {}, "variants": {}}

# our options for each variant the fixture ran (its "variants" hold the authors' own arguments)
MOCO_OPTIONS = {
    "nyuv2": {},  # the defaults: the authors' NYUv2 run_moco.sh
    "cityscapes": {"beta": 0.05, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "normalize": "none"},
    "libmtl": {"beta": 0.5, "beta_sigma": 0.5, "gamma": 0.1, "gamma_sigma": 0.5, "scale": "mean", "unit": "step"},
    "libmtl_rho": {
        "beta": 0.5,
        "beta_sigma": 0.5,
        "gamma": 0.1,
        "gamma_sigma": 0.5,
        "rho": 0.1,
        "scale": "mean",
        "unit": "step",
    },
}


def _end_epoch(balancer: GradientBalancer) -> None:
    """What training does at an epoch end (the LightningModule calls the balancer's hook)."""
    balancer.on_train_epoch_end()


def _steps(balancer: GradientBalancer, data: dict, first: int = 0, epoch_steps: int | None = None):
    """Steps `first`.. of the fixture one at a time through `_run` (so that epochs can end between
    them): (updates (S, D), heads (S, T, H), logged weights (S, T))."""
    t = data["grads"].shape[1]
    updates, heads, weights = [], [], []
    for s in range(first, data["grads"].shape[0]):
        update, head = _run(balancer, data["grads"][s : s + 1], data["losses"][s : s + 1], data["heads"][s : s + 1])
        updates.append(update[0])
        heads.append(_heads_of(head, TASKS[:t])[0])
        weights.append(torch.stack([balancer.last_weights[task] for task in TASKS[:t]]))
        if epoch_steps is not None and (s + 1) % epoch_steps == 0:
            _end_epoch(balancer)
    return torch.stack(updates), torch.stack(heads), torch.stack(weights)


def _moco(case: str, **options) -> GradientBalancer:
    t = MOCO["cases"][case]["grads"].shape[1]
    return GradientBalancer(tasks=TASKS[:t], aggregator=MoCo(**options))


@pytest.mark.parametrize("case", sorted(MOCO["cases"]))
@pytest.mark.parametrize("variant", sorted(MOCO_OPTIONS))
def test_moco_equals_the_authors_and_libmtl(case, variant):
    """The authors' tracking (their NYUv2 and Cityscapes recipes, epochs of `epoch_steps` steps,
    restarts in epoch 0, x T) and LibMTL's MoCo: update, plain heads, lambda, and y after the last step."""
    data, ref = MOCO["cases"][case], MOCO["cases"][case][variant]
    options = MOCO_OPTIONS[variant]
    balancer = _moco(case, **options)
    updates, heads, weights = _steps(balancer, data, epoch_steps=MOCO["epoch_steps"])
    factor = data["grads"].shape[1] if options.get("scale", "sum") == "sum" else 1
    _close(updates, ref["update"], f"moco {case} {variant} update")
    _close(heads, ref["heads"], f"moco {case} {variant} heads")
    _close(weights / factor, ref["weights"], f"moco {case} {variant} weights")
    _close(balancer.aggregator.y, ref["y"], f"moco {case} {variant} tracked gradients")


@pytest.mark.parametrize("case", sorted(EXCESS["cases"]))
@pytest.mark.parametrize("variant", sorted(EXCESS["variants"]))
def test_excess_mtl_equals_the_authors(case, variant):
    """The authors' ExcessMTL: update, weighted heads, weights (sum T, from 1), squared sums."""
    data, ref = EXCESS["cases"][case], EXCESS["cases"][case][variant]
    t = data["grads"].shape[1]
    aggregator = ExcessMTL(robust_step_size=EXCESS["variants"][variant])
    balancer = GradientBalancer(tasks=TASKS[:t], aggregator=aggregator, heads="weighted")
    updates, heads, weights = _steps(balancer, data)
    _close(updates, ref["update"], f"excess_mtl {case} {variant} update")
    _close(heads, ref["heads"], f"excess_mtl {case} {variant} heads")
    _close(weights, ref["weights"], f"excess_mtl {case} {variant} weights")
    _close(aggregator.weighting._sq_grad_sum, ref["grad_sum"], f"excess_mtl {case} {variant} squared sums")


def test_libmtl_excess_mtl_is_the_authors():
    """LibMTL's ExcessMTL (4336804) is the authors' code: the fixture's two runs agree to the bit,
    so no LibMTL variant is needed."""
    for case, data in EXCESS["cases"].items():
        for variant in EXCESS["variants"]:
            for key in ("update", "heads", "weights", "grad_sum", "initial_w"):
                assert torch.equal(data[variant][key], data[f"libmtl_{variant}"][key]), (case, variant, key)


def test_excess_mtl_mean_scale_is_the_authors_over_t():
    """`scale: mean` (torchjd's and the paper's simplex weights, from 1/T) gives 1/T of the
    authors' update and heads, with the same weight ratios."""
    data = EXCESS["cases"]["t3"] if EXCESS["cases"] else pytest.skip("excess_mtl.pt missing")
    ref = data["fast"]
    balancer = GradientBalancer(
        tasks=TASKS[:3],
        aggregator=ExcessMTL(robust_step_size=EXCESS["variants"]["fast"], scale="mean"),
        heads="weighted",
    )
    updates, heads, weights = _steps(balancer, data)
    _close(updates * 3, ref["update"], "excess_mtl mean scale x T update")
    _close(heads * 3, ref["heads"], "excess_mtl mean scale x T heads")
    _close(weights.sum(1), torch.ones(6), "excess_mtl mean scale weights sum to 1")


def test_epoch_end_reaches_the_aggregator():
    """MoCo's `unit: epoch` counts the epochs the training module reports to the balancer."""
    balancer = GradientBalancer(tasks=TASKS[:2], aggregator=MoCo())
    balancer.on_train_epoch_end()
    assert balancer.aggregator.periods == 1


@pytest.mark.parametrize("which", ["moco", "excess_mtl"])
def test_state_resumes_from_a_checkpoint(which):
    """The aggregator travels whole in the checkpoint (GradientBalancer.checkpoint_state): a
    balancer restored after step 3 (mid-epoch for MoCo) continues exactly as the uninterrupted run;
    its state_dict loads strictly into a fresh balancer (as mtl-eval loads a checkpoint)."""
    fixture = MOCO if which == "moco" else EXCESS
    if not fixture["cases"]:
        pytest.skip(f"{which}.pt missing")
    data = fixture["cases"]["t3"]
    if which == "moco":
        make, ref, epoch_steps = (lambda: MoCo()), data["nyuv2"], MOCO["epoch_steps"]
        heads = "plain"
    else:
        make, ref, epoch_steps = (lambda: ExcessMTL(robust_step_size=1.0)), data["fast"], None
        heads = "weighted"
    first = GradientBalancer(tasks=TASKS[:3], aggregator=make(), heads=heads)
    head = {k: v[:3] for k, v in data.items() if k in ("grads", "losses", "heads")}
    _steps(first, head, epoch_steps=epoch_steps)
    state = first.checkpoint_state()
    resumed = GradientBalancer(tasks=TASKS[:3], aggregator=make(), heads=heads)
    resumed.load_state_dict(first.state_dict())  # strict: the state is not in the state_dict (mtl-eval)
    resumed.load_checkpoint_state(pickle.loads(pickle.dumps(state)))
    updates, _, _ = _steps(resumed, data, first=3, epoch_steps=epoch_steps)
    _close(updates, ref["update"][3:], f"{which} resumed at step 3")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: MoCo(beta=0.0), r"balancer.aggregator.beta must lie in \(0, 1\], got 0.0"),
        (lambda: MoCo(gamma_sigma=-1.0), r"balancer.aggregator.gamma_sigma must be >= 0, got -1.0"),
        (lambda: MoCo(normalize="l2"), r"balancer.aggregator.normalize must be one of \['loss', 'none'\], got 'l2'"),
        (lambda: MoCo(scale="max"), r"balancer.aggregator.scale must be one of \['sum', 'mean'\], got 'max'"),
        (lambda: MoCo(unit="batch"), r"balancer.aggregator.unit must be one of \['epoch', 'step'\], got 'batch'"),
        (lambda: ExcessMTL(robust_step_size=0.0), r"balancer.aggregator.robust_step_size must be > 0, got 0.0"),
        (lambda: ExcessMTL(warmup_steps=-1), r"balancer.aggregator.warmup_steps must be an integer >= 0, got -1"),
        (lambda: ExcessMTL(scale="sum_t"), r"balancer.aggregator.scale must be one of \['sum', 'mean'\], got 'sum_t'"),
        (
            lambda: GradientBalancer(tasks=TASKS[:2], aggregator=MoCo(), mode="features"),
            r"balancer.mode='features': MoCo keeps state per shared parameter",
        ),
        (
            lambda: GradientBalancer(tasks=TASKS[:2], aggregator=ExcessMTL(), mode="features"),
            r"balancer.mode='features': ExcessMTL keeps state per shared parameter",
        ),
    ],
)
def test_options_are_checked_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_moco_refuses_a_changed_jacobian_and_missing_losses():
    aggregator = MoCo()
    aggregator.combine(torch.ones(2, 5), torch.ones(2))
    with pytest.raises(
        ValueError, match=r"MoCo's tracked gradients have shape \(2, 5\), this step's Jacobian \(3, 5\)"
    ):
        aggregator.combine(torch.ones(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match="MoCo with normalize=loss needs the step's task losses"):
        MoCo().combine(torch.ones(2, 5), None)


@pytest.mark.parametrize(("name", "cls"), [("moco", MoCo), ("excess_mtl", ExcessMTL)])
def test_configs_are_the_code_defaults(name, cls):
    """conf/balancer/<name>.yaml builds the aggregator with the constructor's defaults (the authors')."""
    node = OmegaConf.load(CONFIG_DIR / "balancer" / f"{name}.yaml")
    node.seed = 0
    balancer = instantiate(node, tasks=TASKS[:2])
    assert balancer.modes == ("params",)
    defaults = cls()
    for key, value in node.aggregator.items():
        if key != "_target_":
            assert getattr(balancer.aggregator, key) == getattr(defaults, key) == value, key
