"""Cityscapes (Cordts et al., CVPR 2016) as MTAN pre-processed it for multi-task learning (Liu,
Johns, Davison, CVPR 2019; lorenmt/mtan README, Jun 2019 update), the setting of the balancing
papers (CAGrad, Nash-MTL, FAMO, LibMTL): 128x256 images, semantic labels and inverse depth, one
`.npy` file per sample and kind; nothing is converted or written.

Layouts (`<root>/<split>/<folder>/<i>.npy`, splits `train` (2975) and `val` (500), i = 0..N-1):
- `mtan`: the MTAN download: `image/`, `label_7/` and `label_19/` (also `label_2/`, unused here),
  `depth/`; read by Cranial-XIX/CAGrad `cityscapes/create_dataset.py` and Cranial-XIX/FAMO
  `experiments/cityscapes/data.py` (their `CityScapes`/`Cityscapes`, `label_7`).
- `libmtl`: LibMTL's copy (median-research-group/LibMTL `examples/cityscapes/create_dataset.py`):
  the 7-class labels in `label/`.

File conventions, as those loaders decode them:
- image: HxWx3 floats in [0, 1] (RGB), moved to 3xHxW;
- labels: HxW, -1 = void (their `nll_loss(ignore_index=-1)` and `ConfMatrix` skip it), else the
  class (7: the non-void Cityscapes categories, 19: the Cityscapes train ids; names in
  `data/meta/cityscapes{7,19}_classes.json`);
- depth: HxWx1, *inverse* depth as MTAN stored it: the Cityscapes disparity maps, in the scale of
  their files (values in [0, ~0.49]; lorenmt/mtan issues #15, #25: the disparity with no further
  processing, the largest value 0.4922 being the largest 16-bit disparity code 32257 over 2^16),
  0 = invalid (their masks `sum(depth, channel) != 0`). It is kept as stored: the losses, the
  metrics (abs/rel error) and the published numbers are all in that scale, so `depth` here is
  inverse depth, not metres.

Targets follow DESIGN.md otherwise: class maps use 255 for void, depth 0 marks invalid pixels
(also NaN/inf/negative values in a file).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mtl_vision.data.io import check_size, count_present, sample_index
from mtl_vision.data.nyud import _image_npy, class_labels_npy, numbered_npy_ids, positive_npy

SUPPORTED_TASKS = ("semseg", "depth")
LAYOUTS = ("mtan", "libmtl")
LABEL_SETS = (7, 19)
SPLITS = ("train", "val")

EXPECTED_LAYOUTS = """\
mtan     (MTAN, Liu et al. 2019; CAGrad, Nash-MTL, FAMO; 128x256 or 256x512)
  <root>/{train,val}/image/<i>.npy      HxWx3 float in [0, 1], i = 0..N-1
  <root>/{train,val}/label_7/<i>.npy    HxW, -1 = void, 0..6  (data.dataset.labels=7)
  <root>/{train,val}/label_19/<i>.npy   HxW, -1 = void, 0..18 (data.dataset.labels=19)
  <root>/{train,val}/depth/<i>.npy      HxWx1 float, inverse depth (disparity), 0 = invalid
libmtl   (LibMTL examples/cityscapes: 7 classes only)
  <root>/{train,val}/image/<i>.npy
  <root>/{train,val}/label/<i>.npy      HxW, -1 = void, 0..6
  <root>/{train,val}/depth/<i>.npy"""


def label_folder(layout: str, labels: int) -> str:
    """The folder of the `labels`-class maps in `layout` (`label_7`, `label_19`; LibMTL: `label`)."""
    return "label" if layout == "libmtl" else f"label_{labels}"


def load_class_names(labels: int) -> list[str]:
    """The names of the 7 or 19 classes, from the package's `data/meta/cityscapes<labels>_classes.json`."""
    text = resources.files("mtl_vision.data").joinpath("meta", f"cityscapes{labels}_classes.json").read_text(encoding="utf-8")
    return list(json.loads(text)["classes"])


def _layout_error(root: Path, problem: str) -> FileNotFoundError:
    return FileNotFoundError(f"Cityscapes root {root}: {problem}. Expected one of these layouts:\n{EXPECTED_LAYOUTS}")


class Cityscapes(Dataset):
    """Cityscapes for multi-task learning in the MTAN or LibMTL `.npy` layout (see EXPECTED_LAYOUTS).

    Args:
        root: dataset folder; only read, never written.
        split: the `<root>/<split>/` folder (`train`, `val`; the balancing papers test on `val`).
        tasks: a subset of semseg, depth.
        labels: 7 (the categories, the balancing papers' setting) or 19 (the train ids) classes.
        layout: None to detect it (`label_<labels>/` -> mtan, else `label/` -> libmtl), or one of LAYOUTS.
        transform: `transform(sample) -> sample`, applied last.

    Items: image (3,H,W) float32 RGB in [0,1]; semseg (H,W) int64, 255 = void; depth (1,H,W)
    float32 inverse depth as stored, 0 = invalid; meta {"index", "name", "size"}. Files are
    checked when a sample is read; `check()` reads the whole split.
    """

    def __init__(self, *, root: str | Path, split: str, tasks: Sequence[str], labels: int = 7,
                 layout: str | None = None, transform: Callable[[dict], dict] | None = None) -> None:
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in SUPPORTED_TASKS]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: expected distinct names from {SUPPORTED_TASKS}, got {tasks} (unsupported: {unknown})")
        if labels not in LABEL_SETS:
            raise ValueError(f"data.dataset.labels: expected one of {LABEL_SETS} (classes of the label maps), got {labels!r}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"data.layout: expected None (detect) or one of {LAYOUTS}, got {layout!r}")
        if not split or "/" in split or "\\" in split or split in (".", ".."):
            raise ValueError(f"split: expected a split name such as 'train' or 'val', got {split!r}")
        self.root, self.split, self.tasks, self.transform = Path(root), split, tasks, transform
        self.labels = self.num_classes = int(labels)
        if not self.root.is_dir():
            raise _layout_error(self.root, "the folder does not exist")
        self._base = self.root / split
        if not (self._base / "image").is_dir():
            found = sorted(p.parent.name for p in self.root.glob("*/image") if p.is_dir())
            if not found:
                raise _layout_error(self.root, f"no <split>/image/ folder (expected {self._base / 'image'}/)")
            raise ValueError(f"split {split!r}: expected the split folder {self._base / 'image'}/ (splits found: {found})")
        self.layout = layout or self._detect()
        if self.layout == "libmtl" and self.labels != 7:
            raise ValueError(f"data.dataset.labels={self.labels}: the libmtl layout ({self.root}) has 7-class labels only "
                             f"(<split>/label/); the 19-class maps are MTAN's <split>/label_19/")
        for task in tasks:
            folder = self._base / self._folder(task)
            if not folder.is_dir():
                raise _layout_error(self.root, f"layout {self.layout!r} needs {folder}/ for task {task!r}")
        self.ids = self._ids()
        self.class_names: dict[str, list[str]] = {"semseg": load_class_names(self.labels)}

    def _folder(self, key: str) -> str:
        return {"image": "image", "semseg": label_folder(self.layout, self.labels), "depth": "depth"}[key]

    def _detect(self) -> str:
        if "semseg" not in self.tasks or (self._base / label_folder("mtan", self.labels)).is_dir():
            return "mtan"
        if (self._base / "label").is_dir():
            return "libmtl"
        raise _layout_error(self.root, f"no {self._base / label_folder('mtan', self.labels)}/ (mtan, "
                                       f"data.dataset.labels={self.labels}) and no {self._base / 'label'}/ (libmtl)")

    def _ids(self) -> list[str]:
        return numbered_npy_ids(self._base / "image", "Cityscapes split folder")

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, key: str, index: int) -> Path:
        """The file of `key` (image or a task) for sample `index`."""
        return self._base / self._folder(key) / f"{self.ids[index]}.npy"

    def _load(self, index: int) -> dict:
        index = sample_index(index, len(self.ids), self.split)
        name = self.ids[index]
        sample = f"Cityscapes ({self.layout}) {self.split}/{name}"
        image = _image_npy(self.path("image", index), sample)
        size = tuple(image.shape[-2:])
        out: dict = {"image": image}
        for task in self.tasks:
            path = self.path(task, index)
            target = (
                class_labels_npy(path, sample, self.labels, f"{self.labels} Cityscapes classes")
                if task == "semseg"
                else positive_npy(path, sample, "depth (inverse depth)")
            )
            check_size(task, target.shape[-2:], size, path=path, sample=sample)
            out[task] = torch.from_numpy(target)
        out["meta"] = {"index": index, "name": name, "size": torch.tensor(size)}
        return out

    def __getitem__(self, index: int) -> dict:
        sample = self._load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self) -> dict[str, int]:
        """Read and validate every sample of the split (raising the first error found); returns
        {"samples": readable samples, <task>: samples with that task's file}, as every dataset's check()."""
        return count_present(self._load, len(self), self.tasks)

    def __repr__(self) -> str:
        return (f"Cityscapes(root={str(self.root)!r}, split={self.split!r}, layout={self.layout!r}, "
                f"labels={self.labels}, tasks={self.tasks}, n={len(self)})")
