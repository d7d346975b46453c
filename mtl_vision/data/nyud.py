"""NYUD-v2 (Silberman et al., ECCV 2012) for multi-task dense prediction, read from the layouts
researchers already have on disk; nothing is converted or written.

File conventions, as the reference loaders decode them:
- `nyud_mt`: MTI-Net (SimonVandenhende/Multi-Task-Learning-PyTorch `data/nyud.py`) and ATRC
  (brdav/atrc `src/data/nyud.py`): JPEG images; segmentation PNG with 0 = unlabelled and 1..40
  the NYUv2-40 classes (Gupta et al. 2013); depth `.npy` HxW metres (0 = invalid, as
  `evaluation/eval_depth.py` masks it); normals `.npy` HxWx3 in [-1,1] (zero = invalid, as
  `evaluation/eval_normals.py` masks and renormalises it); edge `.npy` HxW in {0,1}. (The
  older facebookresearch/astmt loader reads .mat segmentation/depth and .jpg normals instead;
  that layout is not supported.)
- `nyudv2`: the ATRC download used by InvPT/TaskPrompter (prismformore/Multi-Task-Transformer
  `TaskPrompter/data/nyud.py`): PNG images, normals PNG decoded 2x/255-1, edge PNG decoded x/255.
- `mtan`: MTAN (lorenmt/mtan `im2im_pred/create_dataset.py`, 288x384): `<split>/<kind>/<i>.npy`
  float64 arrays: image HxWx3 in [0,1], label HxW (-1 = unlabelled, 0..12 the NYUv2-13
  classes), depth HxWx1 metres and normal HxWx3 (zero = invalid, as its `utils.py` masks them).

Targets follow DESIGN.md: class maps use 255 for unlabelled, depth 0 and all-zero normals mark
invalid geometry (also NaN/inf/negative depth and NaN/short normals in a file), normals are
renormalised to unit length, edges are binarised at 0.5.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.io import (
    DataFileError,
    check_size,
    count_present,
    read_ids,
    read_npy,
    read_pil,
    read_rgb,
    sample_index,
)

SUPPORTED_TASKS = ("semseg", "depth", "normals", "edge")
LAYOUTS = ("nyud_mt", "nyudv2", "mtan")
MIN_NORMAL_LENGTH = 0.5  # shorter vectors are invalid: zero vectors, and mid-grey (the 8-bit PNG "zero")

# task -> (folder, extension); NYUD folders are under the root, MTAN folders under <root>/<split>.
_FILES: dict[str, dict[str, tuple[str, str]]] = {
    "nyud_mt": {"image": ("images", ".jpg"), "semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
                "normals": ("normals", ".npy"), "edge": ("edge", ".npy")},
    "nyudv2": {"image": ("images", ".png"), "semseg": ("segmentation", ".png"), "depth": ("depth", ".npy"),
               "normals": ("normals", ".png"), "edge": ("edge", ".png")},
    "mtan": {"image": ("image", ".npy"), "semseg": ("label", ".npy"), "depth": ("depth", ".npy"),
             "normals": ("normal", ".npy")},
}
_CLASS_FILES = {"nyud_mt": "nyud40_classes.json", "nyudv2": "nyud40_classes.json", "mtan": "mtan13_classes.json"}

EXPECTED_LAYOUTS = """\
nyud_mt  (MTI-Net / ASTMT / ATRC "NYUD_MT")
  <root>/gt_sets/{train,val}.txt   one id per line (795 / 654)
  <root>/images/<id>.jpg
  <root>/segmentation/<id>.png     0 = unlabelled, 1..40
  <root>/depth/<id>.npy            HxW float, metres, 0 = invalid
  <root>/normals/<id>.npy          HxWx3 float in [-1, 1], 0 = invalid
  <root>/edge/<id>.npy             HxW in {0, 1}
nyudv2   (ATRC / InvPT "NYUDv2")
  <root>/gt_sets/{train,val}.txt
  <root>/images/<id>.png
  <root>/segmentation/<id>.png     0 = unlabelled, 1..40
  <root>/depth/<id>.npy            HxW float, metres, 0 = invalid
  <root>/normals/<id>.png          RGB, decoded 2x/255-1
  <root>/edge/<id>.png             decoded x/255
mtan     (MTAN, Liu et al. 2019; 13 classes, 288x384, no edges)
  <root>/{train,val}/image/<i>.npy    HxWx3 float in [0, 1], i = 0..N-1
  <root>/{train,val}/label/<i>.npy    HxW, -1 = unlabelled, 0..12
  <root>/{train,val}/depth/<i>.npy    HxWx1 float, metres, 0 = invalid
  <root>/{train,val}/normal/<i>.npy   HxWx3 float in [-1, 1], 0 = invalid"""


def load_class_names(layout: str) -> list[str]:
    """The class names of a layout's segmentation, from the package's `data/meta/*.json`."""
    text = resources.files("mtl_vision.data").joinpath("meta", _CLASS_FILES[layout]).read_text(encoding="utf-8")
    return list(json.loads(text)["classes"])


def _layout_error(root: Path, problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"NYUD-v2 root {root}: {problem}. Expected one of these layouts:\n{EXPECTED_LAYOUTS}")


def _bad(sample: str, path: Path, what: str) -> DataFileError:
    return DataFileError(f"{sample}: {what} ({path})")


def _hw(array: np.ndarray, *, trailing: int | None, sample: str, path: Path, what: str) -> np.ndarray:
    """Check an array is HxW, or HxWx`trailing` (HxWx1 is squeezed to HxW)."""
    shapes = ["HxW"] if trailing is None else [f"HxWx{trailing}"]
    if trailing is None and array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    ok = array.ndim == 2 if trailing is None else (array.ndim == 3 and array.shape[2] == trailing)
    if not ok:
        raise _bad(sample, path, f"{what} has shape {array.shape}, expected {' or '.join(shapes)}")
    return array


_KINDS = {"f": "a float", "ui": "an integer", "uif": "a numeric", "buif": "a numeric or boolean"}


def _numeric(array: np.ndarray, kinds: str, *, sample: str, path: Path, what: str) -> None:
    if array.dtype.kind not in kinds:
        raise _bad(sample, path, f"{what} has dtype {array.dtype}, expected {_KINDS[kinds]} array")


def _image_npy(path: Path, sample: str) -> torch.Tensor:
    array = _hw(read_npy(path, sample=sample), trailing=3, sample=sample, path=path, what="image")
    _numeric(array, "uif", sample=sample, path=path, what="image")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / np.float32(255)
    else:
        lo, hi = float(array.min()), float(array.max())
        if not (lo >= -1e-3 and hi <= 1 + 1e-3):  # NaN fails too
            raise _bad(sample, path, f"image values span [{lo:g}, {hi:g}], expected floats in [0, 1]")
        array = np.clip(array, 0, 1).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


_NYUD_LUT = np.array([IGNORE_INDEX, *range(40)], dtype=np.int64)  # file value -> class (0 = unlabelled)


def _semseg_png(path: Path, sample: str) -> np.ndarray:
    array = _hw(read_pil(path, sample=sample), trailing=None, sample=sample, path=path, what="segmentation")
    _numeric(array, "ui", sample=sample, path=path, what="segmentation")
    if array.max() > 40 or array.min() < 0:
        values = np.unique(array[(array > 40) | (array < 0)])[:5].tolist()
        raise _bad(sample, path, f"segmentation value(s) {values} outside 0..40 (0 = unlabelled, 1..40 = NYUD-40 classes)")
    return np.take(_NYUD_LUT, array)


def class_labels_npy(path: Path, sample: str, num_classes: int, classes: str) -> np.ndarray:
    """(H,W) int64 labels of a preprocessed `.npy` label map (MTAN, LibMTL: -1 = void, stored as
    floats or integers) with void as IGNORE_INDEX; a value that is no integer in -1..num_classes-1
    is an error naming the file and `classes` (what the labels are)."""
    array = _hw(read_npy(path, sample=sample), trailing=None, sample=sample, path=path, what="label")
    _numeric(array, "uif", sample=sample, path=path, what="label")
    bad = (array != np.rint(array)) | (array < -1) | (array >= num_classes)  # NaN is != itself
    if bad.any():
        values = np.unique(array[bad])[:5].tolist()
        raise _bad(sample, path, f"label value(s) {values} are not integers in -1..{num_classes - 1} "
                                 f"(-1 = void, 0..{num_classes - 1} = the {classes})")  # fmt: skip
    labels = array.astype(np.int64)
    labels[labels == -1] = IGNORE_INDEX
    return labels


def _semseg_mtan(path: Path, sample: str) -> np.ndarray:
    return class_labels_npy(path, sample, 13, "NYUv2-13 classes")


def positive_npy(path: Path, sample: str, what: str) -> np.ndarray:
    """(1,H,W) float32 of a `.npy` map whose valid values are positive and finite (depth, inverse
    depth); NaN, inf and values <= 0 become 0 (invalid). `what` names the quantity in errors."""
    array = _hw(read_npy(path, sample=sample), trailing=None, sample=sample, path=path, what="depth")
    _numeric(array, "f", sample=sample, path=path, what=what)
    depth = array.astype(np.float32)  # always a copy
    np.copyto(depth, 0, where=~((depth > 0) & (depth < np.inf)))  # NaN, inf, <= 0 -> invalid
    return depth[None]


def _depth_npy(path: Path, sample: str) -> np.ndarray:
    return positive_npy(path, sample, "depth (metres)")


def _normals_npy(path: Path, sample: str) -> np.ndarray:
    array = _hw(read_npy(path, sample=sample), trailing=3, sample=sample, path=path, what="normals")
    _numeric(array, "f", sample=sample, path=path, what="normals")
    from mtl_vision.data.decode import unit_normals  # compiled; numba is slow to import

    return unit_normals(array, MIN_NORMAL_LENGTH)


def _normals_png(path: Path, sample: str) -> np.ndarray:
    array = _hw(read_pil(path, sample=sample), trailing=3, sample=sample, path=path, what="normals")
    if array.dtype != np.uint8:
        raise _bad(sample, path, f"normals PNG has dtype {array.dtype}, expected 8-bit RGB")
    from mtl_vision.data.decode import unit_normals

    return unit_normals(array, MIN_NORMAL_LENGTH, lut=_PNG_NORMAL_LUT)


# uint8 code -> float32 component: 2x/255-1 as float32 operations (x * float32(2/255), then - 1)
_PNG_NORMAL_LUT = np.arange(256, dtype=np.float32) * np.float32(2 / 255) - np.float32(1)


def _edge_npy(path: Path, sample: str) -> np.ndarray:
    array = _hw(read_npy(path, sample=sample), trailing=None, sample=sample, path=path, what="edge")
    _numeric(array, "buif", sample=sample, path=path, what="edge")
    if array.dtype.kind != "b":
        lo, hi = float(array.min()), float(array.max())
        if not (lo >= 0 and hi <= 1):
            raise _bad(sample, path, f"edge values span [{lo:g}, {hi:g}], expected values in [0, 1]")
    return (array >= 0.5).astype(np.float32)[None]


def _edge_png(path: Path, sample: str) -> np.ndarray:
    array = _hw(read_pil(path, sample=sample), trailing=None, sample=sample, path=path, what="edge")
    if array.dtype == np.bool_:  # mode "1"
        return array.astype(np.float32)[None]
    if array.dtype != np.uint8:
        raise _bad(sample, path, f"edge PNG has dtype {array.dtype}, expected 8-bit grey (decoded x/255)")
    return (array >= 128).astype(np.float32)[None]  # x/255 >= 0.5


_DECODERS: dict[tuple[str, str], Callable[[Path, str], np.ndarray]] = {
    ("semseg", ".png"): _semseg_png, ("semseg", ".npy"): _semseg_mtan, ("depth", ".npy"): _depth_npy,
    ("normals", ".npy"): _normals_npy, ("normals", ".png"): _normals_png,
    ("edge", ".npy"): _edge_npy, ("edge", ".png"): _edge_png,
}


def _detect_nyud(root: Path, first_id: str) -> str | None:
    """nyud_mt has JPEG images, nyudv2 PNG: look at the first listed id, else at any file in images/."""
    images = root / "images"
    for layout in ("nyud_mt", "nyudv2"):
        if (images / f"{first_id}{_FILES[layout]['image'][1]}").is_file():
            return layout
    with os.scandir(images) as entries:
        for entry in entries:
            for layout in ("nyud_mt", "nyudv2"):
                if entry.name.endswith(_FILES[layout]["image"][1]):
                    return layout
    return None


def numbered_npy_ids(folder: Path, what: str) -> list[str]:
    """The sample ids of a folder of `<i>.npy` files (MTAN's and LibMTL's preprocessed layouts), in
    numeric order; a file not so named, or none at all, is an error naming `what` and the folder."""
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".npy")
    bad = [n for n in names if not n[:-4].isdigit()]
    if bad:
        raise DataFileError(f"{what} {folder}: file {bad[0]!r} is not named <integer>.npy")
    if not names:
        raise DataFileError(f"{what} {folder}: no <i>.npy files")
    return [str(i) for i in sorted(int(n[:-4]) for n in names)]


class NYUDv2(Dataset):
    """NYUD-v2 multi-task dataset in the `nyud_mt`, `nyudv2` or `mtan` layout (see EXPECTED_LAYOUTS).

    Args:
        root: dataset folder; only read, never written.
        split: `gt_sets/<split>.txt` (NYUD layouts) or the `<split>/` folder (MTAN).
        tasks: a subset of semseg, depth, normals, edge (MTAN has no edges).
        layout: None to detect it, or one of LAYOUTS.
        transform: `transform(sample) -> sample`, applied last.

    Items: image (3,H,W) float32 RGB in [0,1]; semseg (H,W) int64, 40 classes (13 for MTAN),
    255 = unlabelled; depth (1,H,W) float32 metres, 0 = invalid; normals (3,H,W) float32 unit
    vectors, all-zero = invalid; edge (1,H,W) float32 in {0,1}; meta {"index", "name", "size"}.
    Files are checked when a sample is read; `check()` reads the whole split.
    """

    def __init__(self, *, root: str | Path, split: str, tasks: Sequence[str], layout: str | None = None,
                 transform: Callable[[dict], dict] | None = None) -> None:
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in SUPPORTED_TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: expected distinct names from {SUPPORTED_TASKS}, got {tasks} (unsupported: {unknown})")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"layout: expected None (detect) or one of {LAYOUTS}, got {layout!r}")
        if not split or "/" in split or "\\" in split or split in (".", ".."):
            raise ValueError(f"split: expected a split name such as 'train' or 'val', got {split!r}")
        self.root, self.split, self.tasks, self.transform = Path(root), split, tasks, transform
        if not self.root.is_dir():
            raise _layout_error(self.root, "the folder does not exist")
        is_nyud = (self.root / "gt_sets").is_dir() and (self.root / "images").is_dir()
        is_mtan = any((self.root / s / "image").is_dir() for s in ("train", "val", split))
        if layout is None and not (is_nyud or is_mtan):
            raise _layout_error(self.root, "could not detect the layout (no gt_sets/ + images/, no train/image/ or val/image/)")
        if layout == "mtan" or (layout is None and not is_nyud):
            if not is_mtan:
                raise _layout_error(self.root, "layout 'mtan' needs <root>/<split>/image/")
            self.layout, self.ids = "mtan", self._mtan_ids()
        else:
            if not is_nyud:
                raise _layout_error(self.root, f"layout {layout!r} needs <root>/gt_sets/ and <root>/images/")
            self.ids = self._nyud_ids()
            self.layout = layout or _detect_nyud(self.root, self.ids[0])
            if self.layout is None:
                raise _layout_error(self.root, "could not detect the layout: images/ holds no .jpg (nyud_mt) or .png (nyudv2)")
        if "edge" in tasks and "edge" not in _FILES[self.layout]:
            raise ValueError(f"tasks: layout {self.layout!r} ({self.root}) has no edge maps; supported there: "
                             f"{[t for t in SUPPORTED_TASKS if t in _FILES[self.layout]]}")
        self.num_classes = 13 if self.layout == "mtan" else 40
        self.class_names: dict[str, list[str]] = {"semseg": load_class_names(self.layout)}
        self._base = self.root / split if self.layout == "mtan" else self.root

    def _nyud_ids(self) -> list[str]:
        path = self.root / "gt_sets" / f"{self.split}.txt"
        if not path.is_file():
            found = sorted(p.stem for p in (self.root / "gt_sets").glob("*.txt"))
            raise ValueError(f"split {self.split!r}: expected the split file {path} (splits found: {found})")
        return read_ids(path)

    def _mtan_ids(self) -> list[str]:
        folder = self.root / self.split / "image"
        if not folder.is_dir():
            found = sorted(p.parent.name for p in self.root.glob("*/image") if p.is_dir())
            raise ValueError(f"split {self.split!r}: expected the MTAN split folder {folder}/ (splits found: {found})")
        return numbered_npy_ids(folder, "MTAN split folder")

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, key: str, index: int) -> Path:
        """The file of `key` (image or a task) for sample `index`."""
        folder, ext = _FILES[self.layout][key]
        return self._base / folder / f"{self.ids[index]}{ext}"

    def _load(self, index: int) -> dict:
        index = sample_index(index, len(self.ids), self.split)
        name = self.ids[index]
        sample = f"NYUD-v2 ({self.layout}) {self.split}/{name}"
        path = self.path("image", index)
        image = _image_npy(path, sample) if path.suffix == ".npy" else read_rgb(path, sample=sample)
        size = tuple(image.shape[-2:])
        out: dict = {"image": image}
        for task in self.tasks:
            path = self.path(task, index)
            target = _DECODERS[(task, path.suffix)](path, sample)
            check_size(task, target.shape[-2:], size, path=path, sample=sample)
            out[task] = torch.from_numpy(target)
        out["meta"] = {"index": index, "name": name, "size": torch.tensor(size)}
        return out

    def __getitem__(self, index: int) -> dict:
        sample = self._load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self) -> dict[str, int]:
        """Read and validate every sample of the split (raising the first error found);
        returns {"samples": readable samples, <task>: samples with that task's file}, the same
        keys as every dataset's check() so `mtl-data check` prints one table."""
        return count_present(self._load, len(self), self.tasks)

    def __repr__(self) -> str:
        return f"NYUDv2(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, tasks={self.tasks}, n={len(self)})"
