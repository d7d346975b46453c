"""A tiny PASCAL-Context dataset in the exact `PASCAL_MT` layout and file encodings, for tests.

Scenes are `SyntheticScenes` renders; their classes become VOC / PASCAL-Context classes
(`CLASS_MAP`) and the figure's six part groups become PASCAL-Part person parts, split into
left/right and hair/neck/hands/feet pieces. Encodings as in the real data:
JPEG images; `semseg/VOC12` palette PNGs with 255 on the borders between VOC labels, or
`semseg/pascal-context` grey PNGs without borders (every other id); `human_parts/<id>.mat` holding
the PASCAL-Part struct `anno` (imname, objects(class, class_ind, mask, parts(part_name, mask)),
one object per VOC class present, `parts = []` where a class has none) that
`loadmat(f)["anno"][0][0][1][0]` indexes as the real files; `pascal-context/trainval/<id>.mat`
with a uint16 `LabelMap`; RGB `normals_distill` PNGs ((n + 1) * 255 / 2); soft grey
`sal_distill` PNGs (salient pixels 128..255, others 0..127). Ids `2008_<i>`: even i in train,
odd i in val; samples with (i // 2) odd have no person.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from mtl_vision.data.synthetic import CLASS_CATALOGUE, SyntheticScenes

# synthetic class -> (VOC label, PASCAL-Context name, LabelMap id); 'ground' and 'pottedplant'
# are not NYUD classes, so their normals are invalid; tvmonitor is valid by the protocol's exception.
CLASS_MAP = {
    "floor": (0, "ground", 189),
    "wall": (0, "wall", 440),
    "box": (20, "tvmonitor", 427),
    "sphere": (16, "pottedplant", 308),
    "cylinder": (5, "bottle", 34),
    "person": (15, "person", 284),
}
PERSON_CLASS_IND = 15
_PART_DTYPE = np.dtype([("part_name", object), ("mask", object)])
_OBJECT_DTYPE = np.dtype([("class", object), ("class_ind", object), ("mask", object), ("parts", object)])
_ANNO_DTYPE = np.dtype([("imname", object), ("objects", object)])


@dataclass(frozen=True)
class PartObject:
    """One PASCAL-Part object: VOC class name and index, instance mask, (part name, mask) pairs."""

    cls: str
    class_ind: int
    mask: np.ndarray
    parts: Sequence[tuple[str, np.ndarray]] = field(default_factory=tuple)


def write_parts_mat(path: str | Path, *, imname: str, objects: Sequence[PartObject]) -> None:
    """Write a PASCAL-Part annotation .mat: struct `anno` with fields imname, objects (1xN struct
    array: class, class_ind (double), mask (uint8), parts (1xM struct: part_name, mask), or [])."""
    objs = np.empty((1, len(objects)), dtype=_OBJECT_DTYPE)
    for k, obj in enumerate(objects):
        if obj.parts:
            parts = np.empty((1, len(obj.parts)), dtype=_PART_DTYPE)
            for j, (name, mask) in enumerate(obj.parts):
                parts[0, j] = (name, np.asarray(mask, dtype=np.uint8))
        else:
            parts = np.zeros((0, 0))  # MATLAB []
        objs[0, k] = (obj.cls, np.array([[float(obj.class_ind)]]), np.asarray(obj.mask, dtype=np.uint8), parts)
    anno = np.empty((1, 1), dtype=_ANNO_DTYPE)
    anno[0, 0] = (imname, objs)
    from scipy.io import savemat  # slow import; only the fixture writes .mat files

    savemat(str(path), {"anno": anno}, do_compression=True)


def _rows(mask: np.ndarray, frac: float, *, top: bool) -> tuple[np.ndarray, np.ndarray]:
    """Split a mask at `frac` of its row extent: (the top or bottom piece, the rest)."""
    rows = np.nonzero(mask.any(axis=1))[0]
    if rows.size == 0:
        return mask, mask
    cut = rows[0] + frac * (rows[-1] + 1 - rows[0])
    index = np.arange(mask.shape[0])[:, None]
    piece = mask & ((index < cut) if top else (index >= rows[-1] + 1 - (cut - rows[0])))
    return piece, mask & ~piece


def person_parts(groups: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """PASCAL-Part person parts from a (H,W) map of the 6 part groups (0 elsewhere).

    The figure faces the camera, so its right side is on the image's left.
    """
    cols = np.nonzero(groups > 0)[1]
    if cols.size == 0:
        return []
    right = np.arange(groups.shape[1])[None, :] < np.median(cols)
    parts: list[tuple[str, np.ndarray]] = []
    hair, head = _rows(groups == 1, 0.3, top=True)
    neck, torso = _rows(groups == 2, 0.15, top=True)
    parts += [("hair", hair), ("head", head), ("neck", neck), ("torso", torso)]
    for side, on_side in (("r", right), ("l", ~right)):
        hand, lower_arm = _rows((groups == 4) & on_side, 0.25, top=False)
        foot, lower_leg = _rows((groups == 6) & on_side, 0.2, top=False)
        parts += [(f"{side}uarm", (groups == 3) & on_side), (f"{side}larm", lower_arm), (f"{side}hand", hand),
                  (f"{side}uleg", (groups == 5) & on_side), (f"{side}lleg", lower_leg), (f"{side}foot", foot)]
    return [(name, mask) for name, mask in parts if mask.any()]


def _other_parts(cls: str, mask: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """PASCAL-Part parts of the non-person classes the fixture uses."""
    if cls == "bottle":
        cap, body = _rows(mask, 0.15, top=True)
        return [("cap", cap), ("body", body)]
    if cls == "pottedplant":
        pot, plant = _rows(mask, 0.35, top=False)
        return [("pot", pot), ("plant", plant)]
    return [("screen", mask)] if cls == "tvmonitor" else []


def _voc_palette() -> list[int]:
    """The standard PASCAL VOC colour map (bit-interleaved label index), 256 entries."""
    palette = []
    for label in range(256):
        r = g = b = 0
        c = label
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette += [r, g, b]
    return palette


def _borders(labels: np.ndarray) -> np.ndarray:
    """Both pixels of every 4-neighbour pair whose labels differ."""
    edge = np.zeros(labels.shape, dtype=bool)
    down, right = labels[1:] != labels[:-1], labels[:, 1:] != labels[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    return edge


def write_pascal_fixture(out: str | Path, *, n: int = 4, seed: int = 0, height: int = 96, width: int = 128) -> Path:
    """Write `n` train and `n` val samples in the PASCAL_MT layout under `out` (created); return `out`.

    Ids alternate between the splits (even: train, odd: val), as the real ids interleave."""
    if n < 1:
        raise ValueError(f"n: expected at least one sample, got {n}")
    root = Path(out)
    folders = ("JPEGImages", "semseg/VOC12", "semseg/pascal-context", "human_parts", "pascal-context/trainval",
               "normals_distill", "sal_distill", "ImageSets/Context")
    for folder in folders:
        (root / folder).mkdir(parents=True, exist_ok=True)
    tasks = ["semseg", "normals", "saliency", "human_parts"]
    scenes = {figure: SyntheticScenes(split="train", tasks=tasks, height=height, width=width, num_samples=2 * n,
                                      seed=seed, figure_prob=float(figure), invalid_prob=0.0) for figure in (0, 1)}
    voc = np.array([CLASS_MAP[c][0] for c in CLASS_CATALOGUE], dtype=np.uint8)
    context = np.array([CLASS_MAP[c][2] for c in CLASS_CATALOGUE], dtype=np.uint16)
    palette = _voc_palette()
    from scipy.io import savemat  # slow import; only the fixture writes .mat files
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(2 * n):
        name = f"2008_{i:06d}"
        splits["train" if i % 2 == 0 else "val"].append(name)
        sample = scenes[1 if (i // 2) % 2 == 0 else 0][i]
        classes = sample["semseg"].numpy()
        image = (sample["image"].numpy().transpose(1, 2, 0) * 255 + 0.5).astype(np.uint8)
        Image.fromarray(image, "RGB").save(root / "JPEGImages" / f"{name}.jpg", quality=90)
        labels = voc[classes]
        if i % 2 == 0:
            voc_png = Image.fromarray(np.where(_borders(labels), np.uint8(255), labels), "P")
            voc_png.putpalette(palette)
            voc_png.save(root / "semseg" / "VOC12" / f"{name}.png")
        else:
            Image.fromarray(labels, "L").save(root / "semseg" / "pascal-context" / f"{name}.png")
        savemat(str(root / "pascal-context" / "trainval" / f"{name}.mat"), {"LabelMap": context[classes]},
                do_compression=True)
        normals = sample["normals"].numpy().transpose(1, 2, 0)
        Image.fromarray(((normals + 1) * 127.5 + 0.5).clip(0, 255).astype(np.uint8), "RGB").save(
            root / "normals_distill" / f"{name}.png")
        rng = np.random.default_rng([seed, i])
        salient = sample["saliency"].numpy()[0] > 0
        soft = rng.integers(0, 128, size=salient.shape) + 128 * salient
        Image.fromarray(soft.astype(np.uint8), "L").save(root / "sal_distill" / f"{name}.png")
        objects = []
        for synthetic, (label, cls, _) in CLASS_MAP.items():
            mask = classes == CLASS_CATALOGUE.index(synthetic)
            if label == 0 or not mask.any():
                continue
            parts = person_parts(sample["human_parts"].numpy() * mask) if cls == "person" else _other_parts(cls, mask)
            objects.append(PartObject(cls=cls, class_ind=int(label), mask=mask, parts=parts))
        write_parts_mat(root / "human_parts" / f"{name}.mat", imname=name, objects=objects)
    for split, ids in splits.items():
        (root / "ImageSets" / "Context" / f"{split}.txt").write_text("".join(f"{x}\n" for x in ids))
    return root
