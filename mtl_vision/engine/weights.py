"""Starting a run from another checkpoint's weights (`init_from=<ckpt>`): weights only.

Fine-tuning with a new balancer, a new task head or another schedule starts from the model
weights of any mtl_vision checkpoint; the optimiser, scheduler, loop position and balancer state
of that run are not taken over (that is what resuming does). Keys of the new model that the file
lacks (a new task's head) keep their initialisation and are reported; keys of the file the model
lacks are reported and ignored; a key whose shape differs is an error naming both shapes, unless
`skip_mismatched` keeps the new model's tensor for it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from mtl_vision.engine.checkpoint import read_checkpoint

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # MultiTaskModule keeps the network under `model`


def some_keys(keys: Sequence[str], limit: int = 8) -> str:
    """The first `limit` keys, and how many there are in all when that is more (for messages)."""
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class WeightsReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)  # in the file, not in the model
    mismatched: list[str] = field(default_factory=list)  # `key: file (a, b), model (c, d)`

    def summary(self, path: str | os.PathLike, limit: int = 6) -> str:
        def some(keys: list[str]) -> str:
            return some_keys(keys, limit)

        parts = [f"init_from={str(path)!r}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            parts.append(f"kept the initialisation of {len(self.missing)} the file lacks: {some(self.missing)}")
        if self.unexpected:
            parts.append(f"ignored {len(self.unexpected)} the model lacks: {some(self.unexpected)}")
        if self.mismatched:
            parts.append(f"kept the initialisation of {len(self.mismatched)} of another shape: {some(self.mismatched)}")
        return "; ".join(parts)


def compare_weights(own: dict[str, Tensor], weights: dict[str, Tensor]) -> WeightsReport:
    """Which keys of `weights` (a file's) the model state `own` lacks, which it has that the file
    lacks, and which have another shape (`key: file (a, b), model (c, d)`); `loaded` stays empty."""
    return WeightsReport(
        missing=[k for k in own if k not in weights],
        unexpected=[k for k in weights if k not in own],
        mismatched=[
            f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
            for k, v in weights.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ],
    )


def model_state_from_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """The model weights of a checkpoint file: the `model.*` entries of a Lightning checkpoint's
    `state_dict`, without that prefix.

    Raises:
        FileNotFoundError: no file at `path`.
        ValueError: the file is not a checkpoint, or holds no model weights.
    """
    checkpoint = read_checkpoint(path, name=f"init_from={str(path)!r}")
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(
            f"init_from={str(path)!r} holds no 'state_dict' (it was not written by mtl-train or mtl-import)"
        )
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not weights:
        raise ValueError(f"init_from={str(path)!r}: its state_dict has no '{MODEL_PREFIX}*' weights")
    return weights


def load_model_weights(
    model: nn.Module, path: str | os.PathLike, *, skip_mismatched: bool = False
) -> WeightsReport:
    """Copy the weights of `path` into `model` where names and shapes agree (see the module
    docstring). Nothing in `model` changes when an error is raised.

    Raises:
        ValueError: a key has another shape in the file than in the model (and not `skip_mismatched`),
            or no key at all matches.
    """
    weights = model_state_from_file(path)
    own = model.state_dict()
    report = compare_weights(own, weights)
    to_load = {k: v for k, v in weights.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    if report.mismatched and not skip_mismatched:
        raise ValueError(
            f"init_from={str(path)!r}: {len(report.mismatched)} tensors have another shape in the file than in "
            f"this model: {'; '.join(report.mismatched[:6])}; set init_from_skip_mismatched=true to keep this "
            "model's initialisation for them"
        )
    if not to_load:
        raise ValueError(
            f"init_from={str(path)!r}: no weight of the file fits this model (file keys like "
            f"{list(weights)[:3]}, model keys like {list(own)[:3]})"
        )
    report.loaded = sorted(to_load)
    model.load_state_dict(to_load, strict=False)
    return report
