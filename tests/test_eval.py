"""mtl-eval and mtl-predict on a checkpoint trained here: same numbers as training, on 1 and 2
processes, the exact boundary benchmark, Δm in the report, and the prediction files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

from conftest import TINY
from mtl_vision.cli import CONFIG_DIR
from mtl_vision.cli.build import load_run
from mtl_vision.cli.eval import evaluate
from mtl_vision.cli.predict import predict
from mtl_vision.cli.train import train
from mtl_vision.metrics.boundary import ods_f
from mtl_vision.metrics.delta_m import update_baselines

# 7 validation images over 2 ranks with batches of 2: a padding sampler would count one twice.
TRAIN = [o for o in TINY if not o.startswith("data.dataset.num_samples")]
TRAIN += ["data.dataset.num_samples={train:8,val:7}", "data.val_batch_size=2", "trainer.max_steps=2"]


def _compose(config: str, overrides: list[str], run_dir: Path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config, overrides=[*overrides, f"hydra.run.dir={run_dir}"], return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run directory (checkpoints/last.ckpt, metrics.json)."""
    root = tmp_path_factory.mktemp("eval")
    run_dir = root / "run"
    train(
        _compose("train", [*TRAIN, f"paths.log_dir={root / 'logs'}", f"delta_m.baselines={root / 'b.yaml'}"], run_dir)
    )
    return run_dir


def _eval(run: Path, *overrides: str, out: Path | None = None) -> dict[str, float]:
    cfg = _compose("eval", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "edge_exact=false", *overrides], out or run)
    return evaluate(cfg)


def test_eval_reproduces_the_training_metrics(run):
    trained = json.loads((run / "metrics.json").read_text())
    metrics = _eval(run)
    on_disk = json.loads((run / "eval_last.json").read_text())
    assert on_disk == pytest.approx(metrics)
    assert set(on_disk) == set(trained)
    for key, value in trained.items():
        assert on_disk[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key
    report = (run / "eval_last.md").read_text()
    assert "| semseg mIoU ↑ |" in report and "7 images" in report


def test_eval_under_ddp_equals_one_process_on_an_odd_split(run, tmp_path):
    single = _eval(run, out=tmp_path / "single")
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "mtl_vision.cli.eval", f"ckpt={ckpt}", "trainer=ddp_cpu", "edge_exact=false"]
    proc = subprocess.run([*cmd, f"hydra.run.dir={out}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = json.loads((out / "eval_last.json").read_text())
    # eval's Hydra files go beside the training run's .hydra/, never over it
    assert (out / ".hydra_eval" / "config.yaml").is_file() and not (out / ".hydra").exists()
    assert set(ddp) == set(single)
    for key, value in single.items():
        if not key.endswith("/loss"):  # losses are means of per-batch means; batches differ per rank
            assert ddp[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_exact_boundary_benchmark_equals_the_functional_on_the_predictions(run, tmp_path):
    metrics = _eval(run, "edge_exact=true", out=tmp_path)
    for key in ("odsF", "oisF", "ap", "odsF_approx"):
        assert 0.0 <= metrics[f"val/edge/{key}"] <= 100.0
    # The same numbers from the predictions themselves, one image at a time.
    run_cfg, facts, state = load_run(run / "checkpoints" / "last.ckpt")
    from mtl_vision.cli.build import build_datamodule, build_module

    datamodule = build_datamodule(run_cfg)
    module = build_module(run_cfg, facts)
    module.load_state_dict(state)
    module.eval()
    datamodule.setup("validate")
    probs, targets = [], []
    with torch.no_grad():
        for i in range(len(datamodule.val_set)):
            sample = datamodule.val_set[i]
            probs.append(module.predict_tasks(sample["image"][None])["edge"][0, 0])
            targets.append(sample["edge"].reshape(probs[-1].shape))
    expected = ods_f(torch.stack(probs), torch.stack(targets), max_dist=facts.edge_tolerance)
    for key in ("odsF", "oisF", "ap"):
        assert metrics[f"val/edge/{key}"] == pytest.approx(expected[key], abs=1e-6), key


def test_eval_report_has_delta_m_when_baselines_cover_every_task(run, tmp_path):
    baselines = tmp_path / "b.yaml"
    trained = json.loads((run / "metrics.json").read_text())
    tasks = sorted({k.split("/")[1] for k in trained if k.count("/") >= 2})
    for task in tasks:
        prefix = f"val/{task}/"
        values = {k[len(prefix) :]: v for k, v in trained.items() if k.startswith(prefix) and k.count("/") == 2}
        values.pop("loss", None)
        # the baseline is 10 % better than the multi-task model on every metric that is not 0
        update_baselines(baselines, task, {k: (v * 1.1 if v else 1.0) for k, v in values.items()})
    metrics = _eval(run, f"delta_m.baselines={baselines}", out=tmp_path / "out")
    assert "val/delta_m" in metrics and metrics["val/delta_m"] < 0
    report = (tmp_path / "out" / "eval_last.md").read_text()
    assert "single-task baselines" in report and f"{metrics['val/delta_m']:+.2f}" in report


def test_eval_errors_name_the_checkpoint(run, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        evaluate(_compose("eval", [f"ckpt={tmp_path / 'nothing.ckpt'}"], tmp_path))
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ValueError, match="foreign.ckpt.*not written by mtl-train"):
        evaluate(_compose("eval", [f"ckpt={foreign}"], tmp_path))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.ckpt.*could not be read"):
        evaluate(_compose("eval", [f"ckpt={truncated}"], tmp_path))


def test_predict_writes_every_task_at_the_input_size(run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a": (50, 70), "b": (64, 64)}  # 50x70 is not a multiple of the backbone stride
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{stem}.png")
    (images / "notes.txt").write_text("not an image")
    out = tmp_path / "pred"
    cfg = _compose("predict", [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"input={images}", f"output={out}"], out)
    predict(cfg)
    _, facts, _ = load_run(run / "checkpoints" / "last.ckpt")
    for stem, (h, w) in sizes.items():
        for task in facts.tasks:
            raw = np.load(out / "raw" / task / f"{stem}.npy")
            color = np.array(Image.open(out / "color" / task / f"{stem}.png"))
            assert color.shape == (h, w, 3), task
            if task in ("semseg", "human_parts"):
                assert raw.shape == (h, w) and raw.dtype == np.uint8
                assert raw.max() < facts.task_channels[task]
            elif task == "normals":
                assert raw.shape == (h, w, 3)
                np.testing.assert_allclose(np.linalg.norm(raw, axis=-1), 1.0, atol=1e-4)
            else:
                assert raw.shape == (h, w) and raw.dtype == np.float32
        edge8 = np.array(Image.open(out / "edge" / f"{stem}.png"))
        assert edge8.dtype == np.uint8 and edge8.shape == (h, w)
        np.testing.assert_array_equal(edge8, np.round(np.load(out / "raw" / "edge" / f"{stem}.npy") * 255))
        panel = Image.open(out / "panels" / f"{stem}.png")
        assert panel.width == (1 + len(facts.tasks)) * w + len(facts.tasks) * 4 and panel.height > h
    assert not (out / "raw" / "semseg" / "notes.npy").exists()


def test_predict_errors(run, tmp_path):
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        predict(_compose("predict", [ckpt, f"input={empty}", f"output={tmp_path / 'o'}"], tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="no such image or folder"):
        predict(
            _compose("predict", [ckpt, f"input={tmp_path / 'nope.png'}", f"output={tmp_path / 'o'}"], tmp_path / "o")
        )


def test_eval_names_its_reports_after_the_checkpoint(run, tmp_path):
    out = tmp_path / "out"
    _eval(run, out=out)
    evaluate(_compose("eval", [f"ckpt={run / 'checkpoints' / 'best.ckpt'}", "edge_exact=false"], out))
    assert {p.name for p in out.glob("eval_*")} == {"eval_last.json", "eval_last.md", "eval_best.json", "eval_best.md"}


def test_eval_refuses_a_data_root_for_generated_data(run, tmp_path):
    with pytest.raises(ValueError, match=r"data.root='/data/x': the checkpoint's dataset \(synthetic\) reads no files"):
        _eval(run, "data.root=/data/x", out=tmp_path / "out")


def test_predict_skips_unreadable_images_refuses_clashes_and_downscales(run, tmp_path):
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 80, 3), dtype=np.uint8)).save(images / "good.png")
    (images / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "pred"
    done = predict(_compose("predict", [ckpt, f"input={images}", f"output={out}", "max_side=40"], out))
    assert [p.name for p in done] == ["good.png"]
    assert "broken.jpg" in (out / "skipped.txt").read_text()
    assert np.array(Image.open(out / "color" / "semseg" / "good.png")).shape == (20, 40, 3), "longer side 40"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "good.jpg")
    with pytest.raises(ValueError, match="good.jpg and good.png would write the same output files"):
        predict(_compose("predict", [ckpt, f"input={images}", f"output={out}"], out))


def test_predict_skips_a_decompression_bomb_with_its_name(run, tmp_path, monkeypatch):
    import PIL.Image

    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(images / "huge.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(images / "small.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 40x60 is then over twice the limit
    out = tmp_path / "pred"
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    done = predict(_compose("predict", [ckpt, f"input={images}", f"output={out}"], out))
    assert [p.name for p in done] == ["small.png"]
    assert "huge.png" in (out / "skipped.txt").read_text() and "decompression" in (out / "skipped.txt").read_text()
