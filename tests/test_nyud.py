"""NYUD-v2 loader on tiny fixtures written in the three real on-disk layouts: decoded values
against the files as written, layout detection, read-only roots, and the error for each bad input."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_vision.data.io import DataFileError
from mtl_vision.data.nyud import LAYOUTS, NYUDv2, load_class_names
from mtl_vision.data.nyud_fixture import write_nyud_fixture

H, W, N = 24, 32, 2
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]
MTAN_TASKS = ["semseg", "depth", "normals"]


def tasks_of(layout: str) -> list[str]:
    return MTAN_TASKS if layout == "mtan" else NYUD_TASKS


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("nyud")
    return {layout: write_nyud_fixture(base / layout, layout=layout, n=N, height=H, width=W) for layout in LAYOUTS}


@pytest.fixture
def copy_of(roots, tmp_path):
    """A private, modifiable copy of a layout's fixture."""
    return lambda layout: Path(shutil.copytree(roots[layout], tmp_path / layout))


def unit(vectors: np.ndarray) -> np.ndarray:
    """(..., 3) -> unit vectors, zero where the input has zero length."""
    length = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.where(length > 0, vectors / np.where(length > 0, length, 1), 0)


def expected(ds: NYUDv2, index: int) -> dict[str, np.ndarray]:
    """The targets decoded straight from the files with the documented conventions."""
    p = lambda key: ds.path(key, index)  # noqa: E731
    if ds.layout == "mtan":
        label = np.load(p("semseg"))
        return {"image": np.load(p("image")).transpose(2, 0, 1),
                "semseg": np.where(label == -1, 255, label).astype(np.int64),
                "depth": np.load(p("depth")).transpose(2, 0, 1),
                "normals": unit(np.load(p("normals"))).transpose(2, 0, 1)}
    seg = np.asarray(Image.open(p("semseg"))).astype(np.int64)
    out = {"image": np.asarray(Image.open(p("image")).convert("RGB")).transpose(2, 0, 1) / 255.0,
           "semseg": np.where(seg == 0, 255, seg - 1), "depth": np.load(p("depth"))[None]}
    if ds.layout == "nyud_mt":
        out["normals"] = unit(np.load(p("normals"))).transpose(2, 0, 1)
        out["edge"] = np.load(p("edge"))[None]
    else:
        out["normals"] = (2.0 * np.asarray(Image.open(p("normals"))) / 255 - 1).transpose(2, 0, 1)
        out["edge"] = np.asarray(Image.open(p("edge")))[None] / 255.0
    return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("split", ["train", "val"])
def test_values_equal_the_files(roots, layout, split):
    ds = NYUDv2(root=roots[layout], split=split, tasks=tasks_of(layout))
    assert ds.layout == layout and len(ds) == N
    for index in range(len(ds)):
        item, ref = ds[index], expected(ds, index)
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
        np.testing.assert_allclose(item["image"].numpy(), ref["image"], atol=1e-6)
        assert item["semseg"].dtype == torch.int64 and item["semseg"].shape == (H, W)
        np.testing.assert_array_equal(item["semseg"].numpy(), ref["semseg"])
        assert (item["semseg"] == 255).any(), "the fixture has unlabelled pixels"
        assert item["depth"].dtype == torch.float32 and item["depth"].shape == (1, H, W)
        np.testing.assert_allclose(item["depth"].numpy(), ref["depth"], rtol=1e-6)
        assert (item["depth"] == 0).any() and (item["depth"] > 0).any(), "the fixture has invalid depth"
        normals = item["normals"].numpy()
        assert item["normals"].dtype == torch.float32 and normals.shape == (3, H, W)
        valid = np.abs(normals).sum(axis=0) > 0
        assert 0 < valid.sum() < H * W, "the fixture has invalid normals"
        np.testing.assert_allclose(np.linalg.norm(normals[:, valid], axis=0), 1, atol=1e-5)
        if layout == "nyudv2":  # 8-bit quantisation: within 1/255 of 2x/255-1, up to the renormalisation
            np.testing.assert_allclose(normals[:, valid], ref["normals"][:, valid], atol=1.5 / 255)
            assert np.linalg.norm(ref["normals"][:, ~valid], axis=0).max() < 0.01  # mid-grey = zero vector
        else:
            np.testing.assert_allclose(normals, ref["normals"], atol=1e-6)
        if "edge" in ref:
            assert item["edge"].dtype == torch.float32 and item["edge"].shape == (1, H, W)
            np.testing.assert_array_equal(item["edge"].numpy(), ref["edge"])
            assert set(item["edge"].unique().tolist()) == {0.0, 1.0}
        assert item["meta"]["index"] == index and item["meta"]["name"] == ds.ids[index]
        assert item["meta"]["size"].tolist() == [H, W]


def test_class_names_and_ids(roots):
    nyud = NYUDv2(root=roots["nyud_mt"], split="train", tasks=["semseg"])
    mtan = NYUDv2(root=roots["mtan"], split="train", tasks=["semseg"])
    assert len(nyud.class_names["semseg"]) == 40 and nyud.class_names["semseg"][:3] == ["wall", "floor", "cabinet"]
    assert load_class_names("nyudv2")[-1] == "otherprop"
    assert mtan.class_names["semseg"] == ["bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
                                          "picture", "sofa", "table", "tv", "wall", "window"]
    assert mtan.ids == [str(i) for i in range(N)]
    assert all(len(i) == 6 and i.isdigit() for i in nyud.ids)
    assert set(nyud.ids).isdisjoint(NYUDv2(root=roots["nyud_mt"], split="val", tasks=["depth"]).ids)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forced_layout_and_only_requested_tasks(roots, layout):
    auto = NYUDv2(root=roots[layout], split="val", tasks=["depth"])
    forced = NYUDv2(root=roots[layout], split="val", tasks=["depth"], layout=layout)
    assert forced.layout == auto.layout == layout
    assert set(forced[0]) == {"image", "depth", "meta"}
    assert torch.equal(auto[1]["depth"], forced[1]["depth"])


def test_wrong_forced_layout_and_bad_arguments(roots):
    wrong = NYUDv2(root=roots["nyud_mt"], split="train", tasks=["normals"], layout="nyudv2")
    with pytest.raises(DataFileError, match=r"train/\d{6}.*images/\d{6}\.png"):
        wrong[0]
    with pytest.raises(FileNotFoundError, match="gt_sets"):
        NYUDv2(root=roots["mtan"], split="train", tasks=["depth"], layout="nyud_mt")
    with pytest.raises(ValueError, match="layout.*'nyud'"):
        NYUDv2(root=roots["nyud_mt"], split="train", tasks=["depth"], layout="nyud")
    with pytest.raises(ValueError, match=r"\(.semseg., .depth., .normals., .edge.\).*unsupported: \[.saliency.\]"):
        NYUDv2(root=roots["nyud_mt"], split="train", tasks=["semseg", "saliency"])
    with pytest.raises(ValueError, match="no edge"):
        NYUDv2(root=roots["mtan"], split="train", tasks=["semseg", "edge"])
    with pytest.raises(IndexError):
        NYUDv2(root=roots["mtan"], split="train", tasks=["depth"])[N]


def test_transform_is_applied_last_and_check_counts(roots):
    def transform(sample: dict) -> dict:
        assert sample["semseg"].dtype == torch.int64  # decoded before the transform runs
        return {**sample, "seen": True}

    ds = NYUDv2(root=roots["nyudv2"], split="train", tasks=["semseg", "edge"], transform=transform)
    assert ds[0]["seen"] is True
    assert ds.check() == {"samples": N, "semseg": N, "edge": N}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_read_only_root(copy_of, layout):
    root = copy_of(layout)
    before = snapshot(root)
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(modes[p] & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        ds = NYUDv2(root=root, split="val", tasks=tasks_of(layout))
        assert ds.check()["samples"] == N
        ds[0]
    finally:
        for p, mode in sorted(modes.items(), key=lambda kv: len(kv[0].parts)):
            p.chmod(mode)
    assert snapshot(root) == before


def test_fixture_is_deterministic(tmp_path):
    a = write_nyud_fixture(tmp_path / "a", layout="nyudv2", n=1, height=16, width=20)
    b = write_nyud_fixture(tmp_path / "b", layout="nyudv2", n=1, height=16, width=20)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


# ----------------------------------------------------------------------------- bad inputs


def test_missing_or_unrecognised_root_lists_the_layouts(tmp_path):
    for root in (tmp_path / "missing", tmp_path):
        with pytest.raises(FileNotFoundError) as err:
            NYUDv2(root=root, split="train", tasks=["depth"])
        message = str(err.value)
        assert str(root) in message
        for text in ("nyud_mt", "nyudv2", "mtan", "gt_sets/{train,val}.txt", "images/<id>.jpg", "normals/<id>.png",
                     "{train,val}/image/<i>.npy"):
            assert text in message


@pytest.mark.parametrize("layout, expected", [("nyud_mt", "gt_sets/test.txt"), ("mtan", "test/image")])
def test_unknown_split(roots, layout, expected):
    with pytest.raises(ValueError, match=expected):
        NYUDv2(root=roots[layout], split="test", tasks=["depth"])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_missing_file_names_the_id_and_path(copy_of, layout):
    root = copy_of(layout)
    ds = NYUDv2(root=root, split="train", tasks=tasks_of(layout))
    ds.path("depth", 1).unlink()
    ds[0]
    for call in (lambda: ds[1], ds.check):
        with pytest.raises(DataFileError) as err:
            call()
        assert f"train/{ds.ids[1]}" in str(err.value) and str(ds.path("depth", 1)) in str(err.value)


@pytest.mark.parametrize("layout, key", [("nyud_mt", "image"), ("nyud_mt", "normals"), ("nyudv2", "normals"),
                                         ("nyudv2", "edge"), ("nyudv2", "semseg"), ("mtan", "semseg")])
def test_corrupt_file(copy_of, layout, key):
    root = copy_of(layout)
    ds = NYUDv2(root=root, split="val", tasks=tasks_of(layout))
    ds.path(key, 0).write_bytes(b"\x89garbage, not an image or array" * 3)
    with pytest.raises(DataFileError, match="corrupt") as err:
        ds[0]
    assert f"val/{ds.ids[0]}" in str(err.value) and str(ds.path(key, 0)) in str(err.value)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_label_out_of_range(copy_of, layout):
    root = copy_of(layout)
    ds = NYUDv2(root=root, split="train", tasks=["semseg"])
    path = ds.path("semseg", 0)
    if layout == "mtan":
        label = np.load(path)
        label[3, 4] = 13
        np.save(path, label)
        bad = "13"
    else:
        seg = np.array(Image.open(path))
        seg[3, 4] = 41
        Image.fromarray(seg).save(path)
        bad = "41"
    with pytest.raises(DataFileError, match=rf"\[{bad}(\.0)?\]") as err:
        ds[0]
    assert str(path) in str(err.value)


@pytest.mark.parametrize("layout, key", [("nyud_mt", "semseg"), ("nyudv2", "normals"), ("mtan", "depth")])
def test_size_mismatch_names_both_sizes(copy_of, layout, key):
    root = copy_of(layout)
    ds = NYUDv2(root=root, split="train", tasks=tasks_of(layout))
    path = ds.path(key, 1)
    if path.suffix == ".npy":
        np.save(path, np.load(path)[:-2])
    else:
        Image.fromarray(np.asarray(Image.open(path))[:, :-3]).save(path)
    want = f"({H - 2}, {W})" if path.suffix == ".npy" else f"({H}, {W - 3})"
    with pytest.raises(DataFileError) as err:
        ds[1]
    message = str(err.value)
    assert want in message and f"({H}, {W})" in message and str(path) in message


def test_nan_and_negative_geometry_is_invalid(copy_of):
    root = copy_of("nyud_mt")
    ds = NYUDv2(root=root, split="train", tasks=["depth", "normals"])
    depth, normals = np.load(ds.path("depth", 0)), np.load(ds.path("normals", 0))
    depth[0, :3] = [np.nan, -1.0, np.inf]
    normals[1, 1] = [np.nan, 0.0, 1.0]
    normals[1, 2] = 0.0
    normals[1, 3] = [0.0, 0.0, 2.0]  # not unit: renormalised
    np.save(ds.path("depth", 0), depth)
    np.save(ds.path("normals", 0), normals)
    item = ds[0]
    assert item["depth"][0, 0, :3].tolist() == [0.0, 0.0, 0.0]
    assert torch.isfinite(item["normals"]).all()
    assert item["normals"][:, 1, 1].tolist() == [0.0, 0.0, 0.0] == item["normals"][:, 1, 2].tolist()
    assert item["normals"][:, 1, 3].tolist() == [0.0, 0.0, 1.0]


def test_wrong_array_shape(copy_of):
    root = copy_of("nyud_mt")
    ds = NYUDv2(root=root, split="train", tasks=["normals"])
    np.save(ds.path("normals", 0), np.load(ds.path("normals", 0)).transpose(2, 0, 1))
    with pytest.raises(DataFileError, match=r"normals has shape \(3, 24, 32\), expected HxWx3"):
        ds[0]


def test_detection_survives_a_missing_first_image(copy_of):
    root = copy_of("nyudv2")
    first = (root / "gt_sets" / "train.txt").read_text().split()[0]
    (root / "images" / f"{first}.png").unlink()
    ds = NYUDv2(root=root, split="train", tasks=["depth"])
    assert ds.layout == "nyudv2"
    with pytest.raises(DataFileError, match=rf"missing file for .*train/{first}: .*images/{first}\.png"):
        ds[0]
