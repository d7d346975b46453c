"""Thin Hydra entry points. `instantiate` is called here and nowhere else."""

from __future__ import annotations

import logging
import os
import re
import sys
import traceback
from pathlib import Path

from omegaconf import OmegaConf

# registers ${sweep_direction:} (conf/hparams_search/optuna.yaml)
from mtl_vision.cli import sweeps  # noqa: F401
from mtl_vision.errors import USER_ERRORS
from mtl_vision.slurm import slurm_job_id

ROOT_DIR = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT_DIR / "conf"

# `${mtl_root:}` in conf/paths: the project checkout, so runs and data default to paths inside it
# wherever the command is launched from.
if not OmegaConf.has_resolver("mtl_root"):
    OmegaConf.register_new_resolver("mtl_root", lambda: str(ROOT_DIR))


def run_dir_of(ckpt: str) -> str:
    """The run directory of a checkpoint: `<run>` for `<run>/checkpoints/<name>.ckpt`, else the
    checkpoint's folder. `mtl-eval` writes its reports there."""
    path = Path(ckpt).resolve()
    return str(path.parent.parent if path.parent.name == "checkpoints" else path.parent)


# `${run_dir_of:${ckpt}}` in conf/eval.yaml and conf/predict.yaml.
if not OmegaConf.has_resolver("run_dir_of"):
    OmegaConf.register_new_resolver("run_dir_of", run_dir_of)


def run_id(fallback: str) -> str:
    """The name of a run's directory: `slurm-<job id>` inside a Slurm job (`slurm-<array job>_<task>`
    for an array task), else `fallback` (a timestamp). A Slurm job keeps its id when it is
    requeued after preemption, so the requeued job finds its own directory and checkpoints, and
    every rank of a multi-node job names the same directory without talking to the others."""
    job = slurm_job_id()
    return f"slurm-{job}" if job else str(fallback)


# `${run_id:${now:...}}` in conf/hydra/default.yaml.
if not OmegaConf.has_resolver("run_id"):
    OmegaConf.register_new_resolver("run_id", run_id)


def check_config_dir() -> Path:
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise FileNotFoundError(
            f"config tree not found at {CONFIG_DIR}; install the project from its checkout with `pip install -e .`"
        )
    return CONFIG_DIR


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors answered with one line: the project's own checks (`errors.USER_ERRORS`), Hydra's
    instantiation errors (which wrap them) and OmegaConf's key and type errors."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    return (*USER_ERRORS, InstantiationException, OmegaConfBaseException)


def one_line(err: BaseException) -> str:
    """The message of `err` (of the error it wraps, for Hydra's instantiation errors) on one line."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if "Original Traceback (most recent call last)" in message:  # re-raised from a DataLoader worker
        message = [line for line in message.splitlines() if line.strip()][-1]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", message)  # the exception's class path
    return " ".join(message.split())


def exit_with_one_line(err: BaseException, log_file: Path | None = None) -> None:
    """Print `err` as one line and exit with status 1; the traceback goes to `log_file` (when it
    exists) and is printed in full with `HYDRA_FULL_ERROR=1`."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    where = ""
    if log_file is not None and log_file.parent.is_dir():
        with open(log_file, "a") as f:
            f.write("".join(traceback.format_exception(err)))
        where = f" (traceback in {log_file}; HYDRA_FULL_ERROR=1 prints it)"
    logging.shutdown()
    print(f"error: {one_line(err)}{where}", file=sys.stderr, flush=True)
    raise SystemExit(1) from None
