"""PASCAL-Context multi-task dataset in the `PASCAL_MT` layout.

Data and protocol: Maninis et al., "Attentive Single-Tasking of Multiple Tasks" (CVPR 2019),
reused by MTI-Net, ATRC and InvPT. Decoding follows their loaders
(facebookresearch/astmt `fblib/dataloaders/pascal_context.py`, SimonVandenhende/
Multi-Task-Learning-PyTorch `data/pascal_context.py` + `data/custom_transforms.py`,
brdav/atrc `src/data/pascal_context.py`):

- semseg: VOC png of class indices 0..20, 255 ignore (`semseg/VOC12`, else `semseg/pascal-context`).
- human_parts: PASCAL-Part `anno.objects`; part masks of persons (class_ind 15) that have parts,
  painted in file order (later parts and later persons win), grouped into 6 parts; everything
  else 0, including persons without part annotation. Images with no person, or with no part
  pixel at all, are all 255 (the references' `AddIgnoreRegions`), never all background.
- normals: `normals_distill` png decoded as 2x/255-1, renormalised, kept only on pixels whose
  context class also exists in NYUD (`meta/pascal_context_normals_valid.json`); zero elsewhere.
- saliency: `sal_distill` png / 255 > 0.5.
- edge: `thin(Laplacian(LabelMap) != 0)` (3x3 Laplacian, reflect-101 border as cv2's default).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.io import (
    DataFileError,
    check_labels,
    check_size,
    read_ids,
    read_mat,
    read_pil,
    read_rgb,
    sample_index,
)
from mtl_vision.morphology import thin

TASK_NAMES = ("semseg", "human_parts", "normals", "saliency", "edge")
NUM_CONTEXT_IDS = 459  # LabelMap values are 0 (unlabelled) .. 459
PERSON_CLASS_IND = 15  # PASCAL VOC / PASCAL-Part class index of "person"
_DECODE_NORMAL = (np.arange(256) * (2 / 255) - 1).astype(np.float32)
LAYOUT = """\
<root>/                                  PASCAL_MT (as distributed for ASTMT / MTI-Net / ATRC / InvPT)
  JPEGImages/<id>.jpg                    RGB image
  semseg/VOC12/<id>.png                  21 VOC classes, 255 ignore
  semseg/pascal-context/<id>.png         (used when semseg/VOC12/<id>.png is absent)
  human_parts/<id>.mat                   PASCAL-Part struct 'anno' (objects, parts)
  pascal-context/trainval/<id>.mat       'LabelMap' (459 context classes): edges, normals mask
  normals_distill/<id>.png               RGB, normal = 2 * x / 255 - 1
  sal_distill/<id>.png                   grey, salient where x / 255 > 0.5
  ImageSets/Context/{train,val}.txt      sample ids (4998 / 5105), e.g. 2008_000002"""


def _meta(name: str) -> dict:
    return json.loads(resources.files("mtl_vision.data").joinpath("meta", name).read_text(encoding="utf-8"))


@functools.cache
def voc_class_names() -> tuple[str, ...]:
    return tuple(_meta("pascal_voc_classes.json")["names"])


@functools.cache
def human_part_groups() -> tuple[tuple[str, ...], dict[str, int]]:
    """(group names with background first, PASCAL-Part person part name -> group index)."""
    meta = _meta("pascal_human_parts.json")
    return tuple(meta["groups"]), dict(meta["part_to_group"])


@functools.cache
def normals_valid_ids() -> tuple[int, ...]:
    return tuple(_meta("pascal_context_normals_valid.json")["ids"])


def derive_normals_valid_ids(context_classes: Mapping[str, int], nyu_classes: Mapping[str, int]) -> list[int]:
    """Context ids whose class name is also an NYUD class (but not 'unknown'), plus tvmonitor.

    The rule of the ASTMT loader (`normals_valid_classes`); regenerate the shipped list with
    `python -m mtl_vision.data.pascal_context <reference-data dir> > meta/pascal_context_normals_valid.json`.
    """
    ids = {context_classes[name] for name in nyu_classes if name in context_classes and name != "unknown"}
    return sorted(ids | {context_classes["tvmonitor"]})


def label_boundaries(label_map: np.ndarray) -> np.ndarray:
    """Thin boundaries of a label map: pixels where the 3x3 Laplacian (reflect-101 border, as
    cv2.Laplacian) is non-zero, thinned."""
    p = np.pad(label_map.astype(np.int32), 1, mode="reflect")
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]
    return thin(lap != 0)


class PascalContext(Dataset):
    """PASCAL-Context (PASCAL_MT layout) with semseg, human_parts, normals, saliency and edge.

    Args:
        root: the PASCAL_MT folder (see `LAYOUT`); only read, never written.
        split: name of a split file in `ImageSets/Context/` (train: 4998, val: 5105 ids).
        tasks: subset of `TASK_NAMES`.
        transform: `transform(sample) -> sample`, applied last.

    Items: "image" float32 (3,H,W) RGB in [0,1]; "semseg"/"human_parts" int64 (H,W), 255 ignore;
    "normals" float32 (3,H,W) unit vectors, all-zero invalid; "saliency"/"edge" float32 (1,H,W)
    in {0,1}; "meta" {"index", "name", "size": tensor([H, W])}.
    """

    def __init__(self, *, root: str | Path, split: str, tasks: Sequence[str],
                 transform: Callable[[dict], dict] | None = None) -> None:
        tasks = list(tasks)
        unknown = [t for t in tasks if t not in TASK_NAMES]
        if unknown or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks: expected distinct names from {TASK_NAMES}, got {tasks} (unknown: {unknown})")
        self.root, self.split, self.tasks, self.transform = Path(root), split, tasks, transform
        split_dir = self.root / "ImageSets" / "Context"
        if not split_dir.is_dir():
            what = "does not exist" if not self.root.exists() else f"has no {split_dir.relative_to(self.root)}/"
            raise FileNotFoundError(f"PASCAL-Context root {self.root} {what}; expected this layout:\n{LAYOUT}")
        split_file = split_dir / f"{split}.txt"
        if not split_file.is_file():
            present = sorted(p.stem for p in split_dir.glob("*.txt"))
            raise DataFileError(f"PASCAL-Context split {split!r}: expected the split file {split_file} "
                                f"(split files present: {present})")
        self.ids = read_ids(split_file)
        groups, self._part_to_group = human_part_groups()
        names = {"semseg": list(voc_class_names()), "human_parts": list(groups)}
        self.class_names: dict[str, list[str]] = {t: names[t] for t in tasks if t in names}
        self._normals_lut = np.zeros(NUM_CONTEXT_IDS + 1, dtype=bool)
        self._normals_lut[list(normals_valid_ids())] = True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        sample = self._load(index)
        return self.transform(sample) if self.transform is not None else sample

    def check(self) -> dict[str, int]:
        """Read every sample (raising the first error); {"samples": N, task: samples with supervision}.

        semseg/human_parts count samples with a label other than 255, normals those with a valid
        pixel; saliency and edge maps are supervision wherever the files read.
        """
        counts = {"samples": 0, **{t: 0 for t in self.tasks}}
        for index in range(len(self)):
            sample = self._load(index)
            counts["samples"] += 1
            for task in self.tasks:
                target = sample[task]
                if task in ("semseg", "human_parts"):
                    counts[task] += bool((target != IGNORE_INDEX).any())
                elif task == "normals":
                    counts[task] += bool(target.any())
                else:
                    counts[task] += 1
        return counts

    def _load(self, index: int) -> dict:
        index = sample_index(index, len(self.ids), self.split)
        name = self.ids[index]
        where = f"PASCAL-Context {self.split}/{name}"
        root = self.root
        image = read_rgb(root / "JPEGImages" / f"{name}.jpg", sample=where)
        hw = tuple(image.shape[1:])
        out: dict = {"image": image}
        if "semseg" in self.tasks:
            out["semseg"] = self._semseg(name, where, hw)
        if "human_parts" in self.tasks:
            out["human_parts"] = self._human_parts(root / "human_parts" / f"{name}.mat", where, hw)
        if "normals" in self.tasks or "edge" in self.tasks:
            labels = self._context_labels(root / "pascal-context" / "trainval" / f"{name}.mat", where, hw)
            if "normals" in self.tasks:
                out["normals"] = self._normals(root / "normals_distill" / f"{name}.png", where, hw, labels)
            if "edge" in self.tasks:
                out["edge"] = torch.from_numpy(label_boundaries(labels)[None].astype(np.float32))
        if "saliency" in self.tasks:
            path = root / "sal_distill" / f"{name}.png"
            sal = _plane(read_pil(path, sample=where), 2, path, where, hw, "a grey (L) PNG", name="saliency")
            out["saliency"] = torch.from_numpy((sal > 127)[None].astype(np.float32))  # x/255 > 0.5
        out["meta"] = {"index": index, "name": name, "size": torch.tensor(hw)}
        return out

    def _semseg(self, name: str, where: str, hw: tuple[int, int]) -> torch.Tensor:
        path = self.root / "semseg" / "VOC12" / f"{name}.png"
        if not path.is_file():
            fallback = self.root / "semseg" / "pascal-context" / f"{name}.png"
            if not fallback.is_file():
                raise DataFileError(f"missing file for {where}: {path} (nor the fallback {fallback})")
            path = fallback
        labels = _plane(read_pil(path, sample=where), 2, path, where, hw,
                        "a palette (P) or grey (L) PNG of class indices", name="semseg")
        check_labels(labels, len(voc_class_names()), path=path, sample=where)
        return torch.from_numpy(labels.astype(np.int64))

    def _context_labels(self, path: Path, where: str, hw: tuple[int, int]) -> np.ndarray:
        mat = read_mat(path, sample=where)
        if "LabelMap" not in mat:
            names = sorted(k for k in mat if not k.startswith("__"))
            raise DataFileError(f"{where}: no variable 'LabelMap' in {path} (variables: {names})")
        labels = mat["LabelMap"]
        if labels.dtype.kind not in "iu":
            raise DataFileError(f"{where}: 'LabelMap' in {path} has dtype {labels.dtype}, expected integer context ids")
        labels = _plane(labels, 2, path, where, hw, "a 2-D 'LabelMap'", name="LabelMap")
        bad = labels > NUM_CONTEXT_IDS
        if labels.dtype.kind == "i":
            bad |= labels < 0
        if bad.any():
            value = int(labels[bad].flat[0])
            raise DataFileError(f"{where}: LabelMap value {value} outside [0, {NUM_CONTEXT_IDS}] in {path}")
        return labels

    def _normals(self, path: Path, where: str, hw: tuple[int, int], labels: np.ndarray) -> torch.Tensor:
        png = _plane(read_pil(path, sample=where), 3, path, where, hw, "an RGB PNG", name="normals")
        from mtl_vision.data.decode import masked_unit_normals  # compiled, one pass

        # (3,H,W) float32: 2x/255-1, divided by the length (never 0: 8-bit codes give components of
        # at least 1/255), times 0 outside the classes with normals
        if not labels.dtype.isnative:  # a big-endian .mat: the compiled loop reads native integers
            labels = labels.astype(labels.dtype.newbyteorder("="))
        return torch.from_numpy(masked_unit_normals(png, _DECODE_NORMAL, labels, self._normals_lut))

    def _human_parts(self, path: Path, where: str, hw: tuple[int, int]) -> torch.Tensor:
        mat = read_mat(path, sample=where)
        try:
            objects = mat["anno"][0, 0]["objects"].reshape(-1)
        except (KeyError, IndexError, ValueError) as err:
            raise DataFileError(f"{where}: expected a struct 'anno' with a field 'objects' in {path} ({err!r})") from err
        target = np.zeros(hw, dtype=np.uint8)
        has_person = False
        for k, obj in enumerate(objects):
            try:
                class_ind, obj_mask, parts = int(obj["class_ind"].reshape(-1)[0]), obj["mask"], obj["parts"]
            except (ValueError, IndexError, TypeError) as err:
                raise DataFileError(f"{where}: object {k} of {path} lacks class_ind/mask/parts ({err!r})") from err
            if class_ind != PERSON_CLASS_IND:
                continue
            check_size(f"person {k} mask", obj_mask.shape, hw, path=path, sample=where)
            has_person |= bool(obj_mask.any())
            if parts.size == 0:  # a person without part annotation: as the references, not painted
                continue
            for j, part in enumerate(parts.reshape(-1)):
                part_name = str(part["part_name"].reshape(-1)[0]) if part["part_name"].size else ""
                group = self._part_to_group.get(part_name)
                if group is None:
                    raise DataFileError(f"{where}: person {k} part {j} has unknown part_name {part_name!r} in {path}; "
                                        f"expected one of {sorted(self._part_to_group)}")
                mask = part["mask"]
                check_size(f"person {k} part {part_name!r} mask", mask.shape, hw, path=path, sample=where)
                np.copyto(target, group, where=mask != 0)
        if not has_person or not target.any():  # no part supervision at all, not "all background"
            target.fill(IGNORE_INDEX)
        return torch.from_numpy(target.astype(np.int64))


def _plane(array: np.ndarray, ndim: int, path: Path, where: str, hw: tuple[int, int], expected: str, *,
           name: str) -> np.ndarray:
    """Check that a decoded file has the expected rank (3 channels if 3-D) and the image size."""
    if array.ndim != ndim or (ndim == 3 and array.shape[2] != 3):
        raise DataFileError(f"{where}: {path} decodes to shape {array.shape}, expected {expected}")
    check_size(name, array.shape[:2], hw, path=path, sample=where)
    return array


def _main(argv: Sequence[str] | None = None) -> None:
    """Print the normals-valid id list derived from a reference-data folder as JSON."""
    import argparse

    parser = argparse.ArgumentParser(description=derive_normals_valid_ids.__doc__.splitlines()[0])
    parser.add_argument("reference_dir", help="folder with context_classes.json and nyu_classes.json")
    folder = Path(parser.parse_args(argv).reference_dir)
    context, nyu = (json.loads((folder / f).read_text()) for f in ("context_classes.json", "nyu_classes.json"))
    payload = {"source": "derive_normals_valid_ids(context_classes.json, nyu_classes.json): context ids of the "
                         "classes also in NYUD (not 'unknown') plus tvmonitor, as the ASTMT normals_valid_classes",
               "ids": derive_normals_valid_ids(context, nyu)}
    print(json.dumps(payload))


if __name__ == "__main__":
    _main()
