"""Colour maps for every task: prediction or target -> (N,3,H,W) RGB floats in [0,1].

Class maps use a fixed palette (the PASCAL VOC bit-interleaved palette, so class colours match
what users know), ignore pixels are white; depth uses a perceptual ramp with invalid pixels black;
normals are shown as (n+1)/2; boundaries and saliency as heat maps. Non-finite values (a
diverged prediction) are magenta in every map, so they are seen rather than hidden.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtl_vision.constants import IGNORE_INDEX


def _voc_palette(n: int = 256) -> Tensor:
    palette = torch.zeros(n, 3)
    for label in range(n):
        c, r, g, b = label, 0, 0, 0
        for shift in range(8):
            r |= ((c >> 0) & 1) << (7 - shift)
            g |= ((c >> 1) & 1) << (7 - shift)
            b |= ((c >> 2) & 1) << (7 - shift)
            c >>= 3
        palette[label] = torch.tensor([r, g, b], dtype=torch.float32) / 255.0
    palette[IGNORE_INDEX] = 1.0
    return palette


_PALETTE = _voc_palette()
# Anchor colours of a dark-blue -> teal -> yellow ramp (viridis-like) for depth and heat maps.
_RAMP = torch.tensor(
    [[0.267, 0.005, 0.329], [0.231, 0.322, 0.545], [0.129, 0.569, 0.549], [0.369, 0.788, 0.384], [0.993, 0.906, 0.144]]
)


NAN_RGB = (1.0, 0.0, 1.0)  # magenta: inf or NaN


def _mark_non_finite(rgb: Tensor, bad: Tensor) -> Tensor:
    """rgb (N,3,H,W) with the pixels of `bad` (N,H,W) set to `NAN_RGB`."""
    colour = torch.tensor(NAN_RGB, device=rgb.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return torch.where(bad.unsqueeze(1), colour, rgb)


def _batched(x: Tensor) -> Tensor:
    """Accept (H,W), (N,H,W) or (N,1,H,W); return (N,H,W)."""
    if x.dim() == 2:
        return x[None]
    if x.dim() == 4 and x.shape[1] == 1:
        return x[:, 0]
    if x.dim() == 3:
        return x
    raise ValueError(f"expected a map of shape (H,W), (N,H,W) or (N,1,H,W), got {tuple(x.shape)}")


def _ramp(values: Tensor) -> Tensor:
    """values (N,H,W) in [0,1] -> (N,3,H,W); non-finite values magenta."""
    bad = ~values.isfinite()
    pos = values.nan_to_num(0.0).clamp(0, 1) * (len(_RAMP) - 1)
    low = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - low.float()).unsqueeze(-1)
    ramp = _RAMP.to(values.device)
    rgb = ramp[low] * (1 - frac) + ramp[low + 1] * frac
    return _mark_non_finite(rgb.permute(0, 3, 1, 2), bad)


def colorize_labels(labels: Tensor) -> Tensor:
    labels = _batched(labels).long().clamp(0, 255)
    return _PALETTE.to(labels.device)[labels].permute(0, 3, 1, 2)


def colorize_depth(depth: Tensor) -> Tensor:
    """Each image scaled to its own valid range; invalid (<= 0) pixels black, inf/NaN magenta."""
    depth = _batched(depth).float()
    bad = ~depth.isfinite()
    valid = (depth > 0) & ~bad
    big, small = torch.finfo(depth.dtype).max, torch.finfo(depth.dtype).min
    lo = torch.where(valid, depth, big).flatten(1).min(1).values.view(-1, 1, 1)
    hi = torch.where(valid, depth, small).flatten(1).max(1).values.view(-1, 1, 1)
    scaled = (depth - lo) / (hi - lo).clamp(min=1e-6)
    return _mark_non_finite(_ramp(1.0 - scaled) * valid.unsqueeze(1), bad)


def colorize_normals(normals: Tensor) -> Tensor:
    if normals.dim() == 3:
        normals = normals[None]
    if normals.dim() != 4 or normals.shape[1] != 3:
        raise ValueError(f"normals must be (N,3,H,W), got {tuple(normals.shape)}")
    normals = normals.float()
    bad = ~normals.isfinite().all(1)
    return _mark_non_finite(((normals.nan_to_num(0.0) + 1.0) / 2.0).clamp(0, 1), bad)


def colorize_heat(prob: Tensor) -> Tensor:
    prob = _batched(prob).float()
    return _ramp(torch.where(prob == IGNORE_INDEX, torch.zeros_like(prob), prob))

