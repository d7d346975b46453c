"""Ctrl-C, SIGTERM and Slurm's SIGUSR1: finish the step, write a checkpoint, say how to resume.

Lightning answers Ctrl-C by stopping wherever the signal lands and saving nothing, and its Slurm
handler writes the hpc checkpoint from inside the signal handler, in the middle of a step, which a
resumed run cannot continue exactly. `GracefulStop` only notes the signal; at the end of the
current training batch (the point `LastCheckpoint` writes at, from which resume is exact) every
process agrees to stop, the checkpoint is written atomically, and `TrainingInterrupted` ends the
run at the next hook (once Lightning has logged the saved step). SIGUSR1 inside a Slurm job
writes `hpc_ckpt_<n>.ckpt` into the run directory and requeues the job with `scontrol requeue`;
the requeued job finds its directory and resumes from that file. A second Ctrl-C aborts at once,
without saving (the previous checkpoints stay as they were).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L

from mtl_vision.slurm import slurm_job_id

log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on a signal after writing `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path, step: int, requeued: bool = False) -> None:
        self.signum, self.checkpoint, self.step, self.requeued = signum, checkpoint, step, requeued
        name = signal.Signals(signum).name
        super().__init__(f"{name} at step {step}: wrote {checkpoint}" + ("; job requeued" if requeued else ""))


def next_hpc_path(run_dir: str | os.PathLike) -> Path:
    """`<run dir>/hpc_ckpt_<n>.ckpt` with n one more than the largest there (Lightning's naming)."""
    found = (re.search(r"_(\d+)\.ckpt$", p.name) for p in Path(run_dir).glob("hpc_ckpt_*.ckpt"))
    numbers = [int(m.group(1)) for m in found if m]
    return Path(run_dir) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


class GracefulStop(L.Callback):
    """Stops training cleanly on SIGINT and SIGTERM (and SIGUSR1 inside a Slurm job).

    Args:
        dirpath: the run's checkpoint folder; `last.ckpt` there is written on SIGINT and SIGTERM.
        run_dir: where `hpc_ckpt_<n>.ckpt` goes on SIGUSR1 (where `mtl-train` looks for it).
        requeue: on SIGUSR1 inside a Slurm job, run `scontrol requeue <job id>` after the save.
    """

    def __init__(self, *, dirpath: str | os.PathLike, run_dir: str | os.PathLike, requeue: bool = True) -> None:
        self.last_path = Path(dirpath) / "last.ckpt"
        self.run_dir = Path(run_dir)
        self.requeue = requeue
        self.received: int | None = None
        self._stopping: TrainingInterrupted | None = None
        self._previous: dict[int, Any] = {}

    def _signals(self) -> list[int]:
        signals = [signal.SIGINT, signal.SIGTERM]
        if slurm_job_id() is not None:
            signals.append(signal.SIGUSR1)
        return signals

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            self._restore()
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, save nothing
        if self.received is None:
            self.received = signum
            log.warning(
                "received %s: stopping after this step and writing a checkpoint%s",
                signal.Signals(signum).name,
                " (Ctrl-C again to abort without saving)" if signum == signal.SIGINT else "",
            )

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning's own handlers are installed (it restores the originals at teardown)
        if threading.current_thread() is not threading.main_thread():
            return
        self.received, self._stopping = None, None
        for signum in self._signals():
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        stop = self.received is not None
        if trainer.world_size > 1:  # every process stops at the same step, whichever got the signal
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop or self._stopping is not None:
            return
        signum = trainer.strategy.broadcast(self.received or signal.SIGTERM, src=0)
        job = slurm_job_id()
        requeue = signum == signal.SIGUSR1 and job is not None
        path = next_hpc_path(self.run_dir) if requeue else self.last_path
        trainer.save_checkpoint(path, weights_only=False)
        requeued = False
        if requeue and self.requeue and trainer.is_global_zero:
            result = subprocess.call(["scontrol", "requeue", job])
            requeued = result == 0
            if not requeued:
                log.warning("scontrol requeue %s failed with exit code %s", job, result)
        self._stopping = TrainingInterrupted(signum, path, trainer.global_step, requeued)

    def _stop_if_saved(self, trainer: L.Trainer) -> None:
        """Raised at the next hook after the save, once Lightning has logged the saved step."""
        if self._stopping is None:
            return
        for logger in trainer.loggers:
            logger.save()
        stopping, self._stopping = self._stopping, None
        raise stopping

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._stop_if_saved(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_if_saved(trainer)
