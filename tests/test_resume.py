"""Exact resume: N steps, a kill, and a resume of N more steps end where 2N steps straight end
(weights, optimiser state, balancer state and validation metrics), mid-epoch included; and a
kill during a checkpoint save leaves the previous checkpoint loadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL

from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.train import resume_checkpoint, train
from mtl_vision.data.sampling import EpochSampler, ResumableLoader, SeededSamples, sample_seed
from mtl_vision.engine.checkpoint import AtomicCheckpointIO
from mtl_vision.engine.module import BALANCER_STATE_KEY

TESTS_DIR = Path(__file__).parent

# 16 training images in batches of 4: 4 steps per epoch. Drop-path, random crops, flips and jitter,
# a worker process, FAMO's logits and a decaying learning rate all have to be restored exactly.
RESUME = [
    *[o for o in TINY_MODEL if not o.startswith(("backbone=", "data.num_workers"))],
    "backbone=test_vit", "+backbone.model_kwargs.drop_path_rate=0.2", "data.num_workers=1",
    "data.dataset.height=64", "data.dataset.width=80", "data.dataset.num_samples={train:16,val:4}",
    "+data.train_transform={_target_: mtl_vision.data.transforms.TrainTransform, crop_size: [48, 64]}",
    "data.tasks=[semseg,depth,edge]", "balancer=famo", "trainer.deterministic=true",
    "trainer.log_every_n_steps=1", "trainer.max_epochs=-1", "summary=false",
]  # fmt: skip


# the extra overrides of a run on 1 and on 2 DDP processes (gloo, CPU)
PROCESSES = {1: [], 2: ["trainer=ddp_cpu", "data.num_workers=0"]}


def _last(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _command(run: Path | None, overrides: list[str], tmp_path: Path, *extra: str) -> list[str]:
    where = [f"hydra.run.dir={run}"] if run is not None else []
    return [sys.executable, "-m", "mtl_vision.cli.train", *overrides, *extra, *where, f"paths.log_dir={tmp_path / 'logs'}"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "2", **extra}


def _mtl_train(
    run: Path | None, overrides: list[str], tmp_path: Path, *extra: str, returncode: int = 0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`mtl-train <overrides> <extra>` in a child process, in run directory `run`."""
    cmd = _command(run, overrides, tmp_path, *extra)
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=env or _env(), capture_output=True, text=True, timeout=600, check=False
    )  # fmt: skip
    assert proc.returncode == returncode, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Callable[[list[str]], Path]:
    """`straight(overrides)` -> the run directory of `mtl-train <overrides>` trained straight through,
    run once per distinct list of overrides in this module: several tests compare their interrupted
    and resumed runs with the same uninterrupted one (the comparison reads only its checkpoint,
    metrics.json and metrics.csv, none of which depends on where it ran)."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(overrides: list[str]) -> Path:
        key = tuple(overrides)
        if key not in runs:
            base = tmp_path_factory.mktemp("straight")
            _mtl_train(base / "run", list(overrides), base)
            runs[key] = base / "run"
        return runs[key]

    return run


def _killed_run(run: Path, overrides: list[str], kill_at: int, tmp_path: Path) -> None:
    """`mtl-train` that checkpoints every `kill_at` steps and is SIGKILLed right after the checkpoint
    of step `kill_at` (under DDP every rank kills itself at that point)."""
    kill = f"+callbacks.kill={{_target_: preempt.KillAtStep, step: {kill_at}}}"
    every = f"callbacks.last_checkpoint.every_n_train_steps={kill_at}"
    _mtl_train(run, overrides, tmp_path, kill, every, returncode=-signal.SIGKILL)
    assert _last(run)["global_step"] == kill_at


def _history(run: Path) -> list[tuple]:
    """The rows of `csv/metrics.csv` (without the throughput, which is a time), sorted."""
    import csv

    with open(run / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return sorted(tuple(sorted((k, v) for k, v in r.items() if v != "" and k != "train/images_per_s")) for r in rows)


def _assert_same_end(straight: Path, resumed: Path, steps: int) -> None:
    """Equal weights, optimiser and scheduler states, final validation metrics and logged history."""
    a, b = _last(straight), _last(resumed)
    assert a["global_step"] == b["global_step"] == steps
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), f"{key} differs after resume"
    for state_a, state_b in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"optimiser state {key} differs"
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert json.loads((straight / "metrics.json").read_text()) == json.loads((resumed / "metrics.json").read_text())
    assert _history(straight) == _history(resumed), "the logged history differs from the run straight through"


@pytest.mark.parametrize("n", [3, 6], ids=["mid-first-epoch", "mid-second-epoch"])
def test_kill_and_resume_equals_training_straight(make_cfg, tmp_path, n):
    overrides = [*RESUME, f"trainer.max_steps={2 * n}"]
    straight = train(make_cfg(overrides, tiny=False, run_dir=tmp_path / "straight"))

    resumed_dir = tmp_path / "resumed"
    _killed_run(resumed_dir, overrides, n, tmp_path)
    resumed = train(make_cfg(overrides, tiny=False, run_dir=resumed_dir))  # auto_resume finds last.ckpt

    _assert_same_end(tmp_path / "straight", resumed_dir, 2 * n)
    assert straight == resumed


def test_kill_and_resume_under_ddp_equals_training_straight(straight, tmp_path):
    # 2 gloo processes x 4 images: 2 steps per epoch, killed after step 3 (mid second epoch); every
    # rank continues its own share of the epoch, with rank 0's saved generators
    overrides = [*RESUME, *PROCESSES[2], "trainer.max_steps=6"]
    reference = straight(overrides)
    _killed_run(tmp_path / "resumed", overrides, 3, tmp_path)
    _mtl_train(tmp_path / "resumed", overrides, tmp_path)
    _assert_same_end(reference, tmp_path / "resumed", 6)


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_resume_from_the_checkpoint_of_a_validation_equals_training_straight(straight, tmp_path, processes):
    # killed in a later epoch with no periodic checkpoint: last.ckpt is the one ModelCheckpoint
    # wrote at the last validation (the end of an epoch), the usual state after a crash or preemption
    overrides = [*RESUME, *PROCESSES[processes], "trainer.max_steps=8"]
    reference = straight(overrides)
    resumed = tmp_path / "resumed"
    kill = "+callbacks.kill={_target_: preempt.KillAtStep, step: 7}"
    _mtl_train(resumed, overrides, tmp_path, kill, returncode=-signal.SIGKILL)
    steps_per_epoch = 4 // processes
    assert _last(resumed)["global_step"] == 7 // steps_per_epoch * steps_per_epoch
    _mtl_train(resumed, overrides, tmp_path)
    _assert_same_end(reference, resumed, 8)


def test_resume_from_a_mid_epoch_validation_equals_training_straight(make_cfg, tmp_path):
    # trainer.val_check_interval=2: validations after steps 2, 4, 6, 8 of 4-step epochs; killed
    # after step 3, the run resumes from the checkpoint of the validation in the middle of epoch 0
    overrides = [*RESUME, "trainer.max_steps=8", "trainer.val_check_interval=2"]
    train(make_cfg(overrides, tiny=False, run_dir=tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    kill = "+callbacks.kill={_target_: preempt.KillAtStep, step: 3}"
    _mtl_train(resumed, overrides, tmp_path, kill, returncode=-signal.SIGKILL)
    assert _last(resumed)["global_step"] == 2
    train(make_cfg(overrides, tiny=False, run_dir=resumed))
    _assert_same_end(tmp_path / "straight", resumed, 8)


@pytest.mark.parametrize("n", [3, 4], ids=["stopped-mid-epoch", "stopped-at-epoch-end"])
def test_a_run_stopped_by_max_steps_continues_with_a_larger_max_steps(make_cfg, tmp_path, n):
    # a constant learning rate: a schedule's length depends on max_steps
    overrides = [*RESUME, "~sched"]
    straight = train(make_cfg([*overrides, f"trainer.max_steps={2 * n}"], tiny=False, run_dir=tmp_path / "straight"))
    continued = tmp_path / "continued"
    train(make_cfg([*overrides, f"trainer.max_steps={n}"], tiny=False, run_dir=continued))
    assert _last(continued)["global_step"] == n
    again = train(make_cfg([*overrides, f"trainer.max_steps={2 * n}", "ckpt_path=last"], tiny=False, run_dir=continued))
    _assert_same_end(tmp_path / "straight", continued, 2 * n)
    assert straight == again


def _signal_when_running(cmd: list[str], env: dict, signum: int, tmp_path: Path, after_step: int = 2) -> tuple[int, str]:
    """Start `cmd` in a session of its own, wait until it has trained `after_step` steps (SlowSteps
    writes them into a file) and send `signum` to its whole process group, as a terminal's Ctrl-C or
    Slurm's signal to a job reach every process of it (DDP ranks and data loader workers)."""
    progress = Path(env["PROGRESS_FILE"])
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (progress.is_file() and progress.read_text().strip().isdigit()
                   and int(progress.read_text()) >= after_step):  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, "training did not get going"
            time.sleep(0.05)
        os.killpg(proc.pid, signum)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    return proc.returncode, output


def _slow(tmp_path: Path, seconds: float = 0.5) -> tuple[str, dict]:
    progress = tmp_path / "progress"
    return (
        f"+callbacks.slow={{_target_: preempt.SlowSteps, progress_file: {progress}, seconds: {seconds}}}",
        {"PROGRESS_FILE": str(progress)},
    )


def test_a_finished_run_continues_with_a_larger_max_epochs(make_cfg, tmp_path):
    overrides = [*RESUME, "~sched", "trainer.max_steps=-1"]
    train(make_cfg([*overrides, "trainer.max_epochs=2"], tiny=False, run_dir=tmp_path / "straight"))
    continued = tmp_path / "continued"
    train(make_cfg([*overrides, "trainer.max_epochs=1"], tiny=False, run_dir=continued))
    train(make_cfg([*overrides, "trainer.max_epochs=2"], tiny=False, run_dir=continued))
    _assert_same_end(tmp_path / "straight", continued, 8)


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_ctrl_c_writes_last_ckpt_prints_the_resume_command_and_resumes_exactly(straight, tmp_path, processes):
    overrides = [*RESUME, *PROCESSES[processes], "trainer.max_steps=8"]
    reference = straight(overrides)
    run = tmp_path / "interrupted"
    slow, extra_env = _slow(tmp_path)
    code, output = _signal_when_running(_command(run, overrides, tmp_path, slow), _env(**extra_env), signal.SIGINT,
                                        tmp_path)  # fmt: skip
    assert code == 128 + signal.SIGINT, output[-3000:]
    step = _last(run)["global_step"]
    assert 2 <= step < 8, "the step under way when Ctrl-C came is finished and saved"
    assert not (run / "metrics.json").exists()
    assert f"SIGINT at step {step}" in output and "resume with" in output
    command = output.split("resume with:")[1].strip().splitlines()[0]
    assert command.startswith("mtl-train ") and f"hydra.run.dir={run}" in command and "preempt.SlowSteps" in command
    _mtl_train(run, overrides, tmp_path, slow.replace("0.5", "0"))
    _assert_same_end(reference, run, 8)


def test_sigterm_to_one_ddp_process_stops_both_and_resumes_exactly(straight, tmp_path):
    overrides = [*RESUME, *PROCESSES[2], "trainer.max_steps=6"]
    reference = straight(overrides)
    term = "+callbacks.term={_target_: preempt.SignalAtStep, step: 2, signal: SIGTERM, rank: 0}"
    _mtl_train(tmp_path / "resumed", overrides, tmp_path, term, returncode=128 + signal.SIGTERM)
    assert _last(tmp_path / "resumed")["global_step"] == 3
    _mtl_train(tmp_path / "resumed", overrides, tmp_path)
    _assert_same_end(reference, tmp_path / "resumed", 6)


FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "$SCONTROL_LOG"
"""


@pytest.mark.parametrize("processes", [1, 2], ids=["1-process", "2-processes"])
def test_sigusr1_in_a_slurm_job_writes_the_hpc_checkpoint_requeues_and_the_requeued_job_resumes(straight, tmp_path, processes):
    """End to end: a Slurm-like environment, a stand-in `scontrol` on PATH, a real SIGUSR1 sent to
    the running `mtl-train`, then the same command again (the requeued job) in its own directory."""
    overrides = [*RESUME, *PROCESSES[processes], "trainer.max_steps=8"]
    reference = straight(overrides)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    log_file = tmp_path / "scontrol.log"
    slow, extra_env = _slow(tmp_path)
    env = _env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(log_file), **extra_env)
    code, output = _signal_when_running(_command(None, overrides, tmp_path, slow), env, signal.SIGUSR1, tmp_path)
    assert code == 0, output[-3000:]
    run = tmp_path / "logs" / "train" / "runs" / "slurm-4242"
    hpc = torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert 2 <= hpc["global_step"] < 8
    assert log_file.read_text().split() == ["requeue", "4242"], "rank 0 alone requeues, once"
    assert not (run / "metrics.json").exists()
    requeued = _mtl_train(None, overrides, tmp_path, slow.replace("0.5", "0"), env=env)
    assert f"resuming from {run / 'hpc_ckpt_1.ckpt'}" in requeued.stdout + requeued.stderr
    _assert_same_end(reference, run, 8)


SAVE_TWICE = """
import sys, torch
from mtl_vision.engine.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1, "w": torch.arange(10.0)}, sys.argv[1])
print("first save done", flush=True)
big = torch.randn(96 * 2**20)  # 384 MiB: the second save takes long enough to be killed in the middle
io.save_checkpoint({"global_step": 2, "w": big}, sys.argv[1])
print("second save done", flush=True)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    target = tmp_path / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", SAVE_TWICE, str(target)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first save done"
        tmp = target.with_name(f"{target.name}.tmp-{proc.pid}")
        deadline = time.monotonic() + 120
        while not (tmp.is_file() and tmp.stat().st_size > 0):  # the second save has begun writing
            assert proc.poll() is None and time.monotonic() < deadline, "the second save was not caught"
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert tmp.is_file(), "the kill came after the save finished; nothing was tested"
    checkpoint = torch.load(target, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["w"], torch.arange(10.0))
    # the resumed job's next save replaces the checkpoint and clears the killed save's leftover
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, target)
    assert torch.load(target, weights_only=True) == {"global_step": 3}
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_epoch_sampler_shards_resumes_and_seeds_by_index():
    data = list(range(10))
    shards = [list(EpochSampler(data, num_replicas=2, rank=r, seed=7)) for r in (0, 1)]
    for shard in shards:
        shard.sort()
    indices = [i for shard in shards for i, _ in shard]
    assert sorted(indices) == data, "the two ranks together see every sample once"
    sampler = EpochSampler(data, seed=7)
    sampler.set_epoch(3)
    full = list(sampler)
    assert full != list(EpochSampler(data, seed=7)), "epochs are shuffled differently"
    sampler.start_at(3, 4)
    assert list(sampler) == full[4:], "a resumed epoch continues where it stopped"
    assert list(sampler) == full[4:], "Lightning may start a resumed epoch's iterator twice"
    sampler.set_epoch(4)
    assert len(list(sampler)) == 10, "another epoch is whole"
    sampler.set_epoch(3)
    assert list(sampler) == full, "the skip ends with the first iteration of another epoch"
    sampler.start_at(2, 4)
    sampler.set_epoch(3)
    assert list(sampler) == full, "a skip for another epoch is ignored"
    # the augmentation seed is a function of (seed, epoch, index), not of the position or rank
    assert dict(full) == {i: sample_seed(7, 3, i) for i in data}
    assert len({sample_seed(7, e, 0) for e in range(5)} | {sample_seed(8, 0, 0)}) == 6


def test_seeded_samples_make_augmentation_independent_of_workers():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return torch.rand(3) + index  # a random transform drawing from torch's global RNG

    def batches(workers: int) -> torch.Tensor:
        loader = ResumableLoader(
            SeededSamples(Noisy()), batch_size=4, sampler=EpochSampler(Noisy(), seed=1), num_workers=workers,
            generator=torch.Generator().manual_seed(0),
        )  # fmt: skip
        return torch.cat(list(loader))

    before = torch.get_rng_state()
    assert torch.equal(batches(0), batches(2))
    assert torch.equal(torch.get_rng_state(), before), "loading must not consume the global RNG"


def test_resume_checkpoint_picks_the_newest_and_explains_a_missing_one(make_cfg, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="holds no checkpoints/last.ckpt"):
        resume_checkpoint(make_cfg(["ckpt_path=last"], run_dir=run))
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        resume_checkpoint(make_cfg([f"ckpt_path={tmp_path / 'nope.ckpt'}"], run_dir=run))
    assert resume_checkpoint(make_cfg([], run_dir=run)) is None  # a fresh run directory
    (run / "checkpoints").mkdir(parents=True)
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (1_000, 1_000))
    os.utime(hpc, (2_000, 2_000))  # a preempted Slurm job wrote this after the last periodic save
    assert resume_checkpoint(make_cfg(["ckpt_path=last"], run_dir=run)) == str(hpc)
    assert resume_checkpoint(make_cfg([], run_dir=run)) == str(hpc)  # auto_resume
    assert resume_checkpoint(make_cfg(["auto_resume=false"], run_dir=run)) is None
    os.utime(last, (3_000, 3_000))
    assert resume_checkpoint(make_cfg([], run_dir=run)) == str(last)


def test_loader_position_at_the_end_of_an_epoch_points_at_the_next_one():
    data = list(range(16))
    loader = ResumableLoader(SeededSamples(data), batch_size=4, sampler=EpochSampler(data, seed=0))
    loader.sampler.set_epoch(2)
    loader.progress = lambda: (1, 4)
    assert loader.state_dict() == {"epoch": 2, "batches": 1}
    loader.progress = lambda: (2, 2)  # limit_train_batches: the trainer's epoch is 2 of the 4 batches
    assert loader.state_dict() == {"epoch": 3, "batches": 0}
    reference = EpochSampler(data, seed=0)
    reference.set_epoch(3)
    epoch3 = [i for i, _ in reference]
    loader.load_state_dict({"epoch": 3, "batches": 0})
    assert [i for batch in loader for i in batch.tolist()] == epoch3
    loader.load_state_dict({"epoch": 3, "batches": 1})
    assert [i for batch in loader for i in batch.tolist()] == epoch3[4:]
    loader.load_state_dict({"epoch": 2, "batches": 4})  # a whole epoch done: the next one from its start
    assert [i for batch in loader for i in batch.tolist()] == epoch3


def test_a_stateful_aggregator_resumes_with_its_state(make_cfg):
    # Nash-MTL solving every 2nd step: the step after a resume must reuse the weights solved before it
    cfg = make_cfg(["balancer=nashmtl", "balancer.aggregator.update_weights_every=2", "data.tasks=[semseg,depth,edge]"])
    datamodule = build_datamodule(cfg)
    first, resumed, fresh = (build_module(cfg, datamodule) for _ in range(3))
    gen = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 40, generator=gen, dtype=torch.float64) for _ in range(3)]
    gramians = [j @ j.T for j in jacobians]
    first.balancer.weights_from_gramian(gramians[0])  # solved
    checkpoint = {}
    first.on_save_checkpoint(checkpoint)
    resumed.on_load_checkpoint(checkpoint)
    expected = first.balancer.weights_from_gramian(gramians[1])  # the weights of step 0, reused
    assert torch.equal(resumed.balancer.weights_from_gramian(gramians[1]), expected)
    assert not torch.allclose(fresh.balancer.weights_from_gramian(gramians[1]), expected), (
        "the state made no difference"
    )
    assert torch.equal(
        resumed.balancer.weights_from_gramian(gramians[2]), first.balancer.weights_from_gramian(gramians[2])
    )

    stateless = {}
    build_module(make_cfg(["balancer=pcgrad"]), datamodule).on_save_checkpoint(stateless)
    assert BALANCER_STATE_KEY not in stateless
