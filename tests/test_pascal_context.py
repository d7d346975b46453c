"""PascalContext on fixtures written in the real PASCAL_MT layout (mtl_vision.data.pascal_fixture)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi
from scipy.io import loadmat, savemat

from mtl_vision.data.io import DataFileError
from mtl_vision.data.pascal_context import (
    TASK_NAMES,
    PascalContext,
    derive_normals_valid_ids,
    human_part_groups,
    label_boundaries,
    normals_valid_ids,
    thin,
)
from mtl_vision.data.pascal_fixture import CLASS_MAP, PartObject, write_parts_mat, write_pascal_fixture

REFERENCE = Path(os.environ.get("MTL_REFERENCE_DATA", "/work/shared/reference-data"))
ALL = list(TASK_NAMES)


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> Path:
    return write_pascal_fixture(tmp_path_factory.mktemp("pascal") / "PASCAL_MT", n=3)


@pytest.fixture
def root(fixture_root: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(fixture_root, tmp_path / "PASCAL_MT"))


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def _reference_parts(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The references' painting, written with their positional access into loadmat's result."""
    _, part_to_group = human_part_groups()
    objects = loadmat(str(path))["anno"][0][0][1][0]
    has_person = any(obj[1][0][0] == 15 and obj[2].sum() > 0 for obj in objects)
    target = np.zeros(shape, dtype=np.int64)
    for obj in objects:
        if obj[1][0][0] == 15 and len(obj[3]) != 0:
            for part in obj[3][0]:
                target[part[1].astype(bool)] = part_to_group[str(part[0][0])]
    return target if has_person and target.any() else np.full(shape, 255)


def test_fixture_has_the_real_layout_and_encodings(fixture_root: Path) -> None:
    ids = {s: (fixture_root / "ImageSets" / "Context" / f"{s}.txt").read_text().split() for s in ("train", "val")}
    assert ids == {"train": ["2008_000000", "2008_000002", "2008_000004"],
                   "val": ["2008_000001", "2008_000003", "2008_000005"]}
    with Image.open(fixture_root / "semseg" / "VOC12" / "2008_000000.png") as img:
        assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]  # VOC colour of aeroplane
    with Image.open(fixture_root / "semseg" / "pascal-context" / "2008_000001.png") as img:
        assert img.mode == "L"
    assert loadmat(str(fixture_root / "pascal-context" / "trainval" / "2008_000000.mat"))["LabelMap"].dtype == np.uint16
    objects = loadmat(str(fixture_root / "human_parts" / "2008_000000.mat"))["anno"][0][0][1][0]
    person = next(obj for obj in objects if obj[1][0][0] == 15)
    assert str(person[0][0]) == "person" and person[2].dtype == np.uint8
    assert {"hair", "head", "torso", "luarm", "rlarm", "lfoot"} <= {str(p[0][0]) for p in person[3][0]}
    assert any(obj[1][0][0] != 15 and len(obj[3]) for obj in objects)  # other classes carry parts too


@pytest.mark.parametrize("split", ["train", "val"])
def test_items_match_the_files_after_the_documented_conventions(fixture_root: Path, split: str) -> None:
    ds = PascalContext(root=str(fixture_root), split=split, tasks=ALL)
    assert ds.class_names["semseg"][0] == "background" and ds.class_names["semseg"][20] == "tvmonitor"
    assert ds.class_names["human_parts"] == ["background", "head", "torso", "upper_arms", "lower_arms",
                                             "upper_legs", "lower_legs"]
    valid_ids = np.array(normals_valid_ids())
    for index, name in enumerate(ds.ids):
        item = ds[index]
        h, w = 96, 128
        assert item["meta"]["index"] == index and item["meta"]["name"] == name
        assert item["meta"]["size"].tolist() == [h, w]
        rgb = _png(fixture_root / "JPEGImages" / f"{name}.jpg")
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, h, w)
        assert torch.equal(item["image"], torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
        voc = fixture_root / "semseg" / "VOC12" / f"{name}.png"
        semseg = _png(voc if voc.exists() else fixture_root / "semseg" / "pascal-context" / f"{name}.png")
        assert item["semseg"].dtype == torch.int64 and np.array_equal(item["semseg"].numpy(), semseg)
        parts = _reference_parts(fixture_root / "human_parts" / f"{name}.mat", (h, w))
        assert item["human_parts"].dtype == torch.int64 and np.array_equal(item["human_parts"].numpy(), parts)
        labels = loadmat(str(fixture_root / "pascal-context" / "trainval" / f"{name}.mat"))["LabelMap"]
        raw = 2 * _png(fixture_root / "normals_distill" / f"{name}.png").astype(np.float64) / 255 - 1
        unit = raw / np.linalg.norm(raw, axis=2, keepdims=True)
        expected = (unit * np.isin(labels, valid_ids)[..., None]).transpose(2, 0, 1)
        assert item["normals"].shape == (3, h, w) and np.allclose(item["normals"].numpy(), expected, atol=1e-6)
        sal = _png(fixture_root / "sal_distill" / f"{name}.png")
        assert np.array_equal(item["saliency"].numpy(), (sal / 255 > 0.5)[None].astype(np.float32))
        laplacian = ndi.convolve(labels.astype(np.int64), [[0, 1, 0], [1, -4, 1], [0, 1, 0]], mode="mirror")
        edge = item["edge"].numpy()
        assert edge.shape == (1, h, w) and set(np.unique(edge)) <= {0.0, 1.0} and edge.any()
        assert np.array_equal(edge[0], thin(laplacian != 0))
        assert not (edge[0] > (laplacian != 0)).any()  # edges only where the label changes


def test_fixture_conventions_are_exercised(fixture_root: Path) -> None:
    """Person-free samples are all 255, normals are masked by class, and the saliency threshold
    sits between the 8-bit values 127 and 128."""
    items = [PascalContext(root=fixture_root, split=s, tasks=ALL)[i] for s in ("train", "val") for i in range(3)]
    has_person = [bool((it["semseg"] == 15).any()) for it in items]
    assert has_person == [True, False, True, True, False, True]
    for item, person in zip(items, has_person):
        assert set(torch.unique(item["human_parts"]).tolist()) == (set(range(7)) if person else {255})
    labels = loadmat(str(fixture_root / "pascal-context" / "trainval" / "2008_000000.mat"))["LabelMap"]
    normals = items[0]["normals"]
    for cls, (_, _, context_id) in CLASS_MAP.items():
        region = torch.from_numpy(labels == context_id)
        if region.any():
            norms = normals.norm(dim=0)[region]
            expected = 0.0 if cls in ("floor", "sphere") else 1.0  # ground, pottedplant: not NYUD classes
            assert torch.allclose(norms, torch.full_like(norms, expected), atol=1e-5), cls
    sal = _png(fixture_root / "sal_distill" / "2008_000000.png")
    sal_item = items[0]["saliency"][0].numpy()
    assert (sal == 127).any() and (sal == 128).any()
    assert (sal_item[sal == 127] == 0).all() and (sal_item[sal == 128] == 1).all()


def _box(r0: int, r1: int, c0: int, c1: int, h: int = 96, w: int = 128) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[r0:r1, c0:c1] = 1
    return mask


def test_human_parts_overlap_and_persons_without_parts(root: Path) -> None:
    h, w, box = 96, 128, _box
    path = root / "human_parts" / "2008_000000.mat"
    write_parts_mat(path, imname="2008_000000", objects=[
        PartObject(cls="person", class_ind=15, mask=box(0, 50, 0, 50),
                   parts=[("torso", box(10, 40, 10, 40)), ("hair", box(10, 20, 10, 20))]),
        PartObject(cls="person", class_ind=15, mask=box(60, 90, 60, 120)),  # no part annotation
        PartObject(cls="bottle", class_ind=5, mask=box(30, 60, 30, 60), parts=[("body", box(30, 60, 30, 60))]),
        PartObject(cls="person", class_ind=15, mask=box(20, 50, 20, 60), parts=[("ruleg", box(30, 45, 30, 45))]),
    ])
    ds = PascalContext(root=root, split="train", tasks=["human_parts"])
    expected = np.zeros((h, w), np.int64)
    expected[10:40, 10:40] = 2
    expected[10:20, 10:20] = 1  # a later part overwrites an earlier one
    expected[30:45, 30:45] = 5  # and a later person an earlier one
    assert np.array_equal(ds[0]["human_parts"].numpy(), expected)  # person without parts: background, as references

    write_parts_mat(path, imname="2008_000000", objects=[PartObject(cls="person", class_ind=15, mask=box(0, 50, 0, 50))])
    assert (ds[0]["human_parts"] == 255).all()  # only unannotated persons: no supervision
    write_parts_mat(path, imname="2008_000000", objects=[])
    assert (ds[0]["human_parts"] == 255).all()
    assert ds.check() == {"samples": 3, "human_parts": 1}

    write_parts_mat(path, imname="2008_000000", objects=[
        PartObject(cls="person", class_ind=15, mask=box(0, 50, 0, 50), parts=[("tail", box(0, 5, 0, 5))])])
    with pytest.raises(DataFileError, match=r"train/2008_000000.*'tail'.*2008_000000\.mat"):
        ds[0]
    write_parts_mat(path, imname="2008_000000", objects=[
        PartObject(cls="person", class_ind=15, mask=np.ones((10, 10)), parts=[("head", np.ones((10, 10)))])])
    with pytest.raises(DataFileError, match=r"\(10, 10\).*\(96, 128\)"):
        ds[0]


def test_read_only_root_is_never_written(root: Path) -> None:
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    modes = {p: p.stat().st_mode for p in [root, *root.rglob("*")]}
    try:
        for p in modes:
            p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
        for split in ("train", "val"):
            ds = PascalContext(root=root, split=split, tasks=ALL)
            assert ds.check() == {"samples": 3, **{t: (2 if t == "human_parts" else 3) for t in ALL}}
    finally:
        for p, mode in modes.items():
            p.chmod(mode)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_constructor_errors(root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)does not exist.*JPEGImages/<id>\.jpg.*ImageSets/Context"):
        PascalContext(root=tmp_path / "nowhere", split="train", tasks=["semseg"])
    with pytest.raises(DataFileError, match=r"'test'.*ImageSets/Context/test\.txt.*\['train', 'val'\]"):
        PascalContext(root=root, split="test", tasks=["semseg"])
    with pytest.raises(ValueError, match="depth"):
        PascalContext(root=root, split="train", tasks=["semseg", "depth"])
    shutil.rmtree(root / "JPEGImages")  # only the split file is read up front
    ds = PascalContext(root=root, split="val", tasks=["edge"])
    assert len(ds) == 3 and ds.class_names == {}
    with pytest.raises(DataFileError, match=r"missing file for PASCAL-Context val/2008_000001: .*JPEGImages/2008_000001"):
        ds[0]


@pytest.mark.parametrize("relative", ["normals_distill/{}.png", "sal_distill/{}.png", "human_parts/{}.mat",
                                      "pascal-context/trainval/{}.mat", "JPEGImages/{}.jpg"])
@pytest.mark.parametrize("damage", ["missing", "garbage", "bit-flipped"])
def test_missing_or_corrupt_files_are_named(root: Path, relative: str, damage: str) -> None:
    path = root / relative.format("2008_000003")
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x13\x37 not an image or a mat file " * 40)
    else:  # keep the header, scramble the payload
        path.write_bytes(data[:160] + bytes(b ^ 0x5A for b in data[160:]))
    ds = PascalContext(root=root, split="val", tasks=ALL)
    with pytest.raises(DataFileError, match=rf"val/2008_000003.*{path.name}"):
        ds[1]


def test_semseg_errors(root: Path) -> None:
    ds = PascalContext(root=root, split="train", tasks=["semseg"])
    voc = root / "semseg" / "VOC12" / "2008_000000.png"
    Image.fromarray(np.full((96, 128), 30, np.uint8), "L").save(voc)
    with pytest.raises(DataFileError, match=r"train/2008_000000.*value 30 .*2008_000000\.png"):
        ds[0]
    Image.fromarray(np.zeros((90, 128), np.uint8), "L").save(voc)
    with pytest.raises(DataFileError, match=r"semseg size \(90, 128\).*image size \(96, 128\).*2008_000000\.png"):
        ds[0]
    voc.unlink()  # no VOC12 file and no pascal-context fallback: both are named
    with pytest.raises(DataFileError, match=r"VOC12/2008_000000\.png.*pascal-context/2008_000000\.png"):
        ds[0]


def test_size_and_label_map_errors(root: Path) -> None:
    ds = PascalContext(root=root, split="train", tasks=ALL)
    Image.fromarray(np.zeros((64, 64), np.uint8), "L").save(root / "sal_distill" / "2008_000002.png")
    with pytest.raises(DataFileError, match=r"saliency size \(64, 64\).*image size \(96, 128\).*sal_distill"):
        ds[1]
    bad = np.full((96, 128), 600, np.uint16)
    savemat(str(root / "pascal-context" / "trainval" / "2008_000004.mat"), {"LabelMap": bad})
    with pytest.raises(DataFileError, match=r"train/2008_000004.*LabelMap value 600.*2008_000004\.mat"):
        ds[2]


def test_transform_is_applied_last_and_tasks_are_restricted(fixture_root: Path) -> None:
    seen = []

    def transform(sample: dict) -> dict:
        seen.append(sorted(sample))
        return {**sample, "image": sample["image"].flip(-1)}

    ds = PascalContext(root=fixture_root, split="val", tasks=["saliency", "human_parts"], transform=transform)
    item = ds[-1]
    assert seen == [["human_parts", "image", "meta", "saliency"]] and item["meta"]["index"] == 2
    assert ds.class_names == {"human_parts": list(human_part_groups()[0])}
    plain = PascalContext(root=fixture_root, split="val", tasks=["saliency"])[2]
    assert torch.equal(item["image"], plain["image"].flip(-1))
    with pytest.raises(IndexError):
        ds[3]


def test_thin_and_boundaries() -> None:
    square = np.zeros((7, 7), bool)
    square[1:6, 2:5] = True
    skeleton = thin(square)
    assert skeleton.sum() < square.sum() and not (skeleton & ~square).any()
    labels = np.zeros((6, 8), np.uint16)
    labels[:, 4:] = 7
    assert np.array_equal(np.nonzero(label_boundaries(labels).any(axis=0))[0], [3])  # one thin column
    assert not label_boundaries(np.full((5, 5), 3, np.uint16)).any()
    skimage = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = ndi.binary_dilation(rng.random((40, 50)) < 0.05, iterations=int(rng.integers(0, 3)))
        assert np.array_equal(thin(mask), skimage.thin(mask))


def test_normals_valid_ids() -> None:
    ids = normals_valid_ids()
    assert len(ids) == 170 and ids == tuple(sorted(ids))
    # pinned: wall, floor, person, bottle, tvmonitor (the protocol's exception) / ground, pottedplant, sky, unlabelled
    assert {440, 158, 284, 34, 427} <= set(ids) and not {189, 308, 360, 0} & set(ids)
    toy_context, toy_nyu = {"wall": 3, "unknown": 4, "sky": 5, "tvmonitor": 9}, {"wall": 1, "unknown": 2, "tv": 3}
    assert derive_normals_valid_ids(toy_context, toy_nyu) == [3, 9]
    if not REFERENCE.is_dir():
        pytest.skip(f"reference data folder {REFERENCE} absent")
    context, nyu = (json.loads((REFERENCE / f).read_text()) for f in ("context_classes.json", "nyu_classes.json"))
    assert list(ids) == derive_normals_valid_ids(context, nyu)
    assert all(context[name] == cid for _, name, cid in CLASS_MAP.values())
    assert set(human_part_groups()[1]) == set(json.loads((REFERENCE / "pascal_part.json").read_text())["15"])


def _same_mat(a, b) -> bool:
    """Equal loadmat results: dicts, struct and object arrays compared element by element."""
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same_mat(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.names:
            return all(_same_mat(x[n], y[n]) for n in a.dtype.names for x, y in zip(a.flat, b.flat, strict=True))
        if a.dtype == object:
            return all(_same_mat(x, y) for x, y in zip(a.flat, b.flat, strict=True))
        return np.array_equal(a, b)
    return a == b


def test_fast_readers_equal_pil_and_scipy(fixture_root: Path) -> None:
    """The libdeflate paths give what PIL and scipy give, for every PNG and .mat of the fixture
    (palette, grey and RGB PNGs; struct and plain .mat files), and leave other files to them."""
    from mtl_vision.data.io import decode_png, inflate_mat, read_mat

    pngs, mats = sorted(fixture_root.rglob("*.png")), sorted(fixture_root.rglob("*.mat"))
    assert {Image.open(p).mode for p in pngs} == {"P", "L", "RGB"} and mats
    for path in pngs:
        with Image.open(path) as img:
            want = np.array(img)
        got = decode_png(path.read_bytes())
        assert got is not None and got.dtype == want.dtype and np.array_equal(got, want), path
    for path in mats:
        assert inflate_mat(path.read_bytes()) is not None
        assert _same_mat(read_mat(path), loadmat(str(path))), path
    rgb = pngs[0].read_bytes()
    assert decode_png(rgb[:-30]) is None and decode_png(b"GIF89a") is None  # truncated / not a PNG: PIL's turn
    assert decode_png(next(p for p in pngs if "sal_distill" in str(p)).read_bytes(), mode="RGB") is None
