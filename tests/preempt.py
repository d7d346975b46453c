"""A callback that kills its own process, as a preempted or crashed job dies: used by the resume tests."""

from __future__ import annotations

import os
import signal
import signal as signal_module
import time

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs the process when the batch after optimiser step `step` starts, so every checkpoint
    written at the end of step `step` is on disk and nothing after it runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Sends `signal` to its own process when the batch after optimiser step `step` starts (on
    global rank `rank` only, if given), as Ctrl-C, a `kill` or Slurm would."""

    def __init__(self, step: int, signal: str = "SIGINT", rank: int | None = None) -> None:
        self.step, self.signum, self.rank = step, getattr(signal_module, signal), rank
        self._sent = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if self._sent or trainer.global_step != self.step or self.rank not in (None, trainer.global_rank):
            return
        self._sent = True
        os.kill(os.getpid(), self.signum)


class SlowSteps(L.Callback):
    """Sleeps `seconds` after every training batch and writes the global step into `progress_file`,
    so a test can send a real signal from outside while training runs."""

    def __init__(self, progress_file: str, seconds: float = 0.5) -> None:
        self.progress_file, self.seconds = progress_file, seconds

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        with open(self.progress_file, "w") as f:
            f.write(str(trainer.global_step))
        time.sleep(self.seconds)


class PoisonLossFrom(L.Callback):
    """Fills the training images of the batches after optimiser step `step` (up to `until`) with
    inf, so their losses and gradients are non-finite, as in a diverged run."""

    def __init__(self, step: int, until: int | None = None) -> None:
        self.step, self.until = step, until

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step and (self.until is None or trainer.global_step < self.until):
            batch["image"].fill_(float("inf"))
