"""Validation metrics averaged over the last epochs of training, as MTAN and the balancing papers
report NYUv2 and Cityscapes (lorenmt/mtan README: "averaged the performance for each task from the
last 10 epochs"; nash-mtl `experiments/nyuv2/README.md`: "test performance averaged over the last
10 epochs"; FAMO likewise). Their Δm is linear in the metrics, so the mean of `val/delta_m` equals
the Δm of the mean metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from mtl_vision.fileio import atomic_write_text

__all__ = ["LastEpochsMean"]


class LastEpochsMean(L.Callback):
    """Keeps every `val/...` scalar of the validations during `fit` (not the sanity check, not a
    later `validate`) and writes, after each one, the mean of each key over the last `epochs`
    validations to `path` as a flat JSON dict (the keys of metrics.json, plus `"validations"`: how
    many were averaged). Its history is saved in checkpoints, so a resumed run averages the same.

    Args:
        epochs: how many of the last validations to average (theirs: 10).
        path: the JSON file written (e.g. `<run dir>/metrics_last10.json`).
    """

    def __init__(self, *, epochs: int = 10, path: str) -> None:
        if epochs < 1:
            raise ValueError(f"callbacks.last_epochs.epochs={epochs}: expected at least 1")
        self.epochs = int(epochs)
        self.path = Path(path)
        self.history: list[dict[str, float]] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        self.history = [*self.history, metrics][-self.epochs :]
        if trainer.is_global_zero:
            atomic_write_text(self.path, json.dumps(self.mean(), indent=2, sort_keys=True) + "\n")

    def mean(self) -> dict[str, float]:
        """Mean over the kept validations of every key that all of them have."""
        if not self.history:
            return {}
        keys = set.intersection(*(set(h) for h in self.history))
        out: dict[str, Any] = {k: math.fsum(h[k] for h in self.history) / len(self.history) for k in sorted(keys)}
        out["validations"] = len(self.history)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])][-self.epochs :]
