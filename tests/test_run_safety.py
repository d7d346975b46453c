"""Nothing lost, nothing silently wrong: non-finite steps skipped in every optimisation path,
runs that cannot train refused before training, history kept across resumes and folder reuse,
and checkpoints of another model refused before the run directory is touched."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.resume import CheckpointMismatch, read_resume_point
from mtl_vision.cli.train import train
from mtl_vision.engine.guard import NonFiniteGuard, NonFiniteTrainingError
from mtl_vision.engine.history import HistoryCSVLogger
from mtl_vision.errors import TrainingStopped
from mtl_vision.viz import NAN_RGB, colorize_depth, colorize_heat, colorize_normals

TESTS_DIR = Path(__file__).parent
# inf images from step 5 on (after the validation ending epoch 0): a stand-in for a diverged run
POISON = "+callbacks.poison={_target_: preempt.PoisonLossFrom, step: 5}"


def _rows(run: Path) -> list[dict]:
    with open(run / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_guard_undoes_a_non_finite_step_including_batchnorm_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    guard = NonFiniteGuard(max_consecutive=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard.snapshot(model)
    model(torch.full((2, 1, 3, 3), float("inf"))).sum().backward()
    assert not torch.isfinite(model[1].running_mean).all(), "the forward pass poisoned the statistics"
    assert not guard.check(model.parameters())
    assert all(p.grad is None for p in model.parameters()), "an optimiser then moves nothing"
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was not restored"
    assert (guard.skipped, guard.consecutive, guard.exhausted) == (1, 1, False)
    guard.skip(list(model.parameters()))
    assert guard.exhausted
    model(torch.ones(2, 1, 3, 3)).sum().backward()
    assert guard.check(model.parameters()) and guard.consecutive == 0 and guard.skipped == 2
    guard.snapshot(model)
    model[1].running_var.fill_(float("inf"))  # statistics overflowed while the gradients stayed finite
    model(torch.ones(2, 1, 3, 3)).sum().backward()
    assert not guard.check(model.parameters()) and torch.isfinite(model[1].running_var).all()
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=-1)


@pytest.mark.parametrize(
    "overrides",
    [[], ["balancer=pcgrad"], ["trainer.precision=bf16-mixed"]],
    ids=["automatic", "manual-task-gradients", "bf16-mixed"],
)
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(make_cfg, tmp_path, overrides, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    cfg = make_cfg([*overrides, POISON, "guard.max_consecutive_nonfinite=3", "trainer.log_every_n_steps=1",
                    "trainer.max_epochs=-1", "trainer.max_steps=20", "data.tasks=[semseg,depth]"])  # fmt: skip
    with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 7: 3 optimiser steps in a row .*lr="):
        train(cfg)
    run = tmp_path / "run"
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 4, "the checkpoint of the validation before the poisoned steps"
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())
    skipped = [float(r["train/skipped_steps"]) for r in _rows(run) if r.get("train/skipped_steps")]
    assert skipped[:5] == [0.0] * 5 and skipped[-1] == 2.0  # the third one raises before it is logged
    assert not (run / "metrics.json").exists()


def test_a_diverging_learning_rate_ends_with_an_error_and_finite_checkpoints(make_cfg, tmp_path):
    # the case: optim.lr=1e6 used to write inf BatchNorm statistics and exit 0 with rmse nan
    cfg = make_cfg(["optim.lr=1e6", "trainer.max_epochs=3", "data.dataset.num_samples={train:32,val:4}"])
    with pytest.raises(TrainingStopped, match=r"non-finite"):
        train(cfg)
    for name in ("last.ckpt", "best.ckpt"):
        state = torch.load(tmp_path / "run" / "checkpoints" / name, map_location="cpu", weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


def test_a_skipped_step_leaves_weights_and_optimiser_as_they_were(make_cfg, tmp_path, monkeypatch):
    # one inf step between finite ones: the run ends as if that batch had never been trained on
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    common = ["trainer.max_epochs=-1", "~sched", "data.tasks=[semseg,depth]", "~callbacks.pictures"]
    poisoned = make_cfg([*common, "trainer.max_steps=3", "+callbacks.poison={_target_: preempt.PoisonLossFrom, "
                         "step: 1, until: 2}"], run_dir=tmp_path / "poisoned")  # fmt: skip
    train(poisoned)
    a = torch.load(tmp_path / "poisoned" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert a["nonfinite_guard"] == {"skipped": 1, "consecutive": 0}
    adam_steps = {int(s["step"]) for s in a["optimizer_states"][0]["state"].values()}
    assert adam_steps == {2}, "AdamW stepped twice: the skipped step moved nothing"


def test_checkpoints_refuse_non_finite_weights(make_cfg):
    cfg = make_cfg(["data.tasks=[depth]", "monitor=val/depth/rmse", "monitor_mode=min"])
    module = build_module(cfg, build_datamodule(cfg))
    state = module.state_dict()
    state[next(iter(state))] = torch.full_like(state[next(iter(state))], float("nan"))
    with pytest.raises(ValueError, match="refusing to write a checkpoint.*inf/NaN"):
        module.on_save_checkpoint({"state_dict": state})


def test_pictures_draw_non_finite_values_magenta():
    depth = torch.tensor([[[1.0, float("nan")], [2.0, float("inf")]]])
    rgb = colorize_depth(depth)
    assert rgb[0, :, 0, 1].tolist() == list(NAN_RGB) and rgb[0, :, 1, 1].tolist() == list(NAN_RGB)
    assert rgb[0, :, 0, 0].tolist() != list(NAN_RGB)
    heat = colorize_heat(torch.tensor([[[0.5, float("nan")]]]))
    assert heat[0, :, 0, 1].tolist() == list(NAN_RGB)
    normals = torch.zeros(1, 3, 1, 2)
    normals[0, 2] = 1.0
    normals[0, 0, 0, 1] = float("nan")
    assert colorize_normals(normals)[0, :, 0, 1].tolist() == list(NAN_RGB)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.dataset.num_samples={train:4,val:4}", "data.batch_size=8"], r"0 steps: .* 4 samples.*batch_size=8"),
        (["trainer.limit_val_batches=0"], r"validates on 0 samples \(trainer.limit_val_batches=0\)"),
        (["monitor=val/semseg/miou"], r"monitor='val/semseg/miou' is not computed.*did you mean 'val/semseg/mIoU'"),
        (["trainer.max_steps=100"], r"max_steps=100 is never reached: trainer.max_epochs=1 ends training at step 4"),
        (["trainer.max_epochs=0"], r"would train 0 steps \(trainer.max_steps=-1, trainer.max_epochs=0\)"),
        (["trainer.max_steps=0"], r"would train 0 steps \(trainer.max_steps=0,"),
    ],
    ids=["too-few-samples", "no-validation", "misspelt-monitor", "max-epochs-cuts-max-steps", "zero-epochs",
         "zero-steps"],
)
def test_runs_that_cannot_work_are_refused_before_training(make_cfg, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(make_cfg(overrides))
    assert not (tmp_path / "run" / "checkpoints").exists(), "refused after training had started"


def test_too_few_samples_for_the_processes_is_refused(tmp_path):
    cmd = [sys.executable, "-m", "mtl_vision.cli.train", "backbone=test_resnet", "decoder.channels=16",
           "data.num_workers=0", "data.dataset.height=64", "data.dataset.width=80",
           "data.dataset.num_samples={train:16,val:6}", "data.batch_size=8", "trainer=ddp_cpu", "trainer.devices=3",
           f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "5 per process on 3 process(es)" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (tmp_path / "run" / "train.log").read_text()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_history_continues_on_resume_and_is_set_aside_on_a_fresh_start(tmp_path):
    logger = HistoryCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    for step in range(6):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.save()
    resumed = HistoryCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    resumed.continue_from(4)
    resumed.log_metrics({"train/loss": 40.0, "val/x": 1.0}, step=4)
    resumed.save()
    rows = _rows(tmp_path)
    assert [(r["step"], r["train/loss"]) for r in rows] == [("0", "0.0"), ("1", "1.0"), ("2", "2.0"), ("3", "3.0"),
                                                           ("4", "40.0")]  # fmt: skip
    assert rows[-1]["val/x"] == "1.0"
    fresh = HistoryCSVLogger(save_dir=str(tmp_path), name="csv", version="")
    fresh.log_metrics({"train/loss": 7.0}, step=0)
    fresh.save()
    assert [r["train/loss"] for r in _rows(tmp_path)] == ["7.0"]
    with open(tmp_path / "csv" / "metrics.1.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 5, "the earlier run's history was moved aside, not deleted"


def test_a_checkpoint_of_another_model_is_refused_before_the_run_directory_is_touched(make_cfg, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(["data.tasks=[semseg,depth]", "trainer.max_steps=1", "~callbacks.pictures"]))
    config_before = (run / "csv" / "hparams.yaml").read_text()
    cfg = make_cfg(["data.tasks=[semseg,normals]", "decoder.channels=32", "trainer.max_steps=2"])
    with pytest.raises(CheckpointMismatch) as info:
        train(cfg)
    message = str(info.value)
    assert "last.ckpt (found in the run directory" in message
    assert "data.tasks: checkpoint ['semseg', 'depth'], now ['semseg', 'normals']" in message
    assert "decoder.channels: checkpoint 16, now 32" in message
    assert "auto_resume=false" in message
    assert (run / "csv" / "hparams.yaml").read_text() == config_before


def test_a_corrupt_checkpoint_is_named_with_the_way_out(make_cfg, tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    cfg = make_cfg([])
    with pytest.raises(ValueError, match=r"cannot resume from .*last.ckpt \(found in the run directory.*auto_resume=false"):
        read_resume_point(str(run / "checkpoints" / "last.ckpt"), cfg, found=True)


def _nyud_with_a_corrupt_image(tmp_path: Path) -> tuple[Path, Path]:
    from mtl_vision.data.nyud_fixture import write_nyud_fixture

    root = write_nyud_fixture(tmp_path / "NYUD_MT", layout="nyud_mt", n=8, height=48, width=64)
    ids = (root / "gt_sets" / "train.txt").read_text().split()
    broken = root / "images" / f"{ids[3]}.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    return root, broken


NYUD_TINY = ["data=nyud", "data.crop_size=[32,48]", "data.tasks=[semseg,depth]", "data.batch_size=4",
             "monitor=val/semseg/mIoU", "trainer.max_steps=2", "trainer.max_epochs=-1", "~callbacks.pictures"]  # fmt: skip


def test_a_corrupt_training_sample_is_named_or_skipped_and_counted(make_cfg, tmp_path):
    root, broken = _nyud_with_a_corrupt_image(tmp_path)
    strict = make_cfg([*NYUD_TINY, f"data.root={root}"], run_dir=tmp_path / "strict")
    with pytest.raises(ValueError, match=rf"{broken.name}"):
        train(strict)
    lenient = make_cfg([*NYUD_TINY, f"data.root={root}", "data.skip_corrupt=true", "trainer.log_every_n_steps=1"],
                       run_dir=tmp_path / "lenient")  # fmt: skip
    with pytest.warns(UserWarning, match=f"skipped a corrupt training sample.*{broken.name}"):
        train(lenient)
    counted = [float(r["train/skipped_samples"]) for r in _rows(tmp_path / "lenient") if r.get("train/skipped_samples")]
    assert counted and counted[-1] == 1.0, "8 samples, 2 steps of 4: the corrupt one is seen once"


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip


def test_mtl_eval_checks_the_checkpoint_before_writing_anything(tmp_path):
    missing = tmp_path / "nowhere" / "checkpoints" / "best.ckpt"
    proc = _cli("mtl_vision.cli.eval", f"ckpt={missing}", cwd=tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == f"error: ckpt='{missing}': no such checkpoint file"
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["trainer.max_step=3"], "error: trainer.max_step: no such key; did you mean trainer.max_steps?"),
        (["trainer.max_steps=abc"], "error: trainer.max_steps='abc': expected an integer (the default is -1)"),
        (["optim.lr=fast"], "error: optim.lr='fast': expected a number"),
        (["trainer=ddp_cpu", "trainer.devices=two"], "error: trainer.devices='two': expected an integer"),
        (["balancer=pcgrd"], "error: balancer=pcgrd: no such option; did you mean balancer=pcgrad?"),
        (["-m", "balancer=ew,famoo"], "error: balancer=famoo: no such option; did you mean balancer=famo?"),
        (["--cfg", "job", "data.batchsize=2"], "error: data.batchsize: no such key; did you mean data.batch_size?"),
    ],
    ids=["misspelt-key", "not-an-integer", "not-a-number", "after-a-group-choice", "misspelt-option",
         "misspelt-sweep-option", "behind-a-flag"],
)
def test_mistyped_overrides_get_one_line_before_anything_runs(tmp_path, args, expected):
    proc = _cli("mtl_vision.cli.train", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[0].startswith(expected), proc.stderr[-1500:]
    assert not (tmp_path / "run").exists()


def test_a_task_list_given_as_one_word_is_explained(make_cfg):
    from hydra.errors import InstantiationException

    with pytest.raises(InstantiationException, match=r"data.tasks='semseg' must be a list of tasks, e.g. data.tasks=\[semseg\]"):
        build_datamodule(make_cfg(["data.tasks=semseg"]))
