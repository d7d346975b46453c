"""Dataset configs on data in the real on-disk layouts: `mtl-data check` and short training runs."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from mtl_vision.cli.data import main as mtl_data
from mtl_vision.cli.train import train

# (layout for `mtl-data fixture`, data config, extra overrides)
CASES = [
    ("nyud_mt", "nyud", []),
    ("nyudv2", "nyud", []),
    ("mtan", "nyud", ["data.tasks=[semseg,depth,normals]"]),
    ("pascal_mt", "pascal_context", []),
]
IDS = [c[0] for c in CASES]


def _fixture(tmp_path: Path, layout: str) -> Path:
    root = tmp_path / layout
    if layout == "pascal_mt":
        from mtl_vision.data.pascal_fixture import write_pascal_fixture

        return write_pascal_fixture(root, n=3, height=48, width=64)
    from mtl_vision.data.nyud_fixture import write_nyud_fixture

    return write_nyud_fixture(root, layout=layout, n=3, height=48, width=64)


def _read_only(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.chmod(Path(dirpath) / name, stat.S_IRUSR | stat.S_IRGRP)
        os.chmod(dirpath, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)


def _snapshot(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize(("layout", "config", "extra"), CASES, ids=IDS)
def test_mtl_data_check_accepts_a_good_layout(tmp_path, capsys, layout, config, extra):
    root = _fixture(tmp_path, layout)
    assert mtl_data(["check", f"data={config}", f"data.root={root}", *extra]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out


@pytest.mark.parametrize(("layout", "config", "extra"), CASES, ids=IDS)
def test_mtl_data_check_names_the_broken_file(tmp_path, capsys, layout, config, extra):
    root = _fixture(tmp_path, layout)
    victim = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in {".png", ".npy", ".mat"})[-1]
    victim.write_bytes(b"this is not an image or array")
    assert mtl_data(["check", f"data={config}", f"data.root={root}", *extra]) == 1
    err = capsys.readouterr().err
    assert victim.name in err, err


def test_mtl_data_check_explains_a_missing_root(tmp_path, capsys):
    assert mtl_data(["check", "data=nyud", f"data.root={tmp_path / 'nowhere'}"]) == 1
    err = capsys.readouterr().err
    assert "gt_sets" in err and "segmentation" in err, "the error should show the expected layout"


def test_mtl_data_fixture_writes_the_layout(tmp_path, capsys):
    assert mtl_data(["fixture", "--layout", "nyudv2", "--out", str(tmp_path / "f"), "--n", "2"]) == 0
    assert (tmp_path / "f" / "gt_sets" / "train.txt").is_file()
    assert len(list((tmp_path / "f" / "normals").glob("*.png"))) == 4


@pytest.mark.parametrize(("layout", "config", "extra"), CASES, ids=IDS)
def test_short_training_run_on_a_read_only_dataset(make_cfg, tmp_path, layout, config, extra):
    root = _fixture(tmp_path, layout)
    _read_only(root)
    before = _snapshot(root)
    cfg = make_cfg([f"data={config}", f"data.root={root}", "data.crop_size=[48,64]", "data.batch_size=2", "trainer.max_steps=2", "trainer.max_epochs=3", *extra])
    value = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2, "last.ckpt must hold the final weights (and the split must yield batches)"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/semseg/mIoU"] == value
    assert _snapshot(root) == before, "nothing may be written into the data folder"
