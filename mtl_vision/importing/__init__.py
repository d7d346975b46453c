"""Checkpoints of other codebases turned into mtl_vision checkpoints (`mtl-import`).

One module per codebase (`mtl_vision/importing/<source>.py`) knows how that codebase names its
weights: `to_ours(state, tasks=...)` renames the authors' state dict (after `read_state` has
unwrapped it) into the keys of our `MultiTaskModel`, converting tensors where the two
parametrisations differ, and dropping only the weights that the authors' forward never uses
(each module lists them). Everything else is common: reading the file as the authors' code saves
it (`{'model': state_dict}` or a bare state dict, DDP's `module.` prefix), the strict check that
the converted weights fill our model exactly (every missing, unexpected and mis-shaped key named),
and writing a checkpoint that `mtl-eval`, `mtl-predict` and `init_from` accept. Nothing is
written when any check fails.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from mtl_vision.engine.checkpoint import read_checkpoint
from mtl_vision.engine.weights import compare_weights, some_keys
from mtl_vision.errors import closest

__all__ = ["SOURCES", "convert", "load_exactly", "read_state"]

SOURCES: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))
WRAPPERS = ("model", "state_dict", "model_state_dict", "net")  # keys under which codebases save the weights
DDP_PREFIX = "module."


def read_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The weights of a checkpoint as another codebase saves it: a bare state dict, or one under
    'model' (InvPT, TaskPrompter, MLoRE, MTI-Net, MTLoRA), 'state_dict' or 'model_state_dict'; DDP's
    `module.` prefix removed. Objects of classes this environment lacks (MTLoRA's yacs config) are
    read as stand-ins, so the weights load without the other codebase's packages.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a checkpoint or holds no state dict of tensors.
    """
    name = f"file={str(path)!r}"
    state = read_checkpoint(path, name=name, foreign=True)
    for key in WRAPPERS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{name} holds no state dict (looked for a dict of tensors, or one under {list(WRAPPERS)})")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{name}: entries that are not tensors, so this is no state dict: {some_keys(bad)}")
    if all(k.startswith(DDP_PREFIX) for k in state):
        state = {k[len(DDP_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def convert(source: str, state: Mapping[str, Tensor], *, tasks: Sequence[str]) -> dict[str, Tensor]:
    """`state` (the authors' keys) in the keys of our MultiTaskModel, by `mtl_vision.importing.<source>`."""
    if source not in SOURCES:
        close = closest(source, SOURCES)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"source={source!r} is not a codebase mtl-import reads{hint} (known: {list(SOURCES)})")
    to_ours = importlib.import_module(f"{__name__}.{source}").to_ours
    if "tasks" in inspect.signature(to_ours).parameters:
        return to_ours(dict(state), tasks=list(tasks))
    return to_ours(dict(state))


def load_exactly(model: nn.Module, weights: Mapping[str, Tensor], *, path: str | os.PathLike, source: str) -> None:
    """Copy `weights` into `model` only if they fill it exactly: same keys, same shapes.

    Raises:
        ValueError: naming every key the file lacks, every key the model lacks, and every key of
            another shape (with both shapes); `model` is left unchanged.
    """
    report = compare_weights(model.state_dict(), dict(weights))
    missing, unexpected, mismatched = report.missing, report.unexpected, report.mismatched
    if missing or unexpected or mismatched:
        parts = []
        if mismatched:
            parts.append(f"{len(mismatched)} of another shape: {some_keys(mismatched, 6)}")
        if missing:
            parts.append(f"{len(missing)} that the file lacks: {some_keys(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} that this model lacks: {some_keys(unexpected)}")
        raise ValueError(
            f"file={str(path)!r} (source={source}) does not fit the configured model: "
            + "; ".join(parts)
            + " (is experiment=/data.tasks/the backbone the one the checkpoint was trained with?)"
        )
    with torch.no_grad():
        model.load_state_dict(dict(weights), strict=True)


def import_checkpoint(cfg, *, source: str, file: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Build the model of `cfg`, fill it from the authors' `file`, and write an mtl_vision
    checkpoint to `out` (atomically, only when every check passed). Returns `out`."""
    import lightning
    from omegaconf import open_dict

    from mtl_vision.cli.build import TaskFacts, build_datamodule, build_module, run_info
    from mtl_vision.engine.checkpoint import AtomicCheckpointIO
    from mtl_vision.engine.module import RUN_INFO_KEY

    target = Path(out)
    if target.suffix != ".ckpt":
        raise ValueError(f"out={str(out)!r}: expected a .ckpt file name")
    state = read_state(file)
    with open_dict(cfg):
        cfg.backbone.pretrained = False  # every weight comes from the file
        if "checkpoint_path" in cfg.backbone:
            cfg.backbone.checkpoint_path = None
    facts = TaskFacts.of(build_datamodule(cfg))
    module = build_module(cfg, facts)
    load_exactly(module.model, convert(source, state, tasks=facts.tasks), path=file, source=source)
    checkpoint = {
        "state_dict": module.state_dict(),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": lightning.__version__,
        RUN_INFO_KEY: {**run_info(cfg, facts), "imported": {"source": source, "file": str(Path(file).resolve())}},
    }
    AtomicCheckpointIO().save_checkpoint(checkpoint, target)
    return target
