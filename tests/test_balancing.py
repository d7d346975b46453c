"""EW and fixed balancers: weights, totals and config errors."""

from __future__ import annotations

import pytest
import torch

from mtl_vision.balancing import EqualWeighting, FixedWeighting


def _losses():
    return {"semseg": torch.tensor(2.0, requires_grad=True), "depth": torch.tensor(0.5, requires_grad=True)}


def test_equal_weighting_is_the_sum():
    bal = EqualWeighting(tasks=["semseg", "depth"])
    losses = _losses()
    total = bal(losses)
    assert total.item() == pytest.approx(2.5)
    total.backward()
    assert losses["depth"].grad.item() == 1.0
    assert {t: float(w) for t, w in bal.last_weights.items()} == {"semseg": 1.0, "depth": 1.0}
    assert not bal.needs_task_gradients


def test_fixed_weighting_uses_given_weights_and_ignores_other_tasks():
    bal = FixedWeighting(tasks=["semseg", "depth"], weights={"semseg": 1.0, "depth": 10.0, "edge": 50.0})
    assert bal(_losses()).item() == pytest.approx(2.0 + 5.0)
    assert float(bal.last_weights["depth"]) == 10.0


def test_fixed_weighting_errors_name_the_problem():
    with pytest.raises(ValueError, match="depth"):
        FixedWeighting(tasks=["semseg", "depth"], weights={"semseg": 1.0})
    with pytest.raises(ValueError, match="non-negative"):
        FixedWeighting(tasks=["semseg"], weights={"semseg": -1.0})


def test_balancer_rejects_mismatched_losses():
    bal = EqualWeighting(tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match="missing"):
        bal({"semseg": torch.tensor(1.0)})
