"""`mtl-import` end to end: an authors' checkpoint (the InvPT reference fixture, saved as their
main.py saves it) becomes a checkpoint that mtl-eval (1 and 2 processes), mtl-predict and
init_from accept; bad input is named and writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_vision.cli.build import load_run
from mtl_vision.data.nyud_fixture import write_nyud_fixture
from mtl_vision.engine.weights import load_model_weights
from mtl_vision.importing import read_state

REFERENCE = Path(__file__).parent / "fixtures" / "reference"


def _record() -> dict:
    return torch.load(REFERENCE / "invpt_nyud.pt", map_location="cpu", weights_only=True)


def _cli(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"mtl_vision.cli.{module}", *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(imported checkpoint, NYUD root in the ATRC/InvPT layout, the overrides used)."""
    root = tmp_path_factory.mktemp("import")
    data = write_nyud_fixture(root / "NYUDv2", layout="nyudv2", n=3, height=128, width=128)
    overrides = [*_record()["overrides"], f"data.root={data}", "data.num_workers=0", "data.val_batch_size=2"]
    out = root / "run" / "checkpoints" / "invpt_nyud.ckpt"
    proc = _cli("importer", "source=invpt", f"file={REFERENCE / 'invpt_nyud.pth'}", f"out={out}", *overrides, cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert out.is_file() and f"wrote {out}" in proc.stdout
    return out, data, overrides


def test_the_imported_checkpoint_holds_the_authors_weights(imported):
    ckpt, _, _ = imported
    cfg, facts, state = load_run(ckpt)
    assert facts.tasks == ["semseg", "depth", "normals", "edge"]
    assert cfg.decoder._target_.endswith("InvPTDecoder")
    theirs = read_state(REFERENCE / "invpt_nyud.pth")
    torch.testing.assert_close(
        state["model.decoder.heads.semseg.weight"], theirs["heads.semseg.linear_pred.weight"], rtol=0, atol=0
    )
    torch.testing.assert_close(state["model.backbone.model.model.pos_embed"], theirs["backbone.pos_embed"], rtol=0, atol=0)


def test_eval_of_an_imported_checkpoint_is_the_same_on_one_and_two_processes(imported, tmp_path):
    ckpt, _, _ = imported
    results = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp_cpu"])):
        out = tmp_path / name
        proc = _cli("eval", f"ckpt={ckpt}", "edge_exact=false", f"hydra.run.dir={out}", *extra, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[name] = json.loads((out / "eval_invpt_nyud.json").read_text())
    assert set(results["one"]) >= {"val/semseg/mIoU", "val/depth/rmse", "val/normals/mean", "val/edge/odsF_approx"}
    for key, value in results["one"].items():
        assert results["two"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_predict_and_init_from_accept_an_imported_checkpoint(imported, tmp_path, make_cfg):
    ckpt, _, overrides = imported
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(images / "a.png")
    proc = _cli("predict", f"ckpt={ckpt}", f"input={images}", f"output={tmp_path / 'pred'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert np.load(tmp_path / "pred" / "raw" / "semseg" / "a.npy").shape == (128, 128)

    from mtl_vision.cli.build import TaskFacts, build_module

    _, facts, _ = load_run(ckpt)
    cfg = make_cfg([*overrides, "backbone.pretrained=false", "balancer=dwa"], tiny=False)
    model = build_module(cfg, TaskFacts(**facts.__dict__)).model
    report = load_model_weights(model, ckpt)
    assert not report.missing and not report.unexpected and len(report.loaded) == len(model.state_dict())


def test_import_errors_name_what_is_wrong_and_write_nothing(imported, tmp_path):
    _, _, overrides = imported
    out = tmp_path / "x.ckpt"
    file = f"file={REFERENCE / 'invpt_nyud.pth'}"
    cases = [
        (["source=invtp", file], overrides, "did you mean 'invpt'"),
        (["source=invpt", f"file={tmp_path / 'none.pth'}"], overrides, "none.pth"),
        (["source=invpt", file], [*overrides, "data.tasks=[semseg,depth]"], "trained on tasks"),
        (["source=invpt", file], [*overrides, "decoder.channels=24"], "of another shape"),
        # one block more than the checkpoint has
        (["source=invpt", file], [*overrides, "++backbone.model_kwargs.depth=5", "backbone.out_indices=[0,1,2,4]"],
         "that the file lacks: backbone.model.model.blocks.4."),
    ]
    for own, extra, message in cases:
        proc = _cli("importer", *own, f"out={out}", *extra, cwd=tmp_path)
        assert proc.returncode == 1, (own, extra, proc.stdout, proc.stderr[-2000:])
        assert message in proc.stderr and proc.stderr.count("\n") <= 2, proc.stderr[-2000:]
        assert not out.exists()
    proc = _cli("importer", "source=invpt", f"out={out}", *overrides, cwd=tmp_path)
    assert proc.returncode == 1 and "needs file=" in proc.stderr


# (fixture, mtl-import source, dataset layout of its experiment)
IMPORTS = [
    ("padnet_nyud", "padnet", "nyud_mt"),
    ("mtinet_nyud_en", "mtinet", "nyud_mt"),
    ("mtinet_pascal", "mtinet", "pascal"),
    ("hps_nyud", "hps", "nyud_mt"),
    ("ctal_nyud", "ctal", "mtan"),
    ("mtlora_pascal", "mtlora", "pascal"),
    ("memanet_nyud", "memanet", "mtan"),
    ("mtan_nyuv2", "mtan", "mtan"),
]


@pytest.mark.parametrize(("name", "source", "layout"), IMPORTS, ids=[i[0] for i in IMPORTS])
def test_import_of_each_authors_fixture_then_eval_on_its_layout(name, source, layout, make_cfg, tmp_path):
    """mtl-import of the authors' checkpoint fixture, then mtl-eval on a tiny dataset in the real
    layout its experiment reads: every final task is scored (auxiliary-only tasks are not)."""
    import math

    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.eval import evaluate
    from mtl_vision.data.pascal_fixture import write_pascal_fixture
    from mtl_vision.importing import import_checkpoint

    record = torch.load(REFERENCE / f"{name}.pt", map_location="cpu", weights_only=True)
    crop = next(o for o in record["overrides"] if o.startswith("data.crop_size="))
    h, w = (int(v) for v in crop.split("=", 1)[1].strip("[]").split(","))
    if layout == "pascal":
        root = write_pascal_fixture(tmp_path / "PASCAL_MT", n=2, height=h, width=w)
    else:
        root = write_nyud_fixture(tmp_path / "data", layout=layout, n=2, height=h, width=w)
    cfg = make_cfg([*record["overrides"], f"data.root={root}", "data.num_workers=0", "data.val_batch_size=1"], tiny=False)
    ckpt = import_checkpoint(cfg, source=source, file=REFERENCE / f"{name}.pth", out=tmp_path / "run" / "checkpoints" / "x.ckpt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(
            config_name="eval",
            overrides=[f"ckpt={ckpt}", "edge_exact=false", f"hydra.run.dir={tmp_path / 'eval'}"],
            return_hydra_config=True,
        )
    HydraConfig().set_config(eval_cfg)
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(eval_cfg)
    final = record.get("final_tasks", record["tasks"])
    scored = {key.split("/")[1] for key in metrics if key.startswith("val/") and key.count("/") == 2}
    assert scored == set(final), f"{name}: scored {sorted(scored)}, expected the final tasks {final}"
    assert all(math.isfinite(v) for k, v in metrics.items() if not k.endswith("/loss")), metrics


def test_weights_beside_a_config_of_a_missing_package_are_read(tmp_path, monkeypatch):
    """MTLoRA saves its yacs CfgNode beside the weights: the import needs the weights, not yacs."""
    import importlib

    from mtl_vision.engine.checkpoint import read_checkpoint

    package = tmp_path / "site" / "foreigncfg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("class CfgNode(dict):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    node = importlib.import_module("foreigncfg").CfgNode(MODEL={"NAME": "mtlora"}, TRAIN={"BASE_LR": 5e-4})
    weight = torch.randn(3, 2)
    torch.save({"model": {"module.head.weight": weight}, "config": node, "epoch": 3}, tmp_path / "ckpt.pth")
    monkeypatch.delitem(sys.modules, "foreigncfg")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path / "site")])
    with pytest.raises(ValueError, match="No module named 'foreigncfg'"):
        read_checkpoint(tmp_path / "ckpt.pth", name="ckpt")
    state = read_state(tmp_path / "ckpt.pth")
    assert list(state) == ["head.weight"] and torch.equal(state["head.weight"], weight)
    stand_in = read_checkpoint(tmp_path / "ckpt.pth", name="ckpt", foreign=True)["config"]
    assert dict(stand_in) == {"MODEL": {"NAME": "mtlora"}, "TRAIN": {"BASE_LR": 5e-4}}
