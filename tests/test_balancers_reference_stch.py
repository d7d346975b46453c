"""STCH against the authors' code (Xi-L/STCH, equal to LibMTL's) on the shared fixture inputs.

Fixture (scripts/balancer_fixtures.py stch): their STCH class driven as their trainer drives it
over 6 steps, for several (mu, warm-up epochs, steps per epoch) settings, on linear task losses of
one shared vector x whose values and gradients are the cases of balancer_fixtures.common. Here our
balancer runs the same steps the way the training module calls it: `total = balancer(losses)`,
`total.backward()`, `after_step()`, `on_train_epoch_end()` at epoch ends.
"""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from mtl_vision.balancing import STCH
from mtl_vision.cli import CONFIG_DIR
from tests.reference import assert_equal_to_reference
from tests.test_balancers_reference_weighting import CASES, ORDER, _fixture


def _run(balancer: STCH, case: dict, *, epoch_steps: int | None, start: int = 0, stop: int | None = None) -> dict:
    """Our balancer over steps [start, stop) of the case: per step the total, d total / d L,
    x.grad, the nadir buffer (float64) and whether STCH (not the warm-up) was used."""
    grads, values = case["grads"].float(), case["losses"].float()
    tasks = ORDER[: grads.shape[1]]
    x = torch.zeros(grads.shape[2], requires_grad=True)
    balancer.train()
    record: dict[str, list] = {"total": [], "loss_grad": [], "shared_grad": [], "nadir": [], "stch": []}
    for k in range(start, grads.shape[0] if stop is None else stop):
        value = values[k].clone().requires_grad_()
        lin = grads[k] @ x
        stacked = lin - lin.detach() + value
        x.grad = None
        record["stch"].append(bool(balancer.has_nadir))
        total = balancer({t: stacked[i] for i, t in enumerate(tasks)})
        total.backward()
        record["total"].append(total.detach().double())
        record["loss_grad"].append(value.grad.double())
        record["shared_grad"].append(x.grad.double())
        balancer.after_step(None)
        if epoch_steps is not None and (k + 1) % epoch_steps == 0:
            balancer.on_train_epoch_end()
        record["nadir"].append(balancer.nadir.double().clone())
    return {key: torch.stack([torch.as_tensor(v) for v in values]) for key, values in record.items()}


def _compare(ours: dict, theirs: dict, what: str) -> None:
    for key in ("total", "loss_grad", "shared_grad"):
        assert_equal_to_reference(ours[key], theirs[key], f"{what} {key}")
    # their nadir vector is set at the first STCH step, ours at the end of the averaging epoch
    stch = theirs["nadir"].abs().sum(dim=1) > 0
    assert torch.equal(ours["stch"], stch), f"{what}: STCH steps {ours['stch'].tolist()} != theirs {stch.tolist()}"
    assert_equal_to_reference(ours["nadir"][stch], theirs["nadir"][stch], f"{what} nadir")


@pytest.mark.parametrize("case", CASES)
def test_stch_equals_the_authors_code(case):
    fx = _fixture("stch")
    data = fx["cases"][case]
    for setting, (mu, warmup, epoch_steps) in fx["settings"].items():
        theirs = fx["results"][setting][case]
        ours = _run(STCH(tasks=ORDER[: data["grads"].shape[1]], mu=mu, warmup=warmup), data, epoch_steps=epoch_steps)
        _compare(ours, theirs, f"STCH {setting} {case}")
        assert ours["stch"][-1], f"{setting}: the last step should be past the warm-up"
        if epoch_steps == 1:  # one step per epoch: the step unit takes the same path
            balancer = STCH(tasks=ORDER[: data["grads"].shape[1]], mu=mu, warmup=warmup, warmup_unit="step")
            _compare(_run(balancer, data, epoch_steps=None), theirs, f"STCH step unit {setting} {case}")


def test_stch_resumes_exactly_from_its_state_dict():
    fx = _fixture("stch")
    data = fx["cases"]["t3"]
    mu, warmup, epoch_steps = fx["settings"]["mu1_warmup1_epoch2"]
    first = STCH(tasks=ORDER[:3], mu=mu, warmup=warmup)
    _run(first, data, epoch_steps=epoch_steps, stop=4)  # through the averaging epoch
    resumed = STCH(tasks=ORDER[:3], mu=mu, warmup=warmup)
    resumed.load_state_dict(first.state_dict())
    ours = _run(resumed, data, epoch_steps=epoch_steps, start=4)
    theirs = fx["results"]["mu1_warmup1_epoch2"]["t3"]
    for key in ("total", "loss_grad", "shared_grad"):
        assert_equal_to_reference(ours[key], theirs[key][4:], f"resumed STCH {key}")
    assert set(first.state_dict()) == {"periods", "loss_sum", "loss_count", "nadir", "has_nadir"}


def test_stch_logs_its_gradient_weights_and_leaves_its_state_in_eval_mode():
    balancer = STCH(tasks=ORDER[:2], warmup=0, warmup_unit="step")
    losses = {"semseg": torch.tensor(2.0, requires_grad=True), "depth": torch.tensor(0.5, requires_grad=True)}
    balancer.eval()
    balancer(losses)
    assert float(balancer.loss_count) == 0
    balancer.train()
    total = balancer(losses)
    total.backward()
    for t in ORDER[:2]:
        torch.testing.assert_close(balancer.last_weights[t], losses[t].grad)
    torch.testing.assert_close(balancer.last_weights["depth"], torch.tensor(2.0))  # d log L / d L = 1 / L
    balancer.after_step()
    assert bool(balancer.has_nadir) and torch.equal(balancer.nadir, torch.tensor([2.0, 0.5]))


def test_stch_config_defaults_are_the_authors_and_the_code_defaults():
    cfg = OmegaConf.load(CONFIG_DIR / "balancer" / "stch.yaml")
    built = instantiate(cfg, tasks=["semseg", "depth"])
    default = STCH(tasks=["semseg", "depth"])
    assert (built.mu, built.warmup, built.warmup_unit) == (1.0, 4, "epoch")
    assert (default.mu, default.warmup, default.warmup_unit) == (built.mu, built.warmup, built.warmup_unit)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mu": 0.0}, "balancer.mu must be > 0, got 0.0"),
        ({"warmup": -1}, "balancer.warmup must be an integer >= 0"),
        ({"warmup": 1.5}, "balancer.warmup must be an integer >= 0"),
        ({"warmup_unit": "epochs"}, "balancer.warmup_unit must be one of ['epoch', 'step'], got 'epochs'"),
    ],
)
def test_stch_config_errors_name_the_key_and_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        STCH(tasks=["semseg", "depth"], **kwargs)
