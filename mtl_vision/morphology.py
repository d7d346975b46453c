"""Morphological thinning of binary maps (Guo & Hall 1989, algorithm A1, as MATLAB's
bwmorph 'thin' and skimage): the deletion tables shared by the PASCAL boundary targets
(`mtl_vision.data.pascal_context`) and the BSDS boundary benchmark (`mtl_vision.metrics.boundary`)."""

from __future__ import annotations

import numpy as np

__all__ = ["THIN_LUTS", "thin"]


def _thinning_luts() -> tuple[np.ndarray, np.ndarray]:
    """Deletion tables of Guo & Hall (1989) algorithm A1 for both subiterations, indexed by the
    8-neighbour code sum(2**k * x_k), k = 0..7 running E, NE, N, NW, W, SW, S, SE (as skimage)."""
    x = (np.arange(256)[:, None] >> np.arange(8)) & 1 == 1  # x[:, k]: neighbour k set
    odd, even = x[:, 0::2], x[:, 1::2]  # E, N, W, S  /  NE, NW, SW, SE
    after = np.roll(odd, -1, axis=1)  # N, W, S, E: the 4-neighbour after each diagonal
    crossing = (~odd & (even | after)).sum(axis=1) == 1
    n1 = (odd | even).sum(axis=1)
    n2 = (even | after).sum(axis=1)
    common = crossing & (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    first = ~((x[:, 1] | x[:, 2] | ~x[:, 7]) & x[:, 0])
    second = ~((x[:, 5] | x[:, 6] | ~x[:, 3]) & x[:, 4])
    return common & first, common & second


THIN_LUTS = _thinning_luts()


def thin(mask: np.ndarray) -> np.ndarray:
    """Morphological thinning, the same result as `skimage.morphology.thin`, but only the
    foreground pixels are visited (boundary maps are sparse, so this is several times faster)."""
    h, w = mask.shape
    stride = w + 2
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)  # outside the image counts as background
    padded[1:-1, 1:-1] = mask
    flat = padded.reshape(-1)
    offsets = (1, 1 - stride, -stride, -stride - 1, -1, stride - 1, stride, stride + 1)
    idx = np.flatnonzero(flat)
    changed = True
    while changed:
        changed = False
        for lut in THIN_LUTS:  # decisions of one subiteration all see the same image
            code = np.zeros(idx.size, dtype=np.uint8)
            for bit, offset in enumerate(offsets):
                code |= flat[idx + offset] << bit
            drop = lut[code]
            if drop.any():
                flat[idx[drop]] = 0
                idx = idx[~drop]
                changed = True
    return padded[1:-1, 1:-1].astype(bool)
