"""Non-finite steps: skipped, counted, and a run that keeps producing them stopped with one line.

A loss or gradient that is inf or NaN would otherwise be applied by the optimiser and poison the
weights (and, through the forward pass, BatchNorm's running statistics) for the rest of the run,
and then be written into every checkpoint. `NonFiniteGuard` checks the gradients once per
optimiser step, after they are complete (and unscaled under `16-mixed`) and before the optimiser
uses them. A non-finite step is undone: its gradients are dropped, so no parameter and no
optimiser state moves, and the buffers (BatchNorm statistics and counts) are put back to what they
were before the step's forward passes. Under DDP the gradients are already averaged over the
processes, so every rank takes the same decision without talking to the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mtl_vision.errors import TrainingStopped


class NonFiniteTrainingError(TrainingStopped):
    """Too many optimiser steps in a row had a non-finite loss or gradient."""


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every element of every floating tensor is finite (one host synchronisation).

    Through the fused kernel GradScaler checks gradients with (its unscale by 1.0 leaves the values
    as they are): ten times faster on CPU than `isfinite().all()` per tensor.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    flags = []
    for (device, dtype), group in groups.items():
        found = torch.zeros(1, device=device)
        try:
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, torch.ones(1, device=device))
            flags.append(found[0] == 0)
        except (RuntimeError, NotImplementedError):  # a dtype the kernel does not take
            flags += [t.isfinite().all() for t in group]
    return bool(torch.stack([f.to("cpu") for f in flags]).all()) if flags else True


def non_finite_keys(state: Mapping[str, Tensor], limit: int = 5) -> list[str]:
    """The first `limit` keys of a state dict whose floating tensors hold inf or NaN."""
    if all_finite(v for v in state.values() if isinstance(v, Tensor)):  # one fused check in the usual case
        return []
    bad = []
    for key, value in state.items():
        if isinstance(value, Tensor) and value.is_floating_point() and not bool(value.isfinite().all()):
            bad.append(key)
            if len(bad) >= limit:
                break
    return bad


class NonFiniteGuard:
    """Skips optimiser steps with non-finite gradients and restores the buffers they changed.

    Args:
        max_consecutive: raise `NonFiniteTrainingError` when this many steps in a row were skipped
            (0: never). Under `16-mixed` the first steps of a run may overflow while GradScaler
            lowers its scale; those are skipped and counted too, which the default allows for.
    """

    def __init__(self, *, max_consecutive: int = 25) -> None:
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0  # steps skipped in the whole run (restored on resume)
        self.consecutive = 0
        self._buffers: list[tuple[Tensor, Tensor]] = []

    def snapshot(self, model: nn.Module) -> None:
        """Remember the buffers (BatchNorm statistics and batch counts) before the forward passes
        of an optimiser step."""
        buffers = list(model.buffers())
        if len(buffers) != len(self._buffers) or any(
            b.shape != c.shape or b.device != c.device for b, (_, c) in zip(buffers, self._buffers)
        ):
            self._buffers = [(b, b.detach().clone()) for b in buffers]
        elif buffers:
            torch._foreach_copy_([c for _, c in self._buffers], [b.detach() for b in buffers])

    def check(self, params: Iterable[nn.Parameter]) -> bool:
        """True if the step may go ahead; otherwise the step is undone and counted (see `skip`).

        A step whose forward passes made a buffer non-finite is undone too: BatchNorm can turn
        overflowing activations into inf statistics while normalising the gradients back to
        finite values."""
        params = list(params)
        grads = [p.grad for p in params if p.grad is not None]
        if all_finite([*grads, *(b for b, _ in self._buffers)]):
            self.consecutive = 0
            return True
        self.skip(params)
        return False

    def skip(self, params: Iterable[nn.Parameter]) -> None:
        """Undo a step: drop its gradients (the optimiser then moves nothing) and restore the
        buffers of the last `snapshot`."""
        for p in params:
            p.grad = None
        with torch.no_grad():
            for buffer, copy in self._buffers:
                buffer.copy_(copy)
        self.skipped += 1
        self.consecutive += 1

    @property
    def exhausted(self) -> bool:
        return self.max_consecutive > 0 and self.consecutive >= self.max_consecutive

    def error(self, step: int, losses: Mapping[str, float], lr: float | None) -> NonFiniteTrainingError:
        shown = ", ".join(f"{t}={v:.4g}" for t, v in losses.items())
        cause = (
            f"the learning rate is too high (lr={lr:g}) or a target holds inf/NaN"
            if lr is not None
            else "the learning rate is too high or a target holds inf/NaN"
        )
        return NonFiniteTrainingError(
            f"training stopped at step {step}: {self.consecutive} optimiser steps in a row had a non-finite loss, "
            f"gradient or BatchNorm statistic (last losses: {shown}); likely cause: {cause}. "
            "Nothing non-finite was applied or saved; "
            f"lower optim.lr, or raise guard.max_consecutive_nonfinite (now {self.max_consecutive}) to wait longer"
        )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))
