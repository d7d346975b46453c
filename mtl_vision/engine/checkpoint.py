"""Checkpoints: atomic writes (a kill during a save never leaves a truncated checkpoint) and the
global random states a resumed run restores."""

from __future__ import annotations

import os
import pickle
import random
import types
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<path>.tmp-<pid>`, flushes it to disk, then renames it over `<path>`.

    The rename is atomic on POSIX file systems, so readers (and a requeued job resuming from
    `last.ckpt`) see either the previous complete file or the new complete file. A process killed
    in the middle of a save leaves its temporary file behind; the next successful save of the same
    path removes it (only rank 0 writes checkpoints, so no other writer's file is in progress).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        for stale in target.parent.glob(f"{target.name}.tmp-*"):
            stale.unlink(missing_ok=True)


class _Absent(dict):
    """Stands for an object of a class this environment cannot import (another codebase's config:
    yacs' `CfgNode`, an EasyDict, ...), so that the weights beside it can still be read. A dict
    subclass, as such configs mostly are, keeping whatever the pickle hands it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except (TypeError, ValueError):
            self.args = args

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.state = state


class _LenientUnpickler(pickle.Unpickler):
    """`find_class` that gives an `_Absent` subclass (named as the missing class) for a module or
    class this environment lacks, instead of failing the whole file."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Absent,), {"__module__": f"absent.{module}"})


_lenient_pickle = types.ModuleType("lenient_pickle")
_lenient_pickle.Unpickler = _LenientUnpickler
_lenient_pickle.load = lambda f, **kw: _LenientUnpickler(f, **kw).load()
_lenient_pickle.__name__ = "pickle"


def read_checkpoint(path: str | os.PathLike, *, name: str, foreign: bool = False) -> Any:
    """A checkpoint file loaded on the CPU, memory-mapped where its format allows (tensors are then
    read from disk only when used). Our own files hold the run config and callback states, plain
    Python objects, so `weights_only` is off. `name` says in errors how the file was given
    (`ckpt='...'`, `init_from='...'`). `foreign`: another codebase's file, whose objects of classes
    this environment lacks (its config: yacs' CfgNode in MTLoRA's) are read as stand-ins.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file cannot be read as a checkpoint (truncated, foreign, not a torch file).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{name}: no such checkpoint file")
    extra = {"pickle_module": _lenient_pickle} if foreign else {}
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=True, **extra)
        except RuntimeError:  # not a zip-format file, which mmap needs: the plain load says what it is
            return torch.load(path, map_location="cpu", weights_only=False, **extra)
    except Exception as err:  # truncated or foreign files fail in many ways inside torch.load
        reason = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"{name} could not be read as a checkpoint ({type(err).__name__}: {reason})") from None


RNG_KEY = "rng_states"


def rng_states() -> dict[str, Any]:
    """The global random states of torch (CPU and every CUDA device), numpy and Python, as tensors
    and plain Python values (loadable with `torch.load(weights_only=True)`)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the global random states saved by `rng_states` (CUDA devices this machine lacks are
    left out; devices the checkpoint lacks keep their state)."""
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        for device, state in enumerate(states.get("cuda", [])[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])


class LastCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` at the end of every validation during fitting, every
    `every_n_train_steps` optimiser steps and after the last step of training, so a crashed or
    killed run resumes from at most that many steps back, and a finished run can be continued with
    a larger `max_steps` or `max_epochs`. It is the only writer of last.ckpt: Lightning's
    ModelCheckpoint (from 2.6) refreshes its `save_last` file only at validations that improve the
    best checkpoint, so a crash would lose every epoch since the best one.

    Every write happens at the end of a training batch or of a validation, the points from which
    Lightning and the data loader's position (`data.sampling.ResumableLoader`) resume exactly. A
    checkpoint written after `fit` returns would not do: Lightning marks the interrupted epoch as
    completed by then, so a continued run would skip the rest of it.

    Args:
        dirpath: the run's checkpoint folder.
        every_n_train_steps: steps between writes; 0 turns the periodic writes off (the final
            one stays).
    """

    def __init__(self, *, dirpath: str | os.PathLike, every_n_train_steps: int = 1000) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_train_steps = every_n_train_steps
        self._saved_step: int | None = None

    @staticmethod
    def is_final_batch(trainer: L.Trainer, batch_idx: int) -> bool:
        """Whether training ends after this batch (max_steps reached, or the last batch of the
        last epoch)."""
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return True
        max_epochs = trainer.max_epochs
        last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
        return last_epoch and batch_idx + 1 >= trainer.num_training_batches

    def save(self, trainer: L.Trainer) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)  # every rank calls it; the strategy writes on rank 0
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.save(trainer)  # also after a batch-end write of the same step: validation moved the state on

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:  # fmt: skip
        step = trainer.global_step
        if step == self._saved_step:
            return
        periodic = self.every_n_train_steps and step % self.every_n_train_steps == 0
        if periodic or self.is_final_batch(trainer, batch_idx):
            self.save(trainer)
