"""Experiment tracking: an offline wandb run with pictures, mode/id/group selection, picture content."""

from __future__ import annotations

import csv
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import open_dict, read_write
from PIL import Image

from mtl_vision.cli import run_id
from mtl_vision.cli.build import apply_performance_switches, build_datamodule, build_module
from mtl_vision.cli.train import train
from mtl_vision.engine.callbacks import GpuMemory
from mtl_vision.engine.pictures import COLUMNS, GAP, LABEL_HEIGHT, ValidationPictures, task_tiles, to_uint8
from mtl_vision.engine.tracking import finish_wandb, run_dir_id, sweep_group, wandb_mode
from mtl_vision.tasks import TASKS
from mtl_vision.viz import colorize_labels

ALL_TASKS = ["semseg", "depth", "normals", "edge", "saliency", "human_parts"]
H, W = 64, 80  # conftest's TINY images


@pytest.fixture
def no_wandb_account(tmp_path, monkeypatch):
    """No API key, no netrc, no WANDB_MODE, no Slurm; wandb's own folders inside tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "SLURM_JOB_ID",
                "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(home / var.lower()))
    return home


def wandb_records(path: Path):
    """The protobuf records of a `.wandb` transaction log (LevelDB-style log: 32 KiB blocks of
    chunks with a 7-byte header crc32/length/type, after a 7-byte `:W&B` file header)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    while pos + 7 <= len(data):
        if block - pos % block < 7 or data[pos : pos + 7] == bytes(7):  # block trailer / padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            return
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def complete_wandb_log(path: Path, timeout: float = 30.0) -> list:
    """The records of a finished run's log. wandb.finish() can return before wandb-core has
    flushed the file, so wait for the closing `exit` record."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def key(item) -> str:
    """The key of a config or history item of a wandb record."""
    return item.key or "/".join(item.nested_key)


def tile(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    y, x = row * (H + LABEL_HEIGHT + GAP) + LABEL_HEIGHT, column * (W + GAP)
    return grid[y : y + H, x : x + W]


def test_offline_wandb_run_with_pictures_and_csv(make_cfg, tmp_path, no_wandb_account):
    cfg = make_cfg(
        ["logger=wandb", "trainer.max_steps=4", "+trainer.val_check_interval=2", "trainer.log_every_n_steps=1"]
    )
    try:
        train(cfg)
    finally:
        finish_wandb()
    import wandb

    assert wandb.run is None
    run = tmp_path / "run"
    (offline,) = (run / "wandb").glob(f"offline-run-*-{run_dir_id(run)}")
    records = complete_wandb_log(offline / f"run-{run_dir_id(run)}.wandb")
    (info,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.job_type, list(info.tags), info.run_group) == ("mtl_vision", "train", ["dev"], "")
    config = {key(i) for r in records if r.WhichOneof("record_type") == "config" for i in r.config.update}
    assert {"data", "backbone", "balancer", "loss", "seed", "model/total/params"} <= config, "resolved config logged"
    history = {key(i) for r in records if r.WhichOneof("record_type") == "history" for i in r.history.item}
    for task in ALL_TASKS:
        assert {f"train/{task}/loss", f"train/weights/{task}", f"val/{task}/{TASKS[task].selection_key}"} <= history
    assert {"train/loss", "train/images_per_s", "val/pictures/_type", "trainer/global_step"} <= history
    assert any(k.startswith("lr-") for k in history), sorted(history)
    assert "train/gpu_mem_gib" not in history, "no GPU memory on CPU"
    assert len(list((offline / "files" / "media" / "images").rglob("*.png"))) == 8, "2 validations x 4 images"
    with open(run / "csv" / "metrics.csv") as f:
        columns = next(csv.reader(f))
    assert "train/semseg/loss" in columns and "val/semseg/mIoU" in columns, "CSV log beside wandb"

    # validations at steps 2 and 4 draw the same first four validation images
    folders = sorted((run / "pictures").iterdir())
    assert [f.name for f in folders] == ["epoch000_step000002", "epoch000_step000004"]
    datamodule = build_datamodule(cfg)
    datamodule.setup("validate")
    val_set = datamodule.val_set
    for index in range(4):
        grids = [np.asarray(Image.open(folder / f"{index:04d}.png")) for folder in folders]
        for grid in grids:
            assert grid.shape == (len(ALL_TASKS) * (H + LABEL_HEIGHT) + (len(ALL_TASKS) - 1) * GAP, 3 * W + 2 * GAP, 3)
            for row in range(len(ALL_TASKS)):
                np.testing.assert_array_equal(tile(grid, row, 0), to_uint8(val_set[index]["image"]))
            target = to_uint8(colorize_labels(val_set[index]["semseg"])[0])
            np.testing.assert_array_equal(tile(grid, ALL_TASKS.index("semseg"), 1), target)
    assert not (run / "pictures" / "epoch000_step000002" / "0004.png").exists()


def test_mode_offline_without_key_or_when_forced(make_cfg, no_wandb_account, monkeypatch):
    assert wandb_mode() == "offline", "no key anywhere"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    logger = instantiate(make_cfg(["logger=wandb"]).logger.wandb)
    assert logger._wandb_init["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline", "WANDB_MODE=offline wins over a key"
    assert instantiate(make_cfg(["logger=wandb"]).logger.wandb)._wandb_init["mode"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert wandb_mode() == "offline"
    assert wandb_mode("disabled") == "disabled", "an explicit logger.wandb.mode wins"
    with pytest.raises(ValueError, match="logger.wandb.mode='offlin'"):
        wandb_mode("offlin")


def test_mode_online_with_a_netrc_entry(no_wandb_account, monkeypatch):
    netrc = no_wandb_account / ".netrc"
    netrc.write_text("machine example.org\n  login user\n  password abc\n")
    netrc.chmod(0o600)
    assert wandb_mode() == "offline", "an entry for another host is no wandb key"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert wandb_mode() == "offline", "the key must be for the configured server"


def test_wandb_id_is_stable_across_requeues(make_cfg, tmp_path, no_wandb_account, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    run_dir = tmp_path / "logs" / "train" / "runs" / run_id("2024-01-01_00-00-00")
    first = instantiate(make_cfg(["logger=wandb"], run_dir=run_dir).logger.wandb)
    requeued = instantiate(make_cfg(["logger=wandb"], run_dir=run_dir).logger.wandb)
    other = instantiate(make_cfg(["logger=wandb"], run_dir=tmp_path / "elsewhere" / "slurm-1234").logger.wandb)
    assert first.version == requeued.version == run_dir_id(run_dir)
    assert first.version.startswith("slurm-1234-") and other.version != first.version
    assert first._wandb_init["resume"] == "allow" and first.save_dir == str(run_dir)
    assert first._wandb_init["group"] is None, "a single run has no group"


def test_one_group_per_sweep(make_cfg, tmp_path, no_wandb_account, monkeypatch):
    sweep = tmp_path / "logs" / "train" / "multiruns" / "2024-01-01_00-00-00"
    cfg = make_cfg(["logger=wandb"], run_dir=sweep / "3")
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    try:
        assert instantiate(cfg.logger.wandb)._wandb_init["group"] == "2024-01-01_00-00-00"
        assert sweep_group(sweep / "0") == sweep_group(sweep / "3")
        with open_dict(cfg):
            cfg.logger.wandb.group = "ablation"
        assert instantiate(cfg.logger.wandb)._wandb_init["group"] == "ablation", "an explicit group wins"
    finally:
        with read_write(cfg.hydra):
            cfg.hydra.mode = RunMode.RUN
        HydraConfig().set_config(cfg)
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "77")
    assert sweep_group(tmp_path / "run") == "slurm-77", "a Slurm array is a sweep too"


def test_a_later_job_in_the_same_process_gets_its_own_run(make_cfg, tmp_path, no_wandb_account):
    # Hydra's basic launcher runs a sweep's jobs one after another in one process
    first = instantiate(make_cfg(["logger=wandb"], run_dir=tmp_path / "sweep" / "0").logger.wandb)
    second_cfg = make_cfg(["logger=wandb"], run_dir=tmp_path / "sweep" / "1")
    try:
        assert first.experiment.id == run_dir_id(tmp_path / "sweep" / "0")
        second = instantiate(second_cfg.logger.wandb)
        assert second.experiment.id == run_dir_id(tmp_path / "sweep" / "1"), "not logged into the earlier job's run"
    finally:
        finish_wandb()


def test_tiles_put_image_target_prediction_in_their_columns():
    image = torch.rand(3, 4, 5)
    target = torch.full((4, 5), 255)
    target[1, 2] = 3
    pred = torch.zeros(1, 4, 5, dtype=torch.long)[0]
    tiles = task_tiles("semseg", image, target, pred)
    assert len(tiles) == len(COLUMNS) == 3
    np.testing.assert_array_equal(tiles[0], to_uint8(image))
    palette = (colorize_labels(torch.tensor([[3, 0]]))[0, :, 0] * 255).round().byte().numpy()
    assert tiles[1][1, 2].tolist() == palette[:, 0].tolist() and tiles[1][0, 0].tolist() == [255, 255, 255]
    assert (tiles[2] == palette[:, 1]).all(), "prediction column: class 0 everywhere"
    # depth: one scale for target and prediction; invalid target pixels white
    depth = torch.tensor([[[0.0, 1.0, 2.0]]])
    target_tile, pred_tile = task_tiles("depth", torch.rand(3, 1, 3), depth, torch.tensor([[[2.0, 1.0, 1.5]]]))[1:]
    assert target_tile[0, 0].tolist() == [255, 255, 255]
    assert (
        pred_tile[0, 0].tolist() == target_tile[0, 2].tolist()
        and pred_tile[0, 1].tolist() == target_tile[0, 1].tolist()
    )
    # padded (255) boundary pixels are white, boundary pixels are not
    edge = task_tiles("edge", torch.rand(3, 1, 2), torch.tensor([[[255.0, 1.0]]]), torch.tensor([[[0.5, 0.5]]]))[1]
    assert edge[0, 0].tolist() == [255, 255, 255] and edge[0, 1].tolist() != [255, 255, 255]


def test_pictures_draw_the_model_under_channels_last(make_cfg):
    cfg = make_cfg(["channels_last=true"])
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    apply_performance_switches(cfg, module)
    sample = datamodule.val_set[1]
    grid = np.asarray(ValidationPictures(dirpath="unused").draw(module.eval(), sample))
    with torch.no_grad():
        pred = module.predict_tasks(sample["image"][None])
    for row, task in enumerate(ALL_TASKS):
        expected = task_tiles(task, sample["image"], sample[task], pred[task][0])[2]
        np.testing.assert_array_equal(tile(grid, row, 2), expected)
    mixed = ValidationPictures(dirpath="unused").draw(module, sample, MixedPrecision("bf16-mixed", "cpu"))
    assert np.asarray(mixed).shape == grid.shape


def test_gpu_memory_logs_the_peak_of_each_window(monkeypatch):
    peaks, resets, logged = iter([3 * 2**30, 5 * 2**30]), [], []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", resets.append)
    module = SimpleNamespace(
        device=torch.device("cuda", 0), log=lambda key, value, **kw: logged.append((key, value, kw))
    )
    callback = GpuMemory(every_n_steps=2)
    for step in range(4):
        callback.on_train_batch_end(None, module, None, None, step)
    assert [(k, v) for k, v, _ in logged] == [("train/gpu_mem_gib", 3.0), ("train/gpu_mem_gib", 5.0)]
    assert logged[0][2]["reduce_fx"] == "max" and len(resets) == 2
    callback.on_train_batch_end(None, SimpleNamespace(device=torch.device("cpu")), None, None, 0)  # nothing on CPU


def test_pictures_without_a_validation_set_log_and_skip(caplog, tmp_path):
    callback = ValidationPictures(dirpath=tmp_path / "pictures")
    trainer = SimpleNamespace(datamodule=None, val_dataloaders=None, sanity_checking=False, is_global_zero=True)
    callback.on_validation_end(trainer, pl_module=None)
    assert "no indexable validation set" in caplog.text
    assert not (tmp_path / "pictures").exists()
    with pytest.raises(ValueError, match="num_images"):
        ValidationPictures(dirpath=tmp_path, num_images=0)
