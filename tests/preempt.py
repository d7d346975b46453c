"""A callback that kills its own process, as a preempted or crashed job dies: used by the resume tests."""

from __future__ import annotations

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """SIGKILLs the process when the batch after optimiser step `step` starts, so every checkpoint
    written at the end of step `step` is on disk and nothing after it runs."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
