"""Slurm: the sbatch templates, Lightning's SLURM environment under simulated SLURM_* variables,
and run directories named by the Slurm job (stable across requeues)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning_utilities.core.rank_zero import rank_zero_only

from mtl_vision.cli import CONFIG_DIR, ROOT_DIR

SLURM_DIR = ROOT_DIR / "slurm"
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID")


def _directives(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"#SBATCH\s+--([\w-]+)(?:=(\S+))?", line)
        if match:
            found[match.group(1)] = match.group(2) or ""
    return found


@pytest.mark.parametrize("name", ["train.sbatch", "sweep.sbatch"])
def test_sbatch_scripts_parse_and_carry_the_required_directives(name):
    path = SLURM_DIR / name
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    directives = _directives(path)
    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "requeue"):
        assert key in directives, f"{name} lacks #SBATCH --{key}"
    # exactly one owner of the requeue signal: GracefulStop (engine/interrupt.py) listens for SIGUSR1
    assert directives["signal"].startswith("SIGUSR1@"), directives["signal"]
    text = path.read_text()
    assert "srun" in text and "mtl-train" in text
    assert (SLURM_DIR / "README.md").is_file()


def test_train_sbatch_matches_devices_to_tasks_per_node():
    text = (SLURM_DIR / "train.sbatch").read_text()
    assert 'trainer.devices="${SLURM_NTASKS_PER_NODE}"' in text
    assert 'trainer.num_nodes="${SLURM_NNODES}"' in text
    directives = _directives(SLURM_DIR / "train.sbatch")
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]


def test_sweep_sbatch_refuses_a_missing_line(tmp_path):
    if shutil.which("bash") is None:
        pytest.skip("no bash")
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("balancer=ew seed=0\n")
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_JOB_ID": "9"}
    proc = subprocess.run(
        ["bash", str(SLURM_DIR / "sweep.sbatch"), str(sweep)], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2 and "has no line 6" in proc.stderr


def test_lightning_reads_ranks_and_world_size_from_slurm(monkeypatch):
    # task 5 of a 2-node x 4-task job: node 1, local rank 1
    values = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "mtl-train",
        "SLURM_NTASKS": "8",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "2",
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1",
        "SLURM_NODELIST": "gpu[01-02]",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    # SLURMEnvironment.main_address/main_port write MASTER_ADDR/MASTER_PORT into os.environ; undo
    # them afterwards, or later DDP tests in this process try to reach the simulated node gpu01
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # records the key's absence (delenv of an absent key records nothing)
        monkeypatch.delenv(key)
    # the DDP strategy sets the process-wide rank_zero_only.rank to 5; restore it afterwards, or every
    # later test in this process skips its rank-zero work (CSV logs, checkpoints)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    assert SLURMEnvironment.detect()
    trainer = L.Trainer(accelerator="cpu", devices=4, num_nodes=2, strategy="ddp", logger=False)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (5, 1, 1, 8)
    assert env.main_address == "gpu01"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SLURM_JOB_ID": "4242"}, "slurm-4242"),
        ({"SLURM_JOB_ID": "4250", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "3"}, "slurm-4242_3"),
    ],
)
def test_run_directory_is_named_by_the_slurm_job(monkeypatch, env, expected):
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert Path(cfg.hydra.run.dir).name == expected


def test_run_directory_is_a_timestamp_outside_slurm(monkeypatch):
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", Path(cfg.hydra.run.dir).name)


def test_slurm_launcher_takes_tasks_and_nodes_from_the_trainer_and_the_rest_from_local_config():
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                 "+slurm={partition: gpu, account: proj, timeout_min: 90, setup: ['source env.sh']}"]  # fmt: skip
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert (launcher.partition, launcher.account, launcher.timeout_min) == ("gpu", "proj", 90)
    assert list(launcher.setup) == ["source env.sh"]
    # one owner of the requeue: GracefulStop's SIGUSR1 handler; submitit's timeout requeue is off
    assert launcher.max_num_timeout == 0 and launcher.additional_parameters.signal == "USR1@120"


def test_submitit_local_multirun_gives_each_job_its_own_directory(tmp_path):
    from conftest import TINY

    overrides = [o for o in TINY if not o.startswith("data.dataset.num_samples")]
    cmd = [
        sys.executable, "-m", "mtl_vision.cli.train", "-m", "hydra/launcher=submitit_local", "seed=0,1",
        "debug=fast", *overrides, "data.dataset.num_samples={train:8,val:4}",
        f"paths.log_dir={tmp_path / 'logs'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for job in ("0", "1"):
        run = tmp_path / "sweep" / job
        assert (run / "metrics.json").is_file(), f"job {job} wrote no metrics.json"
        assert (run / ".hydra" / "overrides.yaml").read_text().count(f"seed={job}") == 1
    assert (tmp_path / "sweep" / ".submitit").is_dir(), "the jobs did not go through submitit"
