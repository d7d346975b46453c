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
    with pytest.raises(ValueError, match="sched.every"):
        poly(opt, total_steps=10, every="batch")
    with pytest.raises(ValueError, match="steps per epoch"):
        cosine(opt, total_steps=10, every="epoch")


def test_per_epoch_schedules_hold_the_rate_of_the_epoch_start():
    """MTI-Net's adjust_learning_rate: base * (1 - e/E)^0.9 for all of epoch e."""
    lrs = _lrs(lambda o: poly(o, total_steps=12, steps_per_epoch=3, warmup_steps=0, every="epoch"), 12)
    expected = [(1 - e / 4) ** 0.9 for e in range(4) for _ in range(3)]
    assert lrs == pytest.approx(expected)
    lrs = _lrs(lambda o: cosine(o, total_steps=12, steps_per_epoch=3, warmup_steps=0, every="epoch"), 12)
    expected = [0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4) for _ in range(3)]
    assert lrs == pytest.approx(expected)


def test_the_trainer_hands_the_steps_per_epoch_to_the_schedule(make_cfg):
    """A real Trainer run with sched.every=epoch: 3 epochs of 2 steps, the rate set at each epoch start."""
    import lightning as L

    from mtl_vision.cli.build import build_datamodule, build_module, build_trainer

    class Rates(L.Callback):
        def __init__(self) -> None:
            self.seen: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    cfg = make_cfg(
        [
            "sched=poly",
            "sched.every=epoch",
            "sched.warmup_steps=0",
            "trainer.max_epochs=3",
            "trainer.max_steps=-1",
            "data.dataset.num_samples={train:8,val:4}",
            "trainer.limit_val_batches=0",
            "summary=false",
        ]
    )
    module = build_module(cfg, build_datamodule(cfg))
    trainer = build_trainer(cfg, module)
    rates = Rates()
    trainer.callbacks.append(rates)
    trainer.fit(module, datamodule=build_datamodule(cfg))
    base = float(cfg.optim.lr)
    assert rates.seen == pytest.approx([base * (1 - e / 3) ** 0.9 for e in range(3) for _ in range(2)])
