"""End-to-end training runs: real Lightning Trainer, real timm model, real DDP on CPU."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import TINY
from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.train import train
from mtl_vision.tasks import TASKS

ALL_TASKS = ["semseg", "depth", "normals", "edge", "saliency", "human_parts"]


def _check_metrics_file(run_dir: Path, tasks=ALL_TASKS) -> dict[str, float]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for task in tasks:
        key = f"val/{task}/{TASKS[task].selection_key}"
        assert key in metrics, f"{key} missing from metrics.json: {sorted(metrics)}"
        assert math.isfinite(metrics[key])
    assert all(k.startswith("val/") for k in metrics)
    return metrics


def test_fast_dev_run(make_cfg, tmp_path):
    cfg = make_cfg(["debug=fast"])
    value = train(cfg)
    metrics = _check_metrics_file(tmp_path / "run")
    assert value == metrics["val/semseg/mIoU"]


def test_one_short_epoch_with_a_tiny_timm_model(make_cfg, tmp_path):
    cfg = make_cfg(["trainer.max_epochs=1", "trainer.log_every_n_steps=1"])
    value = train(cfg)
    run = tmp_path / "run"
    metrics = _check_metrics_file(run)
    assert value == metrics["val/semseg/mIoU"]
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert not list((run / "checkpoints").glob("*.tmp-*")), "temporary checkpoint files left behind"
    rows = list(csv.DictReader(open(run / "csv" / "metrics.csv")))
    columns = set(rows[0])
    for task in ALL_TASKS:
        assert f"train/{task}/loss" in columns and f"train/weights/{task}" in columns
        assert f"val/{task}/{TASKS[task].selection_key}" in columns
    # 16 training samples, batch 4, one epoch: 4 optimiser steps recorded in the checkpoint.
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4


def test_task_subset_and_fixed_balancer(make_cfg, tmp_path):
    cfg = make_cfg(
        [
            "data.tasks=[depth,normals]",
            "monitor=val/depth/rmse",
            "monitor_mode=min",
            "balancer=fixed",
            "trainer.max_steps=2",
        ]
    )
    value = train(cfg)
    metrics = _check_metrics_file(tmp_path / "run", tasks=["depth", "normals"])
    assert not any(k.startswith("val/semseg") for k in metrics)
    assert value == metrics["val/depth/rmse"]


def test_monitor_of_a_task_that_is_not_trained_is_rejected(make_cfg):
    cfg = make_cfg(["data.tasks=[depth]", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match="monitor"):
        train(cfg)


def test_max_steps_mid_epoch_still_reports_final_weights(make_cfg, tmp_path):
    # 16 samples / batch 4 = 4 steps per epoch; stopping at 2 skips Lightning's own validation.
    cfg = make_cfg(["trainer.max_steps=2", "trainer.max_epochs=5"])
    train(cfg)
    _check_metrics_file(tmp_path / "run")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2


def test_ddp_cpu_two_processes_one_run_directory(make_cfg, tmp_path):
    logs = tmp_path / "logs"
    overrides = [o for o in TINY if not o.startswith("data.dataset.num_samples")]
    # 7 validation images over 2 ranks: a padding sampler would count one image twice.
    overrides += ["data.dataset.num_samples={train:16,val:7}", "data.val_batch_size=2", "trainer.max_epochs=1"]
    cmd = [sys.executable, "-m", "mtl_vision.cli.train", "trainer=ddp_cpu", *overrides, f"paths.log_dir={logs}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((logs / "train" / "runs").iterdir())
    assert len(runs) == 1, f"expected one run directory, got {runs}"
    run = runs[0]
    assert len(list(logs.rglob("metrics.json"))) == 1
    assert (run / "train_ddp_process_1.log").is_file(), "the second DDP process did not run in the same directory"
    ddp_metrics = _check_metrics_file(run)

    # The same weights validated by a single process give the same split-level numbers, so no
    # image was dropped or counted twice across ranks.
    cfg = make_cfg(overrides)
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    module.load_state_dict(state)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    single = module.last_val_metrics
    for key, value in ddp_metrics.items():
        assert single[key] == pytest.approx(value, rel=1e-4, abs=1e-4), key


def test_console_script_runs(tmp_path):
    script = Path(sys.executable).with_name("mtl-train")
    if not script.is_file():
        pytest.skip(f"mtl-train is not installed next to {sys.executable}")
    cmd = [str(script), "debug=fast", *TINY, f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _check_metrics_file(tmp_path / "run")
    assert "semseg" in proc.stdout, "the metric table is printed"


@pytest.mark.parametrize("decoder", ["taskexpert", "moe"])
def test_expert_statistics_and_aux_loss_are_logged(make_cfg, tmp_path, decoder):
    cfg = make_cfg(
        [f"decoder={decoder}", "trainer.max_steps=3", "experts.log_every_n_steps=1", "trainer.log_every_n_steps=1"]
    )
    train(cfg)
    rows = list(csv.DictReader(open(tmp_path / "run" / "csv" / "metrics.csv")))
    columns = set(rows[0])
    usage = [c for c in columns if c.startswith("experts/decoder") and "/usage/semseg/" in c]
    assert usage, f"no expert usage logged: {sorted(c for c in columns if c.startswith('experts'))[:10]}"
    assert any(c.startswith("experts/decoder") and "gate_entropy/" in c for c in columns)
    if decoder == "moe":  # sparse MoE layers add their load-balancing loss to the total
        values = [float(r["train/experts/aux_loss"]) for r in rows if r.get("train/experts/aux_loss")]
        assert values and all(math.isfinite(v) and v > 0 for v in values)
