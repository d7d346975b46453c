"""Experiment tracking: the Weights & Biases logger of `conf/logger/wandb.yaml` and the callback
that logs the resolved run config to every logger.

`wandb_logger` fills in what the config leaves open so that tracking needs no network and
survives preemption: the mode (offline without an API key), the run id (from the run directory,
which a requeued Slurm job keeps, so the requeued job resumes its wandb run) and the group (one
per sweep).
"""

from __future__ import annotations

import hashlib
import logging
import netrc
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import lightning as L
from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled")
DEFAULT_HOST = "https://api.wandb.ai"


def wandb_api_key_configured() -> bool:
    """Whether wandb would find credentials: `WANDB_API_KEY`, an identity token file, or an entry
    for the server (`WANDB_BASE_URL`, default api.wandb.ai) in the netrc file (`$NETRC`, else
    `~/.netrc`) that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or DEFAULT_HOST).netloc
    path = Path(os.environ.get("NETRC") or Path.home() / ".netrc").expanduser()
    try:
        creds = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(creds and creds[2])


def wandb_mode(mode: str | None = None) -> str:
    """`mode` if given; else `WANDB_MODE` (`dryrun` meaning offline); else online when an API key
    is configured (`wandb_api_key_configured`) and offline when none is."""
    if mode is None:
        env = os.environ.get("WANDB_MODE")
        if env:
            return "offline" if env == "dryrun" else env
        return "online" if wandb_api_key_configured() else "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: expected one of {list(WANDB_MODES)} or null (automatic)")
    return mode


def run_dir_id(run_dir: str | os.PathLike) -> str:
    """A wandb run id that depends on the run directory only: its name plus a hash of its absolute
    path, so `slurm-<job>` keeps its id across requeues and equal names in different places differ."""
    path = Path(run_dir).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", path.name).strip("-")[:48]
    return f"{name}-{digest}" if name else digest


def sweep_group(run_dir: str | os.PathLike) -> str | None:
    """One wandb group per sweep: in a Hydra multirun the sweep directory's name (the parent of
    this job's run directory); in a Slurm array job `slurm-<array job id>`; otherwise None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(run_dir).resolve().parent.name
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"slurm-{array_job}" if array_job else None


def finish_wandb(exit_code: int | None = None) -> str | None:
    """Close this process's wandb run, if one is open: flushes it (offline runs are complete on
    disk) and stops a later logger from reusing it. Call it once a job is over. Returns the id of
    the run it finished, None when none was open."""
    wandb = sys.modules.get("wandb")
    if wandb is None or wandb.run is None:
        return None
    run_id = wandb.run.id
    wandb.finish(exit_code=exit_code)
    return run_id


def wandb_logger(
    *,
    save_dir: str,
    project: str = "mtl_vision",
    entity: str | None = None,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    job_type: str = "train",
    notes: str | None = None,
    mode: str | None = None,
    id: str | None = None,
    log_model: bool = False,
) -> WandbLogger:
    """Lightning's `WandbLogger` writing into `<save_dir>/wandb/`.

    Args:
        save_dir: the run directory.
        project, entity, name, tags, job_type, notes: as in `wandb.init`.
        group: None = one group per sweep (`sweep_group`).
        mode: online, offline, disabled; None = `wandb_mode()` (offline without an API key).
        id: None = `run_dir_id(save_dir)`, stable across requeues; the run resumes (`resume=allow`).
        log_model: log checkpoints as wandb artifacts.
    """
    mode = wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb falls back to a temporary folder otherwise
    # A run still open in this process belongs to an earlier job that did not finish it (Hydra's
    # basic launcher runs a sweep's jobs one after another in one process); Lightning would log
    # this job into it.
    finished = finish_wandb()
    if finished is not None:
        log.info("finished the open wandb run %s of an earlier job", finished)
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        entity=entity,
        name=name,
        group=group if group is not None else sweep_group(save_dir),
        tags=list(tags),
        job_type=job_type,
        notes=notes,
        mode=mode,
        id=id or run_dir_id(save_dir),
        resume="allow",
        log_model=log_model,
    )


class LogRunConfig(L.Callback):
    """Logs the resolved run config (`pl_module.run_info["config"]`, what checkpoints store) as
    hyperparameters of every logger when fitting starts: wandb's run config, the CSV and
    TensorBoard `hparams.yaml`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        config = (getattr(pl_module, "run_info", None) or {}).get("config")
        if config is None:
            log.info("LogRunConfig: the module carries no run_info['config']; no config logged")
            return
        for logger in trainer.loggers:
            logger.log_hyperparams(config)
