"""Tiny NYUD-v2 datasets written in exactly the on-disk layouts that `mtl_vision.data.nyud` reads
(`nyud_mt`, `nyudv2`, `mtan`), with the real file encodings, for tests and for trying the
NYUD configs without the real data. The content is rendered by `SyntheticScenes`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtl_vision.data.nyud import LAYOUTS
from mtl_vision.data.synthetic import CLASS_CATALOGUE, SyntheticScenes

# Synthetic class -> file value. NYUD-40 PNG values are 1-based (0 = unlabelled): wall 1, floor 2,
# box 29, person 31, otherfurniture 39, otherprop 40. MTAN-13 values are 0-based (-1 = unlabelled):
# floor 4, furniture 5, objects 6, table 9, wall 11.
NYUD_VALUES = {"floor": 2, "wall": 1, "box": 29, "sphere": 40, "cylinder": 39, "person": 31}
MTAN_VALUES = {"floor": 4, "wall": 11, "box": 5, "sphere": 6, "cylinder": 9, "person": 6}
DEFAULT_SIZES = {"nyud_mt": (480, 640), "nyudv2": (480, 640), "mtan": (288, 384)}
_TASKS = ["semseg", "depth", "normals", "edge"]


def _unlabelled(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A rectangle of unlabelled pixels (as NYUD leaves regions the annotators skipped)."""
    mask = np.zeros((height, width), dtype=bool)
    bh, bw = max(height // 6, 1), max(width // 6, 1)
    r0, c0 = int(rng.integers(0, height - bh + 1)), int(rng.integers(0, width - bw + 1))
    mask[r0:r0 + bh, c0:c0 + bw] = True
    return mask


def _render(split: str, n: int, seed: int, height: int, width: int):
    """Yield (image uint8 HxWx3, class index HxW, unlabelled mask, depth HxW, normals HxWx3, edge HxW)."""
    scenes = SyntheticScenes(split=split, tasks=_TASKS, height=height, width=width, num_samples=n,
                             seed=seed, invalid_prob=1.0)  # every sample gets sensor holes
    for i in range(n):
        s = scenes[i]
        image = np.rint(s["image"].numpy().transpose(1, 2, 0) * 255).astype(np.uint8)
        rng = np.random.default_rng([seed, len(split), i])
        yield (image, s["semseg"].numpy(), _unlabelled(rng, height, width), s["depth"].numpy()[0],
               s["normals"].numpy().transpose(1, 2, 0), s["edge"].numpy()[0])


def _write_nyud(root: Path, layout: str, n: int, seed: int, height: int, width: int) -> None:
    for folder in ("images", "segmentation", "depth", "normals", "edge", "gt_sets"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lut = np.array([NYUD_VALUES[c] for c in CLASS_CATALOGUE], dtype=np.uint8)
    for offset, split in enumerate(("train", "val")):
        ids = [f"{2 * i + offset + 1:06d}" for i in range(n)]  # interleaved, as NYU's official split
        (root / "gt_sets" / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
        for name, (image, classes, unlabelled, depth, normals, edge) in zip(ids, _render(split, n, seed, height, width)):
            seg = lut[classes]
            seg[unlabelled] = 0
            Image.fromarray(seg).save(root / "segmentation" / f"{name}.png")
            np.save(root / "depth" / f"{name}.npy", depth.astype(np.float32))
            if layout == "nyud_mt":
                Image.fromarray(image).save(root / "images" / f"{name}.jpg", quality=95)
                np.save(root / "normals" / f"{name}.npy", normals.astype(np.float32))
                np.save(root / "edge" / f"{name}.npy", edge.astype(np.float32))
            else:
                Image.fromarray(image).save(root / "images" / f"{name}.png")
                # 2x/255-1 encoding; invalid (zero) normals become mid-grey 128
                rgb = np.rint((normals + 1) * 127.5).clip(0, 255).astype(np.uint8)
                Image.fromarray(rgb).save(root / "normals" / f"{name}.png")
                Image.fromarray((edge > 0.5).astype(np.uint8) * 255).save(root / "edge" / f"{name}.png")


def _write_mtan(root: Path, n: int, seed: int, height: int, width: int) -> None:
    lut = np.array([MTAN_VALUES[c] for c in CLASS_CATALOGUE], dtype=np.float64)
    for split in ("train", "val"):
        for kind in ("image", "label", "depth", "normal"):
            (root / split / kind).mkdir(parents=True, exist_ok=True)
        for i, (image, classes, unlabelled, depth, normals, _) in enumerate(_render(split, n, seed, height, width)):
            label = lut[classes]
            label[unlabelled] = -1
            # MTAN ships float64 arrays: image in [0,1], label with -1, depth HxWx1, normal HxWx3
            np.save(root / split / "image" / f"{i}.npy", image.astype(np.float64) / 255)
            np.save(root / split / "label" / f"{i}.npy", label)
            np.save(root / split / "depth" / f"{i}.npy", depth.astype(np.float64)[:, :, None])
            np.save(root / split / "normal" / f"{i}.npy", normals.astype(np.float64))


def write_nyud_fixture(out: str | Path, *, layout: str, n: int = 4, seed: int = 0,
                       height: int | None = None, width: int | None = None) -> Path:
    """Write `n` train and `n` val samples in `layout` under `out` (created) and return it.

    Deterministic in (layout, n, seed, height, width). Default size: 480x640 for the NYUD
    layouts, 288x384 for MTAN; small sizes (>= 16 pixels) keep tests fast.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if n < 1:
        raise ValueError(f"n: expected at least 1 sample per split, got {n}")
    height = height or DEFAULT_SIZES[layout][0]
    width = width or DEFAULT_SIZES[layout][1]
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    if layout == "mtan":
        _write_mtan(root, n, seed, height, width)
    else:
        _write_nyud(root, layout, n, seed, height, width)
    return root
