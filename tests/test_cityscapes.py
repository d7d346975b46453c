"""Cityscapes in the MTAN / LibMTL `.npy` layouts: decoded values against the files as written
and against what the authors' CityScapes classes return (numbers in a fixture from their code),
the named error for each bad input, `mtl-data fixture|check`, a short training run, and the
balancer sweep of the balancing benchmark."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mtl_vision.cli.data import main as mtl_data
from mtl_vision.data.cityscapes import LAYOUTS, Cityscapes, label_folder, load_class_names
from mtl_vision.data.cityscapes_fixture import write_cityscapes_fixture
from mtl_vision.data.io import DataFileError

H, W, N = 16, 32, 2
TASKS = ["semseg", "depth"]
FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "cityscapes_data.pt"


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cityscapes")
    return {layout: write_cityscapes_fixture(base / layout, layout=layout, n=N, height=H, width=W) for layout in LAYOUTS}


@pytest.fixture
def copy_of(roots, tmp_path):
    """A private, modifiable copy of a layout's fixture."""
    return lambda layout: Path(shutil.copytree(roots[layout], tmp_path / layout))


@pytest.mark.parametrize(("layout", "labels"), [("mtan", 7), ("mtan", 19), ("libmtl", 7)])
def test_samples_decode_as_the_files_say(roots, layout, labels):
    ds = Cityscapes(root=roots[layout], split="val", tasks=TASKS, labels=labels)
    assert ds.layout == layout and len(ds) == N and ds.num_classes == labels
    assert ds.class_names["semseg"] == load_class_names(labels) and len(load_class_names(labels)) == labels
    for i in range(N):
        sample = ds[i]
        image = np.load(roots[layout] / "val" / "image" / f"{i}.npy")
        label = np.load(roots[layout] / "val" / label_folder(layout, labels) / f"{i}.npy")
        depth = np.load(roots[layout] / "val" / "depth" / f"{i}.npy")
        assert sample["image"].shape == (3, H, W) and sample["image"].dtype == torch.float32
        np.testing.assert_array_equal(sample["image"].numpy(), image.transpose(2, 0, 1))
        assert sample["semseg"].dtype == torch.int64
        np.testing.assert_array_equal(sample["semseg"].numpy(), np.where(label == -1, 255, label))
        assert (sample["semseg"] == 255).any() and (label == -1).any(), "the fixture has void pixels"
        np.testing.assert_array_equal(sample["depth"].numpy(), depth.transpose(2, 0, 1))
        assert (sample["depth"] == 0).any() and 0 < sample["depth"].max() < 0.5, "inverse depth with holes"
        assert sample["meta"]["name"] == str(i) and sample["meta"]["size"].tolist() == [H, W]
    assert ds.check() == {"samples": N, "semseg": N, "depth": N}


def test_equal_to_what_the_authors_classes_read(tmp_path):
    """Files written by our fixture writer, read by their CityScapes classes (CAGrad and FAMO:
    `label_7/`; LibMTL: `label/`) in scripts/fixtures/cityscapes_data.py, and by ours."""
    ref = torch.load(FIXTURE, weights_only=False)
    assert {c["source"] for c in ref["cases"]} >= {"CAGrad", "FAMO", "LibMTL"}
    for layout, files in ref["files"].items():
        for rel, array in files.items():
            (tmp_path / layout / rel).parent.mkdir(parents=True, exist_ok=True)
            np.save(tmp_path / layout / rel, array)
    for case in ref["cases"]:
        root = tmp_path / case["layout"]
        ds = Cityscapes(root=root, split=case["split"], tasks=TASKS, labels=case["labels"], layout=case["layout"])
        assert len(ds) == len(case["theirs"]), case["source"]
        for i, (image, semantic, depth) in enumerate(case["theirs"]):
            ours = ds[i]
            torch.testing.assert_close(ours["image"], image, rtol=0, atol=0)
            void = torch.full_like(semantic, 255)
            torch.testing.assert_close(ours["semseg"], torch.where(semantic == -1, void, semantic).long(), rtol=0, atol=0)
            torch.testing.assert_close(ours["depth"], depth, rtol=0, atol=0)
            # what their losses and metrics mask: void labels (-1) and zero depth
            assert torch.equal(ours["semseg"] == 255, semantic == -1)
            assert torch.equal(ours["depth"] == 0, depth.sum(0, keepdim=True) == 0)


def test_augmentation_equals_their_random_scale_crop_and_flip(tmp_path):
    """data=cityscapes' training transform (MTAN's RandomScaleCrop + flip) on our samples, with the
    draws their CityScapes(augmentation=True) made, equals what their class returned."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mtl_vision.cli import CONFIG_DIR

    ref = torch.load(FIXTURE, weights_only=False)
    root = tmp_path / "mtan"
    for rel, array in ref["files"]["mtan"].items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(root / rel, array)
    ds = Cityscapes(root=root, split="train", tasks=TASKS)
    node = OmegaConf.load(CONFIG_DIR / "data" / "cityscapes.yaml").train_transform
    assert {c["source"] for c in ref["augmented"]} == {"CAGrad", "FAMO"}
    scales, flips = set(), set()
    for case in ref["augmented"]:
        for k, item in enumerate(case["items"]):
            transform = instantiate(node)
            draws = list(item["draws"])
            transform._randint = lambda lo, hi, d=draws: d.pop(0)
            transform._flip_draw = lambda f=item["flip_draw"]: f
            out = transform(ds[item["index"]])
            image, semantic, depth = item["theirs"]
            where = f"{case['source']} item {k}"
            torch.testing.assert_close(out["image"], image, rtol=1e-5, atol=1e-5 * float(image.abs().max()), msg=where)
            void = torch.full_like(semantic, 255)
            assert torch.equal(out["semseg"], torch.where(semantic == -1, void, semantic).long()), where
            torch.testing.assert_close(out["depth"], depth, rtol=1e-5, atol=1e-5 * float(depth.abs().max()), msg=where)
            assert not draws, "every draw of theirs was used"
            scales.add(item["draws"][0])
            flips.add(item["flip_draw"] < 0.5)
    assert scales == {0, 1, 2} and flips == {True, False}, "every scale, with and without the flip"


def test_layout_is_detected_or_refused_by_name(roots, copy_of):
    assert Cityscapes(root=roots["libmtl"], split="train", tasks=TASKS).layout == "libmtl"
    assert Cityscapes(root=roots["mtan"], split="train", tasks=TASKS, layout="mtan").layout == "mtan"
    with pytest.raises(ValueError, match=r"labels=19: the libmtl layout .* 7-class labels only"):
        Cityscapes(root=roots["libmtl"], split="train", tasks=TASKS, labels=19)
    with pytest.raises(ValueError, match=r"data.dataset.labels: expected one of \(7, 19\).* got 2"):
        Cityscapes(root=roots["mtan"], split="train", tasks=TASKS, labels=2)
    with pytest.raises(ValueError, match=r"data.layout: expected None \(detect\) or one of"):
        Cityscapes(root=roots["mtan"], split="train", tasks=TASKS, layout="nyud_mt")
    with pytest.raises(ValueError, match=r"tasks: expected distinct names from \('semseg', 'depth'\)"):
        Cityscapes(root=roots["mtan"], split="train", tasks=["semseg", "normals"])
    with pytest.raises(FileNotFoundError, match=r"(?s)the folder does not exist.*label_19/<i>.npy"):
        Cityscapes(root=roots["mtan"] / "nowhere", split="train", tasks=TASKS)
    with pytest.raises(ValueError, match=r"split 'test': expected the split folder .*test/image/ \(splits found: \['train', 'val'\]\)"):
        Cityscapes(root=roots["mtan"], split="test", tasks=TASKS)
    root = copy_of("mtan")
    shutil.rmtree(root / "train" / "label_7")
    shutil.rmtree(root / "train" / "label_19")
    with pytest.raises(FileNotFoundError, match=r"no .*train/label_7/ \(mtan, data.dataset.labels=7\) and no .*train/label/ \(libmtl\)"):
        Cityscapes(root=root, split="train", tasks=TASKS)
    assert len(Cityscapes(root=root, split="train", tasks=["depth"])) == N, "depth alone needs no labels"
    shutil.rmtree(root / "train" / "depth")
    with pytest.raises(FileNotFoundError, match=r"layout 'mtan' needs .*train/depth/ for task 'depth'"):
        Cityscapes(root=root, split="train", tasks=["depth"])


def _corrupt(root: Path, rel: str, array) -> Path:
    path = root / rel
    if isinstance(array, bytes):
        path.write_bytes(array)
    else:
        np.save(path, array)
    return path


BAD_FILES = [
    ("val/image/1.npy", np.zeros((H, W), np.float32), r"image has shape \(16, 32\), expected HxWx3"),
    ("val/image/1.npy", np.full((H, W, 3), 2.0, np.float32), r"image values span \[2, 2\], expected floats in \[0, 1\]"),
    ("val/label_7/1.npy", np.full((H, W), 7.0, np.float32), r"label value\(s\) \[7.0\] are not integers in -1..6"),
    ("val/label_7/1.npy", np.full((H, W), 0.5, np.float32), r"label value\(s\) \[0.5\] are not integers in -1..6"),
    ("val/label_7/1.npy", np.zeros((H, W + 1), np.float32), r"semseg size \(16, 33\) \(HxW\) does not match the image size \(16, 32\)"),
    ("val/label_7/1.npy", np.zeros((H, W), "U1"), r"label has dtype <U1, expected a numeric array"),
    ("val/depth/1.npy", np.zeros((H, W, 2), np.float32), r"depth has shape \(16, 32, 2\), expected HxW"),
    ("val/depth/1.npy", np.zeros((H, W, 1), np.int32), r"depth \(inverse depth\) has dtype int32, expected a float array"),
    ("val/depth/1.npy", b"not an array", r"unreadable or corrupt .npy"),
]


@pytest.mark.parametrize(("rel", "array", "message"), BAD_FILES, ids=[f"{r}:{m[:24]}" for r, _, m in BAD_FILES])
def test_a_bad_file_is_named_with_what_was_expected(copy_of, rel, array, message):
    root = copy_of("mtan")
    path = _corrupt(root, rel, array)
    ds = Cityscapes(root=root, split="val", tasks=TASKS)
    ds[0]  # the other sample is fine
    with pytest.raises(DataFileError, match=message) as err:
        ds[1]
    assert str(path) in str(err.value) and "Cityscapes (mtan) val/1" in str(err.value)
    with pytest.raises(DataFileError, match=message):
        ds.check()


def test_missing_and_misnamed_files_are_named(copy_of):
    root = copy_of("mtan")
    (root / "val" / "depth" / "1.npy").unlink()
    with pytest.raises(DataFileError, match=r"missing file for Cityscapes \(mtan\) val/1: .*val/depth/1.npy"):
        Cityscapes(root=root, split="val", tasks=TASKS)[1]
    (root / "val" / "image" / "x1.npy").write_bytes(b"")
    with pytest.raises(DataFileError, match=r"val/image: file 'x1.npy' is not named <integer>.npy"):
        Cityscapes(root=root, split="val", tasks=TASKS)


def test_void_nan_and_negative_depth_are_invalid(copy_of):
    root = copy_of("mtan")
    depth = np.load(root / "val" / "depth" / "0.npy")
    depth[0, :3, 0] = [np.nan, -0.1, np.inf]
    np.save(root / "val" / "depth" / "0.npy", depth)
    out = Cityscapes(root=root, split="val", tasks=["depth"])[0]["depth"]
    assert out[0, 0, :3].tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mtl_data_fixture_and_check(tmp_path, capsys, layout):
    out = tmp_path / layout
    assert mtl_data(["fixture", "--layout", f"cityscapes_{layout}", "--out", str(out), "--n", "2"]) == 0
    folders = sorted(p.name for p in (out / "train").iterdir())
    assert folders == (["depth", "image", "label_19", "label_7"] if layout == "mtan" else ["depth", "image", "label"])
    assert np.load(out / "val" / "image" / "1.npy").shape == (128, 256, 3), "MTAN's small version by default"
    capsys.readouterr()
    assert mtl_data(["check", "data=cityscapes", f"data.root={out}"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "val" in text
    labels = ["data.dataset.labels=19"] if layout == "mtan" else []
    assert mtl_data(["check", "data=cityscapes", f"data.root={out}", *labels]) == 0
    victim = out / "val" / "depth" / "1.npy"
    victim.write_bytes(b"broken")
    assert mtl_data(["check", "data=cityscapes", f"data.root={out}"]) == 1
    assert str(victim) in capsys.readouterr().err


@pytest.mark.parametrize("labels", [7, 19])
def test_short_training_run(make_cfg, tmp_path, labels, one_thread):
    from mtl_vision.cli.train import train

    root = write_cityscapes_fixture(tmp_path / "data", n=3, height=32, width=64)
    cfg = make_cfg(["data=cityscapes", f"data.root={root}", f"data.dataset.labels={labels}", "data.crop_size=[32,64]",
                    "data.batch_size=2", "trainer.max_steps=2", "trainer.max_epochs=3"])
    value = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/semseg/mIoU"] == value and "val/depth/rmse" in metrics
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    heads = [v for k, v in state.items() if "semseg" in k and k.endswith("weight") and v.dim() == 4]
    assert heads and heads[-1].shape[0] == labels, "the semseg head has one channel per class of the label set"


def test_the_mtan_cityscapes_experiment_is_the_famo_recipe(make_cfg):
    cfg = make_cfg(["experiment=mtan_cityscapes"], tiny=False)
    assert cfg.backbone._target_.endswith("SegNet") and cfg.decoder._target_.endswith("MTANDecoder")
    assert cfg.data.dataset._target_.endswith("Cityscapes") and cfg.data.dataset.labels == 7
    assert list(cfg.data.tasks) == TASKS and list(cfg.data.crop_size) == [128, 256]
    assert (cfg.data.batch_size, cfg.data.val_batch_size, cfg.trainer.max_epochs) == (8, 8, 200)
    assert cfg.data.train_transform._target_.endswith("MTANTrainTransform")
    assert list(cfg.data.train_transform.scales) == [1.0, 1.2, 1.5] and cfg.data.train_transform.flip_prob == 0.5
    assert cfg.optim._target_ == "torch.optim.Adam" and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0
    assert (cfg.sched.step_size, cfg.sched.gamma, cfg.sched.every) == (100, 0.5, "epoch")
    assert cfg.eval.protocol == "mtan" and cfg.callbacks.last_epochs.epochs == 10
    assert Path(cfg.delta_m.baselines).is_file()


def test_famo_takes_its_cityscapes_gamma_under_the_experiment(make_cfg):
    """conf/balancer_recipe/<experiment>/<balancer>.yaml merges into the chosen balancer."""
    from mtl_vision.cli import CONFIG_DIR

    assert make_cfg(["experiment=mtan_cityscapes", "balancer=famo"], tiny=False).balancer.gamma == 0.01  # run.sh
    assert make_cfg(["balancer=famo"]).balancer.gamma == 0.001
    assert make_cfg(["experiment=mtan_cityscapes", "balancer=famo", "balancer.gamma=0.1"], tiny=False).balancer.gamma == 0.1
    for recipe in (CONFIG_DIR / "balancer_recipe").glob("*/*.yaml"):
        assert (CONFIG_DIR / "experiment" / f"{recipe.parent.name}.yaml").is_file(), recipe
        assert (CONFIG_DIR / "balancer" / recipe.name).is_file(), recipe


def test_delta_m_is_their_delta_fn():
    """Our Δm with the experiment's baselines file equals FAMO experiments/cityscapes/utils.py
    delta_fn (BASE 0.7401, 0.9316, 0.0125, 27.77; higher-is-better signs 1, 1, 0, 0), with the
    other sign, on a made-up result."""
    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.metrics.delta_m import delta_m, load_baselines

    baselines = load_baselines(CONFIG_DIR.parent / "baselines" / "mtan" / "cityscapes_segnet.yaml", "mtan")
    theirs_base = np.array([0.7401, 0.9316, 0.0125, 27.77])
    result = np.array([0.7518, 0.9349, 0.0155, 46.77])  # their fractions, the LS row of the papers
    theirs = float(((-1.0) ** np.array([1, 1, 0, 0]) * (result - theirs_base) / theirs_base).mean() * 100)
    ours = {"val/semseg/mIoU": 75.18, "val/semseg/pixel_acc": 93.49, "val/depth/abs_err": 0.0155,
            "val/depth/abs_rel": 46.77, "val/depth/rmse": 1.0}  # rmse: not in the baselines, left out
    value = delta_m(ours, baselines, TASKS, convention="libmtl", protocol="mtan")
    assert value == pytest.approx(-theirs, rel=1e-9) and value == pytest.approx(-22.62, abs=0.005)
    assert delta_m(ours, baselines, TASKS, convention="pooled", protocol="mtan") == pytest.approx(value, rel=1e-12)


def test_the_mtan_cityscapes_experiment_trains(make_cfg, tmp_path, one_thread):
    from mtl_vision.cli.train import train

    root = write_cityscapes_fixture(tmp_path / "data", n=2, height=32, width=64)
    cfg = make_cfg(["experiment=mtan_cityscapes", f"data.root={root}", "data.crop_size=[32,64]", "data.num_workers=0",
                    "data.batch_size=2", "data.val_batch_size=2", "trainer.max_epochs=1",
                    "backbone.widths=[8,8,16,16,16]", "summary=false"], tiny=False)  # narrow SegNet: seconds
    value = train(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["val/delta_m"] == value
    assert {"val/semseg/mIoU", "val/semseg/pixel_acc", "val/depth/abs_err", "val/depth/abs_rel"} <= set(metrics)
    last = json.loads((tmp_path / "run" / "metrics_last10.json").read_text())
    assert last["validations"] == 1 and "val/delta_m" in last


def test_the_benchmark_table_averages_the_seeds_of_each_balancer(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "balancer_benchmark_table.py"
    spec = importlib.util.spec_from_file_location("balancer_benchmark_table", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for job, (balancer, seed, miou, delta) in enumerate([("ew", 0, 70.0, -20.0), ("ew", 1, 72.0, -24.0),
                                                         ("famo", 0, 74.0, -8.0), ("famo", 1, 75.0, -9.0)]):
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
        (tmp_path / str(job) / ".hydra" / "overrides.yaml").write_text(f"- balancer={balancer}\n- seed={seed}\n")
        name = "metrics.json" if job == 3 else "metrics_last10.json"
        metrics = {"val/semseg/mIoU": miou, "val/depth/abs_err": 0.0125, "val/delta_m": delta}
        (tmp_path / str(job) / name).write_text(json.dumps(metrics))
    (tmp_path / "4" / ".hydra").mkdir(parents=True)  # unfinished: skipped
    (tmp_path / "4" / ".hydra" / "overrides.yaml").write_text("- balancer=pcgrad\n- seed=0\n")
    assert script.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| balancer | semseg/mIoU | depth/abs_err | Δm % (lower is better) | seeds |"
    assert lines[2:] == ["| ew | 71.00 | 0.0125 | +22.00 | 2 |", "| famo * | 74.50 | 0.0125 | +8.50 | 2 |"]
