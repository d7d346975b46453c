"""Learning-rate schedules stepped every optimiser step, with linear warmup.

`poly` is the schedule of the dense-prediction references (MTI-Net, InvPT: power 0.9);
`cosine` decays to `min_lr_ratio` of the base rate. Both are `LambdaLR`s, so their state is the
step count and resumes exactly.

`every="epoch"` holds the rate for a whole epoch at the value of the epoch's start, as codebases
that set the rate once per epoch do (MTI-Net's `adjust_learning_rate`: base * (1 - e/E)^0.9 in
epoch e of E); the decay then runs over epochs, the warmup still over steps.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(total_steps: int, warmup_steps: int, warmup_ratio: float) -> None:
    if total_steps < 1:
        raise ValueError(f"sched: total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"sched.warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"sched.warmup_ratio must lie in [0, 1], got {warmup_ratio}")


EVERY = ("step", "epoch")


def _progress(step: int, total_steps: int, every: str, steps_per_epoch: int | None) -> float:
    """Share of the schedule done at `step`: by steps, or by whole epochs with `every="epoch"`."""
    if every not in EVERY:
        raise ValueError(f"sched.every={every!r}: expected one of {list(EVERY)}")
    if every == "step":
        return min(step, total_steps) / total_steps
    if not steps_per_epoch or steps_per_epoch < 1:
        raise ValueError("sched.every=epoch needs the number of steps per epoch (train with trainer.max_epochs)")
    epochs = max(math.ceil(total_steps / steps_per_epoch), 1)
    return min(step // steps_per_epoch, epochs) / epochs


def _warmup(step: int, warmup_steps: int, warmup_ratio: float) -> float | None:
    """Factor during warmup (linear from warmup_ratio to 1), None after it."""
    if step >= warmup_steps:
        return None
    return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps


def poly(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    power: float = 0.9,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-3,
    min_lr_ratio: float = 0.0,
    every: str = "step",
) -> LambdaLR:
    """lr = base * max(min_lr_ratio, (1 - t/T)^power) after a linear warmup; t/T counts steps,
    or whole epochs with `every="epoch"`."""
    _check(total_steps, warmup_steps, warmup_ratio)
    _progress(0, total_steps, every, steps_per_epoch)

    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps, warmup_ratio)
        if warm is not None:
            return warm
        progress = _progress(step, total_steps, every, steps_per_epoch)
        return max(min_lr_ratio, (1.0 - progress) ** power)

    return LambdaLR(optimizer, factor)


def cosine(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    warmup_steps: int = 0,
    warmup_ratio: float = 1e-3,
    min_lr_ratio: float = 0.0,
    every: str = "step",
) -> LambdaLR:
    """Half-cosine from base to base * min_lr_ratio over the steps after warmup, or over the
    epochs with `every="epoch"` (rate held within an epoch)."""
    _check(total_steps, warmup_steps, warmup_ratio)
    _progress(0, total_steps, every, steps_per_epoch)

    def factor(step: int) -> float:
        warm = _warmup(step, warmup_steps, warmup_ratio)
        if warm is not None:
            return warm
        if every == "epoch":
            progress = _progress(step, total_steps, every, steps_per_epoch)
        else:
            span = max(total_steps - warmup_steps, 1)
            progress = min(step - warmup_steps, span) / span
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int | None = None,
    step_size: int = 100,
    gamma: float = 0.5,
    every: str = "epoch",
) -> LambdaLR:
    """lr = base * gamma^(k // step_size), k the epoch (`every="epoch"`, torch's `StepLR` stepped
    once per epoch, as MTAN and the Nash-MTL/FAMO NYUv2 trainers do) or the optimiser step."""
    _check(total_steps, 0, 0.0)
    _progress(0, total_steps, every, steps_per_epoch)
    if step_size < 1 or not 0.0 < gamma <= 1.0:
        raise ValueError(f"sched.step_size={step_size}, sched.gamma={gamma}: expected step_size >= 1 and 0 < gamma <= 1")

    def factor(i: int) -> float:
        k = i // steps_per_epoch if every == "epoch" else i
        return gamma ** (k // step_size)

    return LambdaLR(optimizer, factor)
