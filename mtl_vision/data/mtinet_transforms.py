"""The data pipeline of MTI-Net's code base (PAD-Net, MTI-Net and its hard-sharing baseline).

Vandenhende et al., "MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task Learning",
ECCV 2020; SimonVandenhende/Multi-Task-Learning-PyTorch `data/custom_transforms.py` (from
facebookresearch/astmt), composed by `utils/common_config.py` `get_transformations`, with the
OpenCV interpolation of each map from `utils/config.py` (`FLAGVALS`). For the same random draws
these transforms compute what theirs compute:

- training: a horizontal flip with probability 0.5 (the normals' x negated); then one zoom and
  rotation about the image centre (`cv2.warpAffine`, zero outside the image for every map: black
  image, semseg class 0, no edge, not salient, background parts, invalid depth and normals),
  either drawn from lists (NYUD: no rotation, zoom 1.0, 1.2 or 1.5) or uniform in ranges centred
  on 1 and 0 (PASCAL-Context: zoom 0.75-1.25, +-20 degrees); depth divided by the zoom; the
  in-plane part of each normal turned by the angle; then every map resized to the output size
  (aspect not kept) and the normals divided by (length + float32 eps);
- test time: the same resize and normals division only; with `targets="original"` the image
  only, the targets kept at the image's own size, which is where their published numbers score
  (`evaluation/evaluate_utils.py save_model_predictions` + `eval_all_results`).

Image and normals interpolate bicubically, every other map nearest. Their `ToTensor` casts the
float image to uint8 without clipping: numpy's cast of the bicubic overshoot truncates toward
zero and wraps modulo 256 (x86-64), e.g. -3.7 -> 253, 256.2 -> 0; ours makes that explicit.
Their `AddIgnoreRegions` writes 255 into zero-length normals and zero depth, which are our
invalid zeros already, and marks an all-background `human_parts` map all 255.

Randomness comes from torch's global generator through `TorchDraws`, one call per draw of their
code (theirs: numpy's global RNG), so recorded draws replay exactly (tests/test_mtinet_transforms.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from mtl_vision.constants import ORIGINAL_SIZE_KEY
from mtl_vision.data.atrc_transforms import TorchDraws, flip_planes, ignore_unannotated_parts
from mtl_vision.data.transforms import CLASS_MAPS, MAPS, _check_size

# utils/config.py FLAGVALS: the interpolation of each map in ScaleNRotate and FixedResize
FLAGS = {
    "image": cv2.INTER_CUBIC,
    "semseg": cv2.INTER_NEAREST,
    "human_parts": cv2.INTER_NEAREST,
    "saliency": cv2.INTER_NEAREST,
    "normals": cv2.INTER_CUBIC,
    "edge": cv2.INTER_NEAREST,
    "depth": cv2.INTER_NEAREST,
}
NORMALS_EPS = np.finfo(np.float32).eps  # FixedResize: n / (|n| + eps)
NORMALS_DTYPES = ("float32", "float64")
TARGETS = ("resized", "original")

Planes = dict[str, np.ndarray]  # HxW (one channel) or HxWx3 arrays as their loaders give them


def to_planes(sample: dict[str, Any], normals_dtype: str = "float32") -> Planes:
    """The maps of a sample as their loaders return them: HxW float32 (HxWx3 for the image and
    normals), the image RGB in 0..255 (rounded: our loaders store pixel / 255), normals in
    `normals_dtype`, an all-255 `human_parts` map (no part annotation) all background."""
    planes = {}
    for key in MAPS:
        if key not in sample:
            continue
        x = sample[key].detach().cpu()
        x = x[0] if x.dim() == 3 and x.shape[0] == 1 else x
        array = x.numpy().astype(np.float32) if x.dim() == 2 else x.permute(1, 2, 0).numpy().astype(np.float32)
        if key == "image":
            array = np.rint(array * np.float32(255))
        elif key == "normals":
            array = array.astype(normals_dtype)
        elif key == "human_parts" and (array == 255).all():
            array = np.zeros_like(array)
        planes[key] = np.ascontiguousarray(array)
    return planes


def as_uint8(image: np.ndarray) -> np.ndarray:
    """Their `image.astype(np.uint8)` on x86-64: truncation toward zero, then modulo 256."""
    return np.remainder(np.trunc(image), 256).astype(np.uint8)


def from_planes(sample: dict[str, Any], planes: Planes) -> dict[str, Any]:
    """`sample` with its maps replaced by `planes` (their `AddIgnoreRegions` + `ToTensor`, in our
    encodings): the image cast as theirs to uint8 and scaled to [0, 1] in float32, class maps
    (H,W) int64, other maps (C,H,W) float32; zero normals and depth stay our invalid zeros."""
    out = dict(sample)
    for key, array in planes.items():
        if key == "image":
            image = as_uint8(array).astype(np.float32) / np.float32(255)
            out[key] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            continue
        x = torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)))
        if key in CLASS_MAPS:
            out[key] = x.to(torch.int64)
        else:
            out[key] = x[None] if x.dim() == 2 else x.permute(2, 0, 1).contiguous()
    return ignore_unannotated_parts(out)


def rotate_normals(normals: np.ndarray, angle: float) -> np.ndarray:
    """Turn the (x, y) part of HxWx3 normals by `angle` degrees (their `ScaleNRotate`: through
    the angle atan2(x, y) and the length of (x, y)), in the normals' dtype; z is kept."""
    out = normals.copy()
    in_plane = np.arctan2(normals[:, :, 0], normals[:, :, 1])
    length = np.sqrt(normals[:, :, 0] ** 2 + normals[:, :, 1] ** 2)
    radians = angle * 2 * math.pi / 360
    out[:, :, 0] = np.sin(in_plane + radians) * length
    out[:, :, 1] = np.cos(in_plane + radians) * length
    return out


def rotate_scale_planes(planes: Planes, angle: float, scale: float) -> Planes:
    """Zoom by `scale` and rotate by `angle` degrees (counter-clockwise) about (W/2, H/2), every map
    with its `FLAGS` interpolation and zero outside the image; depth divided by `scale`."""
    h, w = planes["image"].shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    out = {}
    for key, array in planes.items():
        if key == "normals":
            array = rotate_normals(array, angle)
        warped = cv2.warpAffine(array, matrix, (w, h), flags=FLAGS[key])
        out[key] = warped / scale if key == "depth" else warped
    return out


def unit_normals(normals: np.ndarray) -> np.ndarray:
    """HxWx3 normals divided by (their length + float32 eps), as their `FixedResize`; zero stays zero."""
    n1, n2, n3 = normals[:, :, 0], normals[:, :, 1], normals[:, :, 2]
    length = np.sqrt(n1**2 + n2**2 + n3**2) + NORMALS_EPS
    return np.stack([n1 / length, n2 / length, n3 / length], axis=2)


def resize_planes(planes: Planes, size: tuple[int, int]) -> Planes:
    """Every map resized to `size` = (H, W) with its `FLAGS` interpolation (a copy when the size
    is already that), then the normals divided by (length + eps)."""
    out = {}
    for key, array in planes.items():
        out[key] = cv2.resize(array, size[::-1], interpolation=FLAGS[key])  # OpenCV takes (W, H)
    if "normals" in out:
        out["normals"] = unit_normals(out["normals"])
    return out


def _check_normals_dtype(normals_dtype: str) -> str:
    if normals_dtype not in NORMALS_DTYPES:
        raise ValueError(f"normals_dtype must be one of {NORMALS_DTYPES}, got {normals_dtype!r}")
    return normals_dtype


def _pair(value: Sequence[float], name: str, centre: float) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or pair[0] > pair[1] or not math.isclose(pair[0] + pair[1], 2 * centre, abs_tol=1e-12):
        raise ValueError(
            f"{name} must be [min, max] centred on {centre:g} (their ScaleNRotate draws "
            f"centre + (max - min) * (u - 1/2)), got {list(value)}"
        )
    return pair


def _choices(value: Sequence[float], name: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in value)
    if not values:
        raise ValueError(f"{name} must list at least one value, got {list(value)}")
    return values


class MTINetTrainTransform:
    """Training augmentation of MTI-Net's code base (module docstring).

    Samples: "image" (3,H,W) RGB in [0,1] with 8-bit values; targets as DESIGN.md. Returns maps
    of `crop_size`, the image on the 8-bit grid.

    Args:
        crop_size: [height, width] every sample is resized to last (their TRAIN.SCALE).
        scales, rotations: their lists of zooms and angles (degrees), each drawn uniformly (NYUD).
        scale_range, rotation_range: their continuous ranges [min, max], centred on 1 and 0 as
            their formula is (PASCAL-Context); either both lists or both ranges.
        flip_prob: probability of the horizontal flip (theirs: 0.5).
        normals_dtype: the dtype their loader gives the normals, in which they are rotated,
            interpolated and normalised (PASCAL-Context: float64; NYUD's .npy: float32).

    `draws` (a `TorchDraws`) gives every random number; tests swap it for recorded ones.
    """

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        scales: Sequence[float] | None = None,
        rotations: Sequence[float] | None = None,
        scale_range: Sequence[float] | None = None,
        rotation_range: Sequence[float] | None = None,
        flip_prob: float = 0.5,
        normals_dtype: str = "float32",
    ) -> None:
        self.crop_size = _check_size(crop_size, "crop_size")
        lists, ranges = (scales, rotations), (scale_range, rotation_range)
        if all(v is not None for v in lists) and all(v is None for v in ranges):
            self.scales, self.rotations = _choices(scales, "scales"), _choices(rotations, "rotations")
            self.scale_range = self.rotation_range = None
        elif all(v is not None for v in ranges) and all(v is None for v in lists):
            self.scale_range = _pair(scale_range, "scale_range", 1.0)
            self.rotation_range = _pair(rotation_range, "rotation_range", 0.0)
            self.scales = self.rotations = None
        else:
            raise ValueError(
                "give either scales and rotations (lists to draw from) or scale_range and rotation_range "
                f"(continuous), as their ScaleNRotate; got scales={scales}, rotations={rotations}, "
                f"scale_range={scale_range}, rotation_range={rotation_range}"
            )
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.flip_prob = float(flip_prob)
        self.normals_dtype = _check_normals_dtype(normals_dtype)
        self.draws = TorchDraws()

    def draw_rotation_scale(self) -> tuple[float, float]:
        """(angle in degrees, zoom): the angle drawn first, as theirs."""
        if self.rotations is not None:
            angle = self.rotations[self.draws.randint(0, len(self.rotations) - 1)]
            return angle, self.scales[self.draws.randint(0, len(self.scales) - 1)]
        (r0, r1), (s0, s1) = self.rotation_range, self.scale_range
        angle = (r1 - r0) * self.draws.random() - (r1 - r0) / 2
        return angle, (s1 - s0) * self.draws.random() - (s1 - s0) / 2 + 1

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        planes = to_planes(sample, self.normals_dtype)
        if self.draws.random() < self.flip_prob:
            planes = flip_planes(planes)
        planes = rotate_scale_planes(planes, *self.draw_rotation_scale())
        return from_planes(sample, resize_planes(planes, self.crop_size))


class MTINetValTransform:
    """Test-time resize of MTI-Net's code base: every map to `size` (their TEST.SCALE; the aspect
    is not kept), image and normals bicubic, other maps nearest; normals divided by (length + eps).

    Args:
        size: [height, width].
        normals_dtype: as `MTINetTrainTransform`.
        targets: "resized" (their test-time pipeline, what their online `eval_model` scores), or
            "original": only the image is resized, the targets stay at the loader's (the image's
            own) size and the sample records it under `ORIGINAL_SIZE_KEY`, (2,) int64 (H, W).
            Validation then brings each prediction back to that size as their
            `save_model_predictions` does before the evaluators that give their published
            numbers read it (`metrics.functional.stored_at_original_size`).
    """

    def __init__(self, *, size: Sequence[int], normals_dtype: str = "float32", targets: str = "resized") -> None:
        self.size = _check_size(size, "size")
        self.normals_dtype = _check_normals_dtype(normals_dtype)
        if targets not in TARGETS:
            raise ValueError(f"MTINetValTransform targets (data.val_transform.targets) must be one of {TARGETS}, got {targets!r}")
        self.targets = targets

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        if self.targets == "resized":
            return from_planes(sample, resize_planes(to_planes(sample, self.normals_dtype), self.size))
        image = {"image": sample["image"]}
        out = from_planes(sample, resize_planes(to_planes(image, self.normals_dtype), self.size))
        out[ORIGINAL_SIZE_KEY] = torch.tensor(tuple(sample["image"].shape[-2:]), dtype=torch.int64)
        return out


__all__ = ["ORIGINAL_SIZE_KEY", "MTINetTrainTransform", "MTINetValTransform"]
