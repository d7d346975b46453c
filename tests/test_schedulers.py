"""Learning-rate schedules: warmup, poly and cosine values at known steps."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_vision.engine.schedulers import cosine, poly


def _lrs(make, steps):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_poly_with_warmup():
    lrs = _lrs(lambda o: poly(o, total_steps=100, power=0.9, warmup_steps=10, warmup_ratio=0.1), 101)
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[5] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lrs[10] == pytest.approx((1 - 10 / 100) ** 0.9)
    assert lrs[50] == pytest.approx(0.5**0.9)
    assert lrs[100] == pytest.approx(0.0)


def test_cosine_with_warmup_and_floor():
    lrs = _lrs(lambda o: cosine(o, total_steps=110, warmup_steps=10, warmup_ratio=0.0, min_lr_ratio=0.1), 111)
    assert lrs[0] == 0.0
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)


def test_schedule_arguments_are_checked():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="total_steps"):
        poly(opt, total_steps=0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        cosine(opt, total_steps=10, warmup_ratio=2.0)
