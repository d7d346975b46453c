"""Compiled one-pass decoders of the per-pixel target conversions of the NYUD and PASCAL loaders:
the same float32 operations in the same order as the numpy code they replace (so the same bits),
without its HxWx3 -> 3xHxW copy and its temporaries. Imported lazily: numba is slow to import.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["masked_unit_normals", "unit_normals"]


@njit(cache=True, nogil=True, error_model="numpy")
def _unit(a, b, c, min_sq):  # pragma: no cover - compiled
    """(scale, valid, finite) of the float32 vector (a, b, c), as numpy computed them: sq = a*a +
    b*b + c*c (left to right), scale = 1 / sqrt(fmax(sq, min_sq)) times the validity
    (min_sq <= sq < inf; NaN fails)."""
    sq = a * a
    sq = sq + b * b
    sq = sq + c * c
    valid = sq >= min_sq and sq < np.inf
    inv = sq if sq >= min_sq else min_sq  # noqa: FURB136 - as np.fmax: NaN gives min_sq
    inv = np.float32(1.0) / np.sqrt(inv)
    return inv * (np.float32(1.0) if valid else np.float32(0.0)), valid, np.isfinite(sq)


@njit(cache=True, nogil=True, error_model="numpy")
def _unit_normals_float(src, min_sq, out):  # pragma: no cover - compiled
    """out (3,H,W): the float32 (H,W,3) vectors of src times their `_unit` scale; when some squared
    length is not finite, every invalid vector is set to exact zeros (NaN times 0 stays NaN)."""
    nonfinite = False
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            a, b, c = src[i, j, 0], src[i, j, 1], src[i, j, 2]
            scale, _, finite = _unit(a, b, c, min_sq)
            nonfinite |= not finite
            out[0, i, j], out[1, i, j], out[2, i, j] = a * scale, b * scale, c * scale
    if nonfinite:
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                if not _unit(src[i, j, 0], src[i, j, 1], src[i, j, 2], min_sq)[1]:
                    out[0, i, j] = out[1, i, j] = out[2, i, j] = np.float32(0.0)


@njit(cache=True, nogil=True, error_model="numpy")
def _unit_normals_codes(src, lut, min_sq, out):  # pragma: no cover - compiled
    """out (3,H,W): the uint8 (H,W,3) codes of src decoded by `lut`, times their `_unit` scale
    (decoded codes are finite)."""
    for i in range(src.shape[0]):
        for j in range(src.shape[1]):
            a, b, c = lut[src[i, j, 0]], lut[src[i, j, 1]], lut[src[i, j, 2]]
            scale = _unit(a, b, c, min_sq)[0]
            out[0, i, j], out[1, i, j], out[2, i, j] = a * scale, b * scale, c * scale


def unit_normals(src: np.ndarray, min_length: float, lut: np.ndarray | None = None) -> np.ndarray:
    """(3,H,W) float32 unit vectors of an (H,W,3) float array (or uint8 codes decoded by the
    float32 `lut`), all-zero where the length is below `min_length` or not finite."""
    out = np.empty((3, src.shape[0], src.shape[1]), dtype=np.float32)
    if lut is None:
        _unit_normals_float(src.astype(np.float32, copy=False), np.float32(min_length**2), out)
    else:
        _unit_normals_codes(src, lut, np.float32(min_length**2), out)
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def _masked_unit_normals(png, lut, labels, keep, out):  # pragma: no cover - compiled
    """out (3,H,W) = lut[png] * (1 / sqrt(x*x + y*y + z*z)), the scale 0 where keep[labels] is False."""
    one, zero = np.float32(1.0), np.float32(0.0)
    for i in range(png.shape[0]):
        for j in range(png.shape[1]):
            a, b, c = lut[png[i, j, 0]], lut[png[i, j, 1]], lut[png[i, j, 2]]
            sq = a * a
            sq = sq + b * b
            sq = sq + c * c
            scale = one / np.sqrt(sq) if keep[labels[i, j]] else zero
            out[0, i, j], out[1, i, j], out[2, i, j] = a * scale, b * scale, c * scale


def masked_unit_normals(png: np.ndarray, lut: np.ndarray, labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """(3,H,W) float32: the (H,W,3) uint8 codes decoded by the float32 `lut`, renormalised, zero
    where `keep[labels]` is False."""
    out = np.empty((3, png.shape[0], png.shape[1]), dtype=np.float32)
    _masked_unit_normals(png, lut, labels, keep, out)
    return out


@njit(cache=True, nogil=True)
def _unfilter(raw, height, stride, bpp, out):  # pragma: no cover - compiled
    """Undo the PNG row filters (None, Sub, Up, Average, Paeth) of `raw` (height rows of a filter
    byte + `stride` bytes) into out (height, stride) uint8; False on an unknown filter type."""
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]
        row = out[y]
        if kind == 0:
            row[:] = line
        elif kind == 1:
            for x in range(stride):
                left = row[x - bpp] if x >= bpp else 0
                row[x] = (line[x] + left) & 0xFF
        elif kind == 2:
            for x in range(stride):
                up = out[y - 1, x] if y > 0 else 0
                row[x] = (line[x] + up) & 0xFF
        elif kind == 3:
            for x in range(stride):
                left = np.int32(row[x - bpp]) if x >= bpp else np.int32(0)
                up = np.int32(out[y - 1, x]) if y > 0 else np.int32(0)
                row[x] = (np.int32(line[x]) + ((left + up) >> 1)) & 0xFF
        elif kind == 4:
            for x in range(stride):
                a = np.int32(row[x - bpp]) if x >= bpp else np.int32(0)
                b = np.int32(out[y - 1, x]) if y > 0 else np.int32(0)
                c = np.int32(out[y - 1, x - bpp]) if (x >= bpp and y > 0) else np.int32(0)
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if (pa <= pb and pa <= pc) else (b if pb <= pc else c)
                row[x] = (np.int32(line[x]) + pred) & 0xFF
        else:
            return False
    return True


def png_rows(raw: bytes, height: int, stride: int, bpp: int) -> np.ndarray | None:
    """The (height, stride) uint8 pixel rows of inflated PNG data (non-interlaced, 8-bit), or None
    where a row has an unknown filter type."""
    out = np.empty((height, stride), dtype=np.uint8)
    ok = _unfilter(np.frombuffer(raw, dtype=np.uint8), height, stride, bpp, out)
    return out if ok else None


@njit(cache=True, nogil=True, error_model="numpy")
def _unit_interval(src, out):  # pragma: no cover - compiled
    """out = src / 255 elementwise (float32 division), both flat."""
    scale = np.float32(255.0)
    for k in range(src.shape[0]):
        out[k] = np.float32(src[k]) / scale


def rgb_to_unit(src: np.ndarray) -> np.ndarray:
    """(3,H,W) float32 in [0,1] of an (H,W,3) uint8 image: x / 255 as `torch.div_(255.0)` computes
    it, in the image's memory order (a channels-last view, as `transpose(2, 0, 1).astype` gave it:
    the jitter's vectorised kernels round a few pixels by their position in memory)."""
    src = np.ascontiguousarray(src)
    out = np.empty(src.shape, dtype=np.float32)
    _unit_interval(src.reshape(-1), out.reshape(-1))
    return out.transpose(2, 0, 1)
