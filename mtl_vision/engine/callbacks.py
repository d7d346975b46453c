"""Training callbacks: throughput and GPU memory."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch


def logs_this_step(trainer: L.Trainer | None) -> bool:
    """Whether the loggers write this training step's values (every `trainer.log_every_n_steps`
    optimiser steps, and every step of `fast_dev_run`): a step-wise value logged on another step
    reaches no logger, so it need not be logged at all (each `self.log` costs about 0.1-0.5 ms of
    host time). True outside a Trainer."""
    if trainer is None:
        return True
    # the check Lightning itself makes before writing a step's values (LearningRateMonitor's too)
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


class ImageThroughput(L.Callback):
    """Logs `train/images_per_s`: training images per second over all processes (on the steps
    the loggers write, `trainer.log_every_n_steps`).

    Measured from batch start to batch start over a window of `window` steps, so data loading,
    forward, backward and the optimiser step are all counted; the first `warmup` steps (worker
    start-up, allocator warm-up) are left out of `mean_images_per_s`.
    """

    def __init__(self, *, window: int = 10, warmup: int = 5) -> None:
        self.window = window
        self.warmup = warmup
        self._marks: list[tuple[float, int]] = []
        self._seen = 0
        self._timed_images = 0
        self._timed_seconds = 0.0
        self._last: float | None = None
        self._last_images = 0

    @property
    def mean_images_per_s(self) -> float | None:
        return self._timed_images / self._timed_seconds if self._timed_seconds > 0 else None

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._last is not None and self._seen > self.warmup:
            self._timed_seconds += now - self._last
            self._timed_images += self._last_images
        self._last = now
        self._last_images = batch["image"].shape[0] * trainer.world_size
        self._seen += 1
        self._marks.append((now, self._last_images))
        self._marks = self._marks[-(self.window + 1) :]
        if len(self._marks) > 1 and logs_this_step(trainer):
            span = self._marks[-1][0] - self._marks[0][0]
            images = sum(n for _, n in self._marks[:-1])
            if span > 0:
                pl_module.log("train/images_per_s", images / span, prog_bar=True, batch_size=1)

    def _pause(self) -> None:
        # Validation and epoch boundaries are not training time.
        self._last = None
        self._marks = []

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pause()


class GpuMemory(L.Callback):
    """Logs `train/gpu_mem_gib`: the peak GPU memory allocated by tensors (GiB) over the last
    `every_n_steps` training batches, the largest over all processes; the peak is reset after
    each log. Logs nothing when the module is not on a CUDA device."""

    def __init__(self, *, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            raise ValueError(f"GpuMemory: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._batches = 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        device = pl_module.device
        if device.type != "cuda":
            return
        self._batches += 1
        if self._batches % self.every_n_steps:
            return
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        # every process reaches this batch, so the max over processes is one all-reduce per window
        pl_module.log("train/gpu_mem_gib", peak, sync_dist=True, reduce_fx="max", batch_size=1)
        torch.cuda.reset_peak_memory_stats(device)
