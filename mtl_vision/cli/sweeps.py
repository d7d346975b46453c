"""Hydra sweeps: the Optuna study's direction, and one output directory per job under DDP.

`${sweep_direction:${monitor},${monitor_mode}}` (conf/hparams_search/optuna.yaml) turns the
monitor's mode into Optuna's direction. `DDPRelaunchThisJob` (conf/hydra/default.yaml) makes
Lightning's DDP child processes of a multirun job run that job only, in that job's directory.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

DIRECTIONS = {"max": "maximize", "min": "minimize"}

# Set by Lightning's subprocess launcher in the process that spawns the DDP children.
DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
MULTIRUN_FLAGS = ("-m", "--multirun")
# The launcher that runs the jobs inside the process that parsed the command line; Lightning re-executes
# that command line. Other launchers run each job in a process of their own (submitit: one Slurm task per rank).
IN_PROCESS_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


def sweep_direction(monitor: str, monitor_mode: str) -> str:
    """Optuna's direction ("maximize"/"minimize") for the value mtl-train returns: `monitor` in `monitor_mode`."""
    if monitor == "auto":
        raise ValueError(
            "monitor=auto is resolved inside each run, after the sweeper has fixed its direction; "
            "hparams_search=optuna needs an explicit metric and mode, e.g. monitor=val/semseg/mIoU monitor_mode=max"
        )
    if monitor_mode not in DIRECTIONS:
        raise ValueError(f"monitor_mode={monitor_mode!r} (monitor={monitor!r}): expected one of {sorted(DIRECTIONS)}")
    return DIRECTIONS[monitor_mode]


if not OmegaConf.has_resolver("sweep_direction"):
    OmegaConf.register_new_resolver("sweep_direction", sweep_direction)


def hydra_flags(argv: list[str]) -> list[str]:
    """The command-line flags of `argv` (`--config-name x`, `-cd dir`, ...) without the overrides and `-m`."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv[1:])
    overrides = set(args.overrides)
    return [arg for arg in argv[1:] if arg not in overrides and arg not in MULTIRUN_FLAGS]


def job_argv(argv: list[str], task_overrides: list[str], hydra_overrides: list[str]) -> list[str]:
    """The command line of one job of a sweep, as a single run: the flags of `argv` and the job's own
    overrides; hydra.* overrides that only a sweep accepts (the mode, a search space) are left out."""
    parsed = OverridesParser.create().parse_overrides(hydra_overrides)
    kept = [o.input_line for o in parsed if o.key_or_group != "hydra.mode" and not o.is_sweep_override()]
    return [argv[0], *hydra_flags(argv), *task_overrides, *kept, "hydra.mode=RUN"]


class DDPRelaunchThisJob(Callback):
    """One output directory per multirun job, also when Lightning launches DDP processes.

    For ranks > 0 Lightning's `_SubprocessScriptLauncher` re-executes `sys.argv` with
    `hydra.run.dir=<HydraConfig run.dir>` appended. Inside a multirun job that command line is the
    whole sweep (`-m ...`): each child would run every job again, in a sweep directory of its own
    timestamp, while `run.dir` is the single-run pattern rather than the job's directory. So while
    a job runs, `sys.argv` is that job's overrides as a single run and `run.dir` its directory; at
    its end the process group and the launcher's environment variables go, and the next job
    launches its own children instead of reusing the finished job's.

    Only for the default launcher, whose jobs run in the process of the command line. On Slurm
    every rank is a Slurm task and nothing is relaunched; a submitit_local job runs as
    `python -m submitit.core._submit <folder>`, which Lightning cannot relaunch (one device there).
    """

    def __init__(self) -> None:
        self._argv: list[str] | None = None
        self._env: dict[str, str | None] = {}

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN or hydra_cfg.launcher.get("_target_") != IN_PROCESS_LAUNCHER:
            return
        if "LOCAL_RANK" in os.environ:
            return  # the ranks were started outside (torchrun): Lightning relaunches nothing
        self._argv = list(sys.argv)
        self._env = {key: os.environ.get(key) for key in DDP_ENV_KEYS}
        sys.argv = job_argv(sys.argv, list(hydra_cfg.overrides.task), list(hydra_cfg.overrides.hydra))
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = hydra_cfg.runtime.output_dir

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self._argv is None:
            return
        # Lightning's launcher sets LOCAL_RANK=0 in the process that started the children
        if "LOCAL_RANK" in os.environ:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()
            for key, value in self._env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        sys.argv, self._argv, self._env = self._argv, None, {}
