"""Fused resize + pad + flip of a training crop, equal to `transforms.resize_sample` followed by
`pad_sample` and `flip_sample` (the same float operations in the same order, so the same bits),
one pass per map over the crop instead of several over the whole sample.

Bilinear maps reproduce torch's CPU kernel (`F.interpolate(mode="bilinear", align_corners=False)`
for more than 3 channels): separable, source index `float(scale * (i + 0.5) - 0.5)` computed in
double, clamped at 0, weights `(1 - l, l)` in float, each output
`fma(fma(x00, a0, x01 * a1), b0, fma(x10, a0, x11 * a1) * b1)` (the compiler fuses the
multiply-adds of torch's kernel). Normals take torch's own vectorised sqrt of the squared length,
which is not always the correctly rounded one. Nearest maps use torch's `nearest` index rule.
Because the FMA fusion is the compiler's choice, `available()` checks the kernels against torch
once per process on random data and the callers use torch where they differ. torch's kernel also
rounds otherwise for small outputs (below about `MIN_OUTPUT` values over all channels: another
loop, compiled apart), so callers resize smaller maps with torch.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["available", "bilinear_map", "linear_taps", "nearest_index", "nearest_map", "resize_map", "unit_map"]

PLAIN, MASKED, UNIT = 0, 1, 2  # bilinear_map modes: image (clamped to [0,1]), depth, normals
MIN_OUTPUT = 1 << 16  # values (channels x H x W) of torch's resize from which the kernels give its bits


@intrinsic
def _fma(typingctx, a, b, c):
    """a * b + c with one rounding (llvm.fma), as the fused multiply-add of torch's kernel."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


def linear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w0, w1) of torch's bilinear resize from `n_in` to `n_out` samples (align_corners=False):
    int64 source indices and float32 weights, each of length `n_out`."""
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    src = (np.float64(scale) * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = i0 + (i0 < n_in - 1)
    lam = np.minimum(np.maximum(src - i0.astype(np.float32), np.float32(0)), np.float32(1))
    return i0, i1, (np.float32(1) - lam).astype(np.float32), lam.astype(np.float32)


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
    """int64 source index of each of `n_out` samples in torch's `nearest` resize from `n_in`."""
    if n_out == n_in:
        return np.arange(n_out, dtype=np.int64)
    if n_out == 2 * n_in:
        return np.arange(n_out, dtype=np.int64) >> 1
    scale = np.float32(np.float32(n_in) / np.float32(n_out))
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


@njit(cache=True, nogil=True, error_model="numpy")
def _rows(plane, x0, x1, a0, a1, buf):  # pragma: no cover - compiled
    """buf[r, j] = fma(p[r, x0[j]], a0[j], p[r, x1[j]] * a1[j]) for every row r of the (h,w) plane p:
    the horizontal half of torch's bilinear kernel."""
    for r in range(plane.shape[0]):
        line, out = plane[r], buf[r]
        for j in range(x0.shape[0]):
            out[j] = _fma(line[x0[j]], a0[j], line[x1[j]] * a1[j])


@njit(cache=True, nogil=True, error_model="numpy")
def _columns(buf, y0, y1, b0, b1, oy, tmp):  # pragma: no cover - compiled
    """tmp[j] = fma(buf[y0[oy], j], b0[oy], buf[y1[oy], j] * b1[oy]): the vertical half."""
    r0, r1, wb0, wb1 = buf[y0[oy]], buf[y1[oy]], b0[oy], b1[oy]
    for j in range(tmp.shape[0]):
        tmp[j] = _fma(r0[j], wb0, r1[j] * wb1)


@njit(cache=True, nogil=True, error_model="numpy")
def _store(tmp, row, left, flip):  # pragma: no cover - compiled
    """row[left:left+W] = tmp, mirrored when `flip`."""
    width = tmp.shape[0]
    if flip:
        for j in range(width):
            row[left + width - 1 - j] = tmp[j]
    else:
        row[left : left + width] = tmp


@njit(cache=True, nogil=True, error_model="numpy")
def bilinear_map(src, out, norm2, ys, xs, top, left, flip, mode):  # pragma: no cover - compiled
    """Resize `src` (C,h,w float32) to the (H,W) of the taps `ys`, `xs` (each (i0, i1, w0, w1))
    into out[:, top:top+H, left:left+W] (mirrored when `flip`), as `resize_sample` computes the
    map: PLAIN clamps to [0,1]; MASKED and UNIT resize the values times validity (any channel
    non-zero, none NaN) and the validity, and keep value / validity where the validity exceeds
    0.5 (else 0). UNIT also writes the squared length of each vector into `norm2` (H,W, not
    mirrored) for `unit_map`, which finishes the renormalisation."""
    y0, y1, b0, b1 = ys
    x0, x1, a0, a1 = xs
    channels, h, w = src.shape
    height, width = y0.shape[0], x0.shape[0]
    zero, one, half = np.float32(0.0), np.float32(1.0), np.float32(0.5)
    buf = np.empty((h, width), dtype=np.float32)
    tmp = np.empty(width, dtype=np.float32)
    if mode == PLAIN:
        for c in range(channels):
            _rows(src[c], x0, x1, a0, a1, buf)
            for oy in range(height):
                _columns(buf, y0, y1, b0, b1, oy, tmp)
                for j in range(width):
                    tmp[j] = min(max(tmp[j], zero), one)
                _store(tmp, out[c, top + oy], left, flip)
        return
    valid = np.zeros((h, w), dtype=np.float32)  # the validity, as (|x|.sum(0) > 0) in float
    plane = np.empty((h, w), dtype=np.float32)
    for c in range(channels):
        for r in range(h):
            line, acc = src[c, r], valid[r]
            for q in range(w):
                acc[q] += abs(line[q])
    for r in range(h):
        acc = valid[r]
        for q in range(w):
            acc[q] = one if acc[q] > zero else zero
    _rows(valid, x0, x1, a0, a1, buf)
    den = np.empty((height, width), dtype=np.float32)
    for oy in range(height):
        _columns(buf, y0, y1, b0, b1, oy, den[oy])
    if mode == UNIT:
        norm2[:, :] = zero
    for c in range(channels):
        for r in range(h):
            line, acc, dst = src[c, r], valid[r], plane[r]
            for q in range(w):
                dst[q] = line[q] * acc[q]
        _rows(plane, x0, x1, a0, a1, buf)
        for oy in range(height):
            _columns(buf, y0, y1, b0, b1, oy, tmp)
            d = den[oy]
            for j in range(width):
                tmp[j] = tmp[j] / d[j] if d[j] > half else zero
            if mode == UNIT:
                sq = norm2[oy]
                for j in range(width):
                    sq[j] += tmp[j] * tmp[j]
            _store(tmp, out[c, top + oy], left, flip)


@njit(cache=True, nogil=True, error_model="numpy")
def unit_map(out, norm, top, left, flip):  # pragma: no cover - compiled
    """Divide the vectors `bilinear_map(mode=UNIT)` wrote by their length `norm` (H,W: torch's
    sqrt, clamped, as `resize_sample` takes it), then negate x where `flip` (camera-frame normals)."""
    height, width = norm.shape
    for c in range(out.shape[0]):
        for oy in range(height):
            for ox in range(width):
                col = left + (width - 1 - ox if flip else ox)
                v = out[c, top + oy, col] / norm[oy, ox]
                out[c, top + oy, col] = -v if (flip and c == 0) else v


@njit(cache=True, nogil=True, error_model="numpy")
def nearest_map(src, out, rows, cols, top, left, flip):  # pragma: no cover - compiled
    """out[:, top + i, left + j] = src[:, rows[i], cols[j]] (columns mirrored when `flip`), src (C,h,w)."""
    width = cols.shape[0]
    for c in range(src.shape[0]):
        for i in range(rows.shape[0]):
            r = rows[i]
            for j in range(width):
                out[c, top + i, left + (width - 1 - j if flip else j)] = src[c, r, cols[j]]


def resize_map(x: np.ndarray, out: np.ndarray, ys: tuple, xs: tuple, *, top: int, left: int, flip: bool,
               mode: int) -> None:
    """Resize the (C,h,w) float32 map `x` into out[:, top:top+H, left:left+W] (mirrored when
    `flip`), as `resize_sample` resizes the image (PLAIN), depth (MASKED) or normals (UNIT)."""
    import torch

    height, width = ys[0].shape[0], xs[0].shape[0]
    norm2 = np.empty((height, width) if mode == UNIT else (0, 0), dtype=np.float32)
    bilinear_map(x, out, norm2, ys, xs, top, left, flip, mode)
    if mode == UNIT:
        # torch's sqrt (vectorised, not always the correctly rounded one) on the same (1,H,W) layout
        norm = torch.from_numpy(norm2)[None].sqrt_().clamp_(min=1e-6)[0].numpy()
        unit_map(out, norm, top, left, flip)


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether the compiled kernels give torch's bits on this machine (checked once per process on
    random maps with invalid pixels, up- and downscaling)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _self_check()
    return _AVAILABLE


def _self_check() -> bool:
    import torch

    from mtl_vision.data.transforms import resize_sample

    rng = np.random.default_rng(0)
    for (h, w), (oh, ow) in (((150, 171), (211, 190)), ((301, 260), (170, 203)), ((97, 230), (97, 311))):
        image = rng.random((3, h, w), dtype=np.float32)
        depth = (rng.random((1, h, w), dtype=np.float32) * 5) * (rng.random((1, h, w)) > 0.3)
        normals = rng.standard_normal((3, h, w), dtype=np.float32) * (rng.random((1, h, w)) > 0.3)
        sample = {"image": torch.from_numpy(image), "depth": torch.from_numpy(depth.astype(np.float32)),
                  "normals": torch.from_numpy(normals.astype(np.float32))}
        want = resize_sample(sample, (oh, ow))
        ys, xs = linear_taps(h, oh), linear_taps(w, ow)
        for key, mode in (("image", PLAIN), ("depth", MASKED), ("normals", UNIT)):
            got = np.empty((sample[key].shape[0], oh, ow), dtype=np.float32)
            resize_map(sample[key].numpy(), got, ys, xs, top=0, left=0, flip=False, mode=mode)
            if not np.array_equal(got, want[key].numpy()):
                return False
    return True
