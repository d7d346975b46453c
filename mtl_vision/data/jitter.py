"""Compiled photometric jitter, bit for bit torchvision's float kernels (`adjust_brightness`,
`adjust_saturation`, the grey image of `adjust_contrast`) and the hue rotation's einsum, in one
pass each instead of two to six, on (3,H,W) float32 images in any memory layout; results are
laid out in memory as torch's element-wise kernels lay out theirs (the stride order of the input).

torch fuses the multiply-adds of its `add_(other, alpha)` (FMA) on this kind of machine, which
`available()` checks once per process (the callers use torchvision otherwise); its blend with a
broadcast scalar (the contrast mean) rounds some tail elements apart, so that blend stays torch's.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

from mtl_vision.data.resample import _fma

__all__ = ["available", "brightness", "contrast", "hue", "saturation"]

_R, _G, _B = np.float32(0.2989), np.float32(0.587), np.float32(0.114)  # torchvision's grey weights


@njit(cache=True, nogil=True, error_model="numpy")
def _scale(x, factor, out):  # pragma: no cover - compiled
    """out = clamp(x * factor, 0, 1)."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            for c in range(3):
                out[c, i, j] = min(max(x[c, i, j] * factor, zero), one)


@njit(cache=True, nogil=True, error_model="numpy")
def _grey(x, out):  # pragma: no cover - compiled
    """out (H,W) = r * 0.2989 + g * 0.587 + b * 0.114 as torch's r.mul().add_(g, alpha).add_(b, alpha)."""
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            out[i, j] = _fma(x[2, i, j], _B, _fma(x[1, i, j], _G, x[0, i, j] * _R))


@njit(cache=True, nogil=True, error_model="numpy")
def _saturate(x, ratio, alpha, out):  # pragma: no cover - compiled
    """out = clamp(x * ratio + grey(x) * alpha, 0, 1) as torch's x.mul(ratio).add_(grey, alpha).clamp_()."""
    zero, one = np.float32(0.0), np.float32(1.0)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            grey = _fma(x[2, i, j], _B, _fma(x[1, i, j], _G, x[0, i, j] * _R))
            for c in range(3):
                out[c, i, j] = min(max(_fma(grey, alpha, x[c, i, j] * ratio), zero), one)


@njit(cache=True, nogil=True, error_model="numpy")
def _mix(x, m, out):  # pragma: no cover - compiled
    """out[k] = (m[k,0] * r + m[k,1] * g) + m[k,2] * b, each product and sum rounded: what
    torch.einsum("ij,jhw->ihw") computes for a 3x3 matrix (checked bit for bit)."""
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            r, g, b = x[0, i, j], x[1, i, j], x[2, i, j]
            for k in range(3):
                out[k, i, j] = (m[k, 0] * r + m[k, 1] * g) + m[k, 2] * b


def _like(image: torch.Tensor) -> torch.Tensor:
    """An output laid out in memory as torch's element-wise kernels lay out their result for
    `image` (its stride order): later kernels round a few pixels by their position in memory."""
    return torch.empty_like(image, memory_format=torch.preserve_format)


def brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    """`TF.adjust_brightness(image, factor)` of a (3,H,W) float32 image."""
    out = _like(image)
    _scale(image.numpy(), np.float32(factor), out.numpy())
    return out


def saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """`TF.adjust_saturation(image, factor)` of a (3,H,W) float32 image."""
    out = _like(image)
    _saturate(image.numpy(), np.float32(factor), np.float32(1.0 - float(factor)), out.numpy())
    return out


def contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    """`TF.adjust_contrast(image, factor)` of a (3,H,W) float32 image: the grey image compiled, its
    mean and the blend with it torch's."""
    grey = np.empty(image.shape[-2:], dtype=np.float32)
    _grey(image.numpy(), grey)
    mean = torch.mean(torch.from_numpy(grey)[None], dim=(-3, -2, -1), keepdim=True)
    factor = float(factor)
    return image.mul(factor).add_(mean, alpha=1.0 - factor).clamp_(0, 1.0)


def hue(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """`torch.einsum("ij,jhw->ihw", matrix, image)` (`transforms._rotate_hue`) of a (3,H,W) float32
    image and (3,3) float32 matrix; contiguous, as einsum returns it."""
    out = np.empty(tuple(image.shape), dtype=np.float32)
    _mix(image.numpy(), matrix.to(torch.float32).numpy(), out)
    return torch.from_numpy(out)


_AVAILABLE: bool | None = None


def available() -> bool:
    """Whether these kernels give torchvision's bits on this machine (whether torch fuses its
    multiply-adds here): checked once per process on a random image and a crop of it, in both
    memory layouts."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _self_check()
    return _AVAILABLE


def _self_check() -> bool:
    from torchvision.transforms.v2 import functional as TF

    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 61, 83, generator=generator)
    matrix = torch.rand(3, 3, generator=generator) - 0.5
    for x in (image, image.permute(1, 2, 0).contiguous().permute(2, 0, 1), image[:, 3:59, 5:71]):
        pairs = ((brightness(x, 1.2), TF.adjust_brightness(x, 1.2)),
                 (saturation(x, 0.8), TF.adjust_saturation(x, 0.8)),
                 (contrast(x, 1.1), TF.adjust_contrast(x, 1.1)),
                 (hue(x, matrix), torch.einsum("ij,jhw->ihw", matrix, x)))
        if not all(torch.equal(a, b) and a.stride() == b.stride() for a, b in pairs):
            return False
    return True
