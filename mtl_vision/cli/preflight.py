"""Checks `mtl-train` runs before training, so that a mistake costs seconds, not an epoch: a run
that would train 0 steps, a monitor that is never computed, a `max_steps` that `max_epochs` cuts
short."""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
from omegaconf import DictConfig

from mtl_vision.data.datamodule import MultiTaskDataModule
from mtl_vision.engine.module import MultiTaskModule
from mtl_vision.errors import closest
from mtl_vision.metrics.delta_m import KEY as DELTA_M_KEY


def validation_keys(module: MultiTaskModule) -> list[str]:
    """Every key a validation of this module logs (metrics computed on an empty state give the keys)."""
    keys = ["val/loss"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keys += [f"val/{task}/loss" for task in module.tasks]
        for task in module.eval_tasks:
            keys += [f"val/{task}/{k}" for k in copy.deepcopy(module.metrics[task]).compute()]
    if module.delta_m is not None and module.delta_m.covers(module.eval_tasks):
        keys.append(f"val/{DELTA_M_KEY}")
    return keys


def check_monitor(monitor: str, module: MultiTaskModule) -> None:
    keys = validation_keys(module)
    if monitor not in keys:
        shown = [k for k in keys if "/IoU/" not in k]
        close = closest(monitor, keys)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"monitor={monitor!r} is not computed by this run{hint} (it logs {shown})")


def _batches(limit: int | float | None, available: int) -> int:
    if limit is None:
        return available
    if isinstance(limit, float) and limit <= 1.0:
        return int(available * limit)
    return min(int(limit), available)


def training_steps_per_epoch(cfg: DictConfig, datamodule: MultiTaskDataModule, world_size: int) -> int:
    """Optimiser steps in one epoch as the trainer will run it; raises when there are none."""
    datamodule.setup("fit")
    samples = len(datamodule.train_set)
    per_process = samples // world_size
    batches = _batches(cfg.trainer.get("limit_train_batches"), per_process // datamodule.batch_size)
    if batches == 0:
        raise ValueError(
            f"this run would train 0 steps: the {datamodule.train_split!r} split has {samples} samples, "
            f"{per_process} per process on {world_size} process(es), "
            f"fewer than data.batch_size={datamodule.batch_size} "
            f"(incomplete batches are dropped); lower data.batch_size or trainer.devices"
            + (", or raise trainer.limit_train_batches" if cfg.trainer.get("limit_train_batches") is not None else "")
        )
    return math.ceil(batches / (cfg.trainer.get("accumulate_grad_batches") or 1))


def check_validation(cfg: DictConfig, datamodule: MultiTaskDataModule) -> None:
    datamodule.setup("validate")
    samples = len(datamodule.val_set)
    limit = cfg.trainer.get("limit_val_batches")
    batches = _batches(limit, math.ceil(samples / datamodule.val_batch_size))
    if batches == 0:
        why = f"trainer.limit_val_batches={limit}" if samples else f"the {datamodule.val_split!r} split is empty"
        raise ValueError(
            f"this run validates on 0 samples ({why}), but monitor={cfg.monitor!r} and metrics.json come from "
            "validation; give it validation batches"
        )


def check_length(cfg: DictConfig, steps_per_epoch: int, resume_step: int) -> str | None:
    """Raises on a `max_steps` beyond what `max_epochs` allows; returns a warning when a resumed
    run has nothing left to train (its final weights are validated again)."""
    max_steps, max_epochs = cfg.trainer.get("max_steps", -1), cfg.trainer.get("max_epochs")
    if max_epochs is not None and max_epochs >= 0:
        epoch_limit = max_epochs * steps_per_epoch
        if max_steps is not None and max_steps > epoch_limit:
            raise ValueError(
                f"trainer.max_steps={max_steps} is never reached: trainer.max_epochs={max_epochs} ends training at "
                f"step {epoch_limit} ({steps_per_epoch} steps per epoch); set trainer.max_epochs=-1 (or larger)"
            )
    else:
        epoch_limit = None
    step_limit = max_steps if max_steps is not None and max_steps >= 0 else None
    limits = [v for v in (epoch_limit, step_limit) if v is not None]
    if resume_step == 0 and limits and min(limits) == 0:
        raise ValueError(
            f"this run would train 0 steps (trainer.max_steps={max_steps}, trainer.max_epochs={max_epochs}); "
            "use mtl-eval to evaluate a checkpoint"
        )
    if resume_step > 0 and limits and min(limits) <= resume_step:
        return (
            f"nothing to train: the checkpoint is at step {resume_step} and this run stops at step {min(limits)} "
            f"(trainer.max_steps={max_steps}, trainer.max_epochs={max_epochs}); raise trainer.max_steps or "
            "trainer.max_epochs to continue it"
        )
    return None


def preflight(
    cfg: DictConfig, datamodule: MultiTaskDataModule, module: MultiTaskModule, trainer: L.Trainer, resume_step: int
) -> str | None:
    """Everything about a run that can be checked before training (see the module docstring);
    returns a warning for the log, if any."""
    check_monitor(cfg.monitor, module)
    steps = training_steps_per_epoch(cfg, datamodule, trainer.world_size)
    check_validation(cfg, datamodule)
    if cfg.trainer.get("fast_dev_run"):
        return None
    return check_length(cfg, steps, resume_step)
