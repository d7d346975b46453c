"""Tiny Cityscapes datasets written in exactly the MTAN and LibMTL `.npy` layouts that
`mtl_vision.data.cityscapes` reads (and that the authors' CityScapes classes read), for tests and
for trying the Cityscapes configs without the real data. The content is rendered by
`SyntheticScenes` (through the NYUD fixture's renderer), its depth turned into inverse depth.

One module per dataset, as `nyud_fixture.py` and `pascal_fixture.py`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mtl_vision.data.cityscapes import LAYOUTS, label_folder
from mtl_vision.data.nyud_fixture import _render
from mtl_vision.data.synthetic import CLASS_CATALOGUE

# Synthetic class -> file value, for the 7 categories and the 19 train ids (-1 = void):
# floor -> flat / road, wall -> construction / building, box -> vehicle / car,
# sphere -> object / pole, cylinder -> nature / vegetation, person -> human / person.
VALUES = {
    7: {"floor": 0, "wall": 1, "box": 6, "sphere": 2, "cylinder": 3, "person": 5},
    19: {"floor": 0, "wall": 2, "box": 13, "sphere": 5, "cylinder": 8, "person": 11},
}
# inverse depth = DISPARITY_SCALE / metres: the synthetic 1..10 m become 0.045..0.45, the range of
# MTAN's files (up to 0.4922)
DISPARITY_SCALE = 0.45
DEFAULT_SIZE = (128, 256)


def write_cityscapes_fixture(out: str | Path, *, layout: str = "mtan", n: int = 4, seed: int = 0,
                             height: int | None = None, width: int | None = None) -> Path:
    """Write `n` train and `n` val samples in `layout` (`mtan`: label_7/ and label_19/; `libmtl`:
    label/ with the 7 classes) under `out` (created) and return it.

    float32 arrays: image HxWx3 in [0,1], labels HxW with -1 = void (a rectangle per image), depth
    HxWx1 inverse depth with 0 = invalid (the renderer's sensor holes). Deterministic in (layout,
    n, seed, height, width); default size 128x256 (MTAN's small version); >= 16 pixels.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if n < 1:
        raise ValueError(f"n: expected at least 1 sample per split, got {n}")
    height = height or DEFAULT_SIZE[0]
    width = width or DEFAULT_SIZE[1]
    root = Path(out)
    label_sets = (7,) if layout == "libmtl" else (7, 19)
    luts = {k: np.array([VALUES[k][c] for c in CLASS_CATALOGUE], dtype=np.float32) for k in label_sets}
    for split in ("train", "val"):
        folders = ["image", "depth", *(label_folder(layout, k) for k in label_sets)]
        for folder in folders:
            (root / split / folder).mkdir(parents=True, exist_ok=True)
        for i, (image, classes, void, depth, _, _) in enumerate(_render(split, n, seed, height, width)):
            np.save(root / split / "image" / f"{i}.npy", image.astype(np.float32) / np.float32(255))
            for k, lut in luts.items():
                label = lut[classes]
                label[void] = -1
                np.save(root / split / label_folder(layout, k) / f"{i}.npy", label)
            inverse = np.where(depth > 0, DISPARITY_SCALE / np.where(depth > 0, depth, 1), 0).astype(np.float32)
            np.save(root / split / "depth" / f"{i}.npy", inverse[:, :, None])
    return root
