"""Sweeps: the Optuna sweeper optimises what mtl-train returns, in the monitor's direction, and every
multirun job (also one with DDP processes) gets exactly one output directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, config_groups
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from mtl_vision.cli import CONFIG_DIR
from mtl_vision.cli.sweeps import job_argv, sweep_direction

GROUPS = config_groups()
# Small datasets: every job trains and validates in a few seconds.
SMALL = [o for o in TINY if not o.startswith("data.dataset.num_samples")] + ["data.dataset.num_samples={train:8,val:4}"]


def _compose(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mtl_vision.cli.train", *args]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _job_dirs(sweep_dir: Path) -> list[str]:
    return sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.mark.parametrize(("mode", "direction"), [("max", "maximize"), ("min", "minimize")])
def test_optuna_search_composes_with_the_direction_of_the_monitor(mode, direction):
    cfg = _compose(["hparams_search=optuna", "monitor=val/depth/rmse", f"monitor_mode={mode}"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert sweeper.direction == direction
    assert sweeper.n_jobs == 1 and sweeper.n_trials >= 10 and sweeper.study_name == cfg.task_name
    assert {"optim.lr", "optim.weight_decay", "balancer"} <= set(sweeper.params)
    assert sweeper.params["optim.lr"].startswith("tag(log")
    assert cfg.hydra.mode == RunMode.MULTIRUN


@pytest.mark.parametrize("optim", GROUPS["optim"])
def test_the_search_space_names_keys_and_options_that_exist(optim):
    cfg = _compose(["hparams_search=optuna", f"optim={optim}"])
    for key, space in cfg.hydra.sweeper.params.items():
        if key in GROUPS:
            options = [c.strip() for c in space.removeprefix("choice(").removesuffix(")").split(",")]
            assert set(options) <= set(GROUPS[key]), f"{key}: {options} not all in conf/{key}/"
        else:
            assert OmegaConf.select(cfg, key) is not None, f"optim={optim} has no {key}"


def test_optuna_search_refuses_a_monitor_without_a_known_direction():
    cfg = _compose(["hparams_search=optuna", "monitor=auto"])
    with pytest.raises(InterpolationResolutionError, match="monitor=auto"):
        OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    with pytest.raises(ValueError, match="monitor_mode='up'"):
        sweep_direction("val/loss", "up")


def test_a_job_of_a_sweep_is_relaunched_as_that_job_alone():
    argv = ["mtl-train", "-m", "--config-name", "train", "seed=0,1", "debug=fast", "hydra.job.chdir=false"]
    hydra = ["hydra.job.chdir=false", "hydra.mode=MULTIRUN", "hydra.sweeper.params.optim.lr=interval(0.1, 1)"]
    assert job_argv(argv, ["seed=1", "debug=fast"], hydra) == [
        "mtl-train", "--config-name", "train", "seed=1", "debug=fast", "hydra.job.chdir=false", "hydra.mode=RUN",
    ]  # fmt: skip


def test_optuna_study_of_two_trials_reports_the_best_returned_metric(tmp_path):
    monitor = "val/depth/rmse"
    sweep = tmp_path / "sweep"
    _train(
        ["hparams_search=optuna", "hydra.sweeper.n_trials=2", "debug=fast", *SMALL, f"monitor={monitor}",
         "monitor_mode=min", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )  # fmt: skip
    assert _job_dirs(sweep) == ["0", "1"]
    values = []
    for job in ("0", "1"):
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        values.append(metrics[monitor])
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("optim.lr=") for o in overrides), overrides
    assert values[0] != values[1], "the trials tie, which leaves the direction untested"
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(values))
    assert {"optim.lr", "optim.weight_decay", "balancer"} == set(results["best_params"])
    assert not any((tmp_path / "logs").rglob("metrics.json")), "a trial ran outside the sweep directory"


def test_multirun_with_ddp_processes_writes_one_directory_per_job(tmp_path):
    logs = tmp_path / "logs"
    proc = _train(["-m", "seed=0,1", "trainer=ddp_cpu", "debug=fast", *SMALL, f"paths.log_dir={logs}"], cwd=tmp_path)
    # each job's rank-1 process ran that job once, with the job's seed
    for seed in (0, 1):
        output = proc.stdout + proc.stderr
        assert output.count(f"[rank: 1] Seed set to {seed}") == 1, output[-3000:]
    # the default sweep directory, logs/<task>/multiruns/<time>: a DDP child that ran the sweep
    # again would have made a second one (or runs/<time>) with the same jobs
    sweeps = [p for p in logs.rglob("*") if p.is_dir() and (p / "multirun.yaml").is_file()]
    assert len(sweeps) == 1, sorted(str(p.relative_to(logs)) for p in logs.rglob("*") if p.is_dir())
    assert _job_dirs(sweeps[0]) == ["0", "1"]
    assert sorted(str(p.relative_to(logs)) for p in logs.rglob("*.log")) == sorted(
        str(p.relative_to(logs)) for p in sweeps[0].glob("[01]/*.log")
    )
    for job in ("0", "1"):
        run = sweeps[0] / job
        assert (run / "metrics.json").is_file(), f"job {job} wrote no metrics.json"
        assert (run / "train_ddp_process_1.log").is_file(), f"job {job} ran without its rank-1 process"
        assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())[0] == f"seed={job}"
    other_dirs = {p for p in logs.rglob("*") if p.is_dir()} - {sweeps[0], *sweeps[0].rglob("*"), *sweeps[0].parents}
    assert not other_dirs, sorted(map(str, other_dirs))


def _sweep_jobs(overrides: list[str], sweeps: list[str] = ()) -> list[list[str]]:
    """The jobs Hydra's basic sweeper would launch for `mtl-train <overrides> <sweeps>`: its params
    from the config composed of `overrides`, then the command line, parsed and expanded (glob over
    config groups included) as `BasicSweeper.sweep` does, without launching anything."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose(overrides)
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.hydra.sweeper._target_.endswith("BasicSweeper")
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    params = [f"{key}={value}" for key, value in (cfg.hydra.sweeper.params or {}).items()]
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params + overrides + list(sweeps))
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return jobs


BENCHMARKS = [e for e in ("mtan_nyuv2", "mtan_cityscapes") if e in GROUPS["experiment"]]


@pytest.mark.parametrize("experiment", [None, *BENCHMARKS])
def test_the_balancer_benchmark_runs_every_balancer_file_with_three_seeds(experiment):
    chosen = [f"experiment={experiment}"] if experiment else []
    jobs = _sweep_jobs(["hparams_search=balancer_benchmark", *chosen])
    grid = [(job[0], job[1]) for job in jobs]
    assert grid == [(f"balancer={b}", f"seed={s}") for b in GROUPS["balancer"] for s in (0, 1, 2)]
    assert all(job[2:] == ["hparams_search=balancer_benchmark", *chosen] for job in jobs)
    for job in jobs[:: 3 * 4]:  # every fourth balancer: the jobs compose (the sweeper checks all before launching)
        cfg = _compose(job)
        assert cfg.balancer._target_.startswith("mtl_vision.") and cfg.seed == int(job[1].split("=")[1])
    # the command line replaces a swept key
    few = _sweep_jobs(["hparams_search=balancer_benchmark", *chosen], ["balancer=ew,famo", "seed=0"])
    assert [job[:2] for job in few] == [["balancer=ew", "seed=0"], ["balancer=famo", "seed=0"]]
