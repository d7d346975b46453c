"""Which checkpoint `mtl-train` resumes from, and whether it fits the run's config, decided before
anything in the run directory is written."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# what a checkpoint's weights depend on; other keys (optimiser, schedule, length) may change on resume
MODEL_KEYS = ("data.name", "data.tasks", "backbone", "peft", "decoder", "balancer._target_")
# the weights come from the checkpoint, so where pretrained weights would come from does not matter
# keys that do not change the function the weights compute: where the initial weights come from,
# and how a task-conditioned backbone is evaluated (stacked or per-task passes, the MoE dispatch:
# equal outputs), so a run may resume under another value, or from a checkpoint older than the key
IGNORED_KEYS = ("backbone.pretrained", "backbone.checkpoint_path", "backbone.task_passes", "backbone.moe.dispatch")


class CheckpointMismatch(ValueError):
    """The checkpoint to resume from was written by a run with another model or tasks."""


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint `fit` resumes from.

    `ckpt_path=last` (and, with `auto_resume`, no ckpt_path at all) takes the newest of the run
    directory's `checkpoints/last.ckpt` and the `hpc_ckpt_<n>.ckpt` written when a Slurm job is
    preempted (SIGUSR1); a requeued job thereby continues from its own latest state. Any other
    value is a checkpoint file.

    Raises:
        FileNotFoundError: `ckpt_path` names no file, or `last` finds no checkpoint in the run directory.
    """
    run_dir = Path(cfg.paths.output_dir)
    candidates = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    newest = str(max(candidates, key=lambda p: p.stat().st_mtime)) if candidates else None
    ckpt = cfg.get("ckpt_path")
    if ckpt == "last":
        if newest is None:
            raise FileNotFoundError(
                f"ckpt_path=last: the run directory {run_dir} holds no checkpoints/last.ckpt or hpc_ckpt_*.ckpt; "
                "point hydra.run.dir at the run to resume"
            )
        return newest
    if ckpt is not None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"ckpt_path={str(ckpt)!r}: no such checkpoint file")
        return str(ckpt)
    return newest if cfg.get("auto_resume", True) else None


def _select(container: dict, dotted: str) -> Any:
    node: Any = container
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out |= _flatten(inner, f"{prefix}.{key}")
        return out
    return {prefix: value}


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint <a>, now <b>` for every model-defining key (`MODEL_KEYS`) that differs."""
    lines = []
    for key in MODEL_KEYS:
        a, b = _flatten(_select(saved, key), key), _flatten(_select(current, key), key)
        for sub in sorted(set(a) | set(b)):
            if sub in IGNORED_KEYS or a.get(sub) == b.get(sub):
                continue
            lines.append(f"{sub}: checkpoint {a.get(sub, '(absent)')!r}, now {b.get(sub, '(absent)')!r}")
    return lines


@dataclass(frozen=True)
class ResumePoint:
    path: str
    global_step: int
    epoch: int


def read_resume_point(path: str, cfg: DictConfig, *, found: bool) -> ResumePoint:
    """Read the checkpoint `path` (memory-mapped: the weights are not loaded) and check that it fits
    `cfg`. `found` says it was picked from the run directory rather than named by `ckpt_path`,
    which the way out in the error then mentions.

    Raises:
        ValueError: the file cannot be read as a checkpoint.
        CheckpointMismatch: its run had other tasks, backbone, decoder, PEFT or balancer.
    """
    from mtl_vision.engine.checkpoint import read_checkpoint

    how = f"found in the run directory {cfg.paths.output_dir}" if found else "named by ckpt_path"
    way_out = "start afresh with auto_resume=false or another hydra.run.dir" if found else "pick another ckpt_path"
    try:
        checkpoint = read_checkpoint(path, name="it")
    except ValueError as err:
        raise ValueError(f"cannot resume from {path} ({how}): {err}; move it away, or {way_out}") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"cannot resume from {path} ({how}): it holds no Lightning state_dict; {way_out}")
    saved = (checkpoint.get("mtl_vision") or {}).get("config")
    if saved is not None:
        current: dict = {}
        for key in MODEL_KEYS:  # only these nodes are resolved
            value = OmegaConf.select(cfg, key, default=None)
            value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
            node = current
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        differences = config_differences(saved, current)
        if differences:
            raise CheckpointMismatch(
                f"cannot resume from {path} ({how}): it was written by a run with another model; "
                + "; ".join(differences[:6])
                + (f" (and {len(differences) - 6} more)" if len(differences) > 6 else "")
                + f". To train this config, {way_out}"
            )
    step, epoch = int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0))
    return ResumePoint(path=path, global_step=step, epoch=epoch)
