"""Training callbacks: throughput."""

from __future__ import annotations

import time
from typing import Any

import lightning as L


class ImageThroughput(L.Callback):
    """Logs `train/images_per_s`: training images per second over all processes.

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

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None and self._seen > self.warmup:
            self._timed_seconds += now - self._last
            self._timed_images += self._last_images
        self._last = now
        self._last_images = batch["image"].shape[0] * trainer.world_size
        self._seen += 1
        self._marks.append((now, self._last_images))
        self._marks = self._marks[-(self.window + 1) :]
        if len(self._marks) > 1:
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
