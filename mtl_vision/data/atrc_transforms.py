"""The data pipeline of ATRC, which InvPT, TaskPrompter and MLoRE train and test with.

Bruggemann et al., "Exploring Relational Context for Multi-Task Dense Prediction", ICCV 2021
(`src/data/transforms.py`); the same file is `data/transforms.py` of prismformore/
Multi-Task-Transformer (InvPT, ECCV 2022; TaskPrompter, ICLR 2023) and of YuqiYang213/MLoRE
(CVPR 2024), composed in their `utils/common_config.py`. For the same random draws these
transforms compute what theirs compute:

- training: a random scale in [0.5, 2] (sizes floored; OpenCV bilinear for the image, nearest
  for every target, depth divided by the scale); a random crop, redrawn up to 10 times while its
  labelled semseg pixels hold a single class or one class covers 75% of them (a side shorter
  than the crop stays whole); a horizontal flip that negates the normals' x; mmsegmentation's
  photometric distortion as they adapted it, on the image truncated to uint8 (brightness,
  contrast first or last, saturation and hue in OpenCV's 8-bit HSV of the RGB image, each with
  probability 0.5 and truncated to uint8 again); centred padding;
- test time: centred padding only (larger sides unchanged).

Padding fills the image with the ImageNet mean colour (the 0 of their normalised image; our model
normalises later) and the targets with their ignore values. Their `AddIgnoreRegions` marks
unlabelled normals and depth with their ignore values, which are our invalid zeros already; an
all-background `human_parts` map (e.g. a crop without any part) becomes all 255, as theirs.

Randomness comes from torch's global generator through `TorchDraws`, one call per draw of their
code, so a recorded sequence of their draws replays exactly (tests/test_atrc_transforms.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np
import torch

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.transforms import CLASS_MAPS, MAPS, _check_size, pad_sample

IMAGENET_MEAN = (0.485, 0.456, 0.406)
CROP_RETRIES = 10  # redraws after the first crop; the last one is taken unchecked

Planes = dict[str, np.ndarray]  # HxWxC float32 maps as their code holds them; the image in 0..255


class TorchDraws:
    """Draws with the semantics of Python's `random` functions their code calls, from torch's
    global generator (which the data pipeline seeds per sample)."""

    def random(self) -> float:
        return float(torch.rand((), dtype=torch.float64))

    def uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self.random()

    def randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi], both included."""
        return lo + int(torch.randint(0, hi - lo + 1, ()))


def to_planes(sample: dict[str, Any]) -> Planes:
    """The maps of a sample as their datasets load them: HxWxC float32, the image RGB in 0..255.

    The image goes back to its 8-bit values (rounded: our loaders store pixel / 255).
    """
    planes = {}
    for key in MAPS:
        if key in sample:
            x = sample[key].detach().cpu()
            x = x[None] if x.dim() == 2 else x
            array = np.ascontiguousarray(x.permute(1, 2, 0).numpy(), dtype=np.float32)
            planes[key] = np.rint(array * np.float32(255)) if key == "image" else array
    return planes


def from_planes(sample: dict[str, Any], planes: Planes) -> dict[str, Any]:
    """`sample` with its maps replaced by `planes`: CHW tensors of the sample's dtypes, class maps
    HxW, the image scaled to [0, 1] (in float32, as their normalisation divides by 255)."""
    out = dict(sample)
    for key, array in planes.items():
        if key == "image":
            image = array.astype(np.float32) / np.float32(255)
            out[key] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
            continue
        x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        out[key] = x[0].to(torch.int64) if key in CLASS_MAPS else x.to(sample[key].dtype)
    return out


def scale_planes(planes: Planes, factor: float) -> Planes:
    """Resize by `factor` to floor(size * factor): the image bilinear, every target nearest (as
    OpenCV computes both), depth divided by `factor` (a closer camera)."""
    if factor == 1.0:
        return planes
    h, w = planes["image"].shape[:2]
    size = (int(w * factor), int(h * factor))  # OpenCV takes (width, height)
    out = {}
    for key, array in planes.items():
        mode = cv2.INTER_LINEAR if key == "image" else cv2.INTER_NEAREST
        resized = cv2.resize(array, size, interpolation=mode)
        resized = resized[..., None] if resized.ndim == 2 else resized
        if key == "depth":
            resized /= np.float32(factor)
        out[key] = resized
    return out


def crop_planes(planes: Planes, origin: tuple[int, int] | None, size: tuple[int, int]) -> Planes:
    """The `size` window at `origin` (None: everything); a side shorter than the window stays whole."""
    if origin is None:
        return planes
    (top, left), (ch, cw) = origin, size
    return {key: array[top : top + ch, left : left + cw] for key, array in planes.items()}


def flip_planes(planes: Planes) -> Planes:
    """Mirror left-right; the normals' x component changes sign."""
    out = {key: np.ascontiguousarray(array[:, ::-1]) for key, array in planes.items()}
    if "normals" in out:
        out["normals"][..., 0] *= -1
    return out


def is_balanced(semseg: np.ndarray, cat_max_ratio: float) -> bool:
    """At least two classes among the labelled (not 255) pixels, none covering `cat_max_ratio` of them."""
    counts = np.bincount(semseg.astype(np.int64).ravel(), minlength=IGNORE_INDEX + 1)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio


def _affine_uint8(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """x * alpha + beta in float32, clipped to [0, 255] and truncated to uint8."""
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)


def pad_centred(sample: dict[str, Any], size: Sequence[int], image_fill: Sequence[float]) -> dict[str, Any]:
    """Pad every map to at least `size`, the sample in the middle (the extra pixel of an odd margin
    after it): the image with `image_fill`, targets with their ignore/invalid values."""
    h, w = sample["image"].shape[-2:]
    ph, pw = max(h, size[0]), max(w, size[1])
    if (ph, pw) == (h, w):
        return sample
    top, left = (ph - h) // 2, (pw - w) // 2
    out = pad_sample(sample, (ph, pw), top=top, left=left)
    image = torch.tensor(image_fill, dtype=sample["image"].dtype).view(3, 1, 1).repeat(1, ph, pw)
    image[:, top : top + h, left : left + w] = sample["image"]
    out["image"] = image
    return out


def ignore_unannotated_parts(sample: dict[str, Any]) -> dict[str, Any]:
    """A `human_parts` map of background and ignore only carries no part supervision: all 255."""
    parts = sample.get("human_parts")
    if parts is not None and ((parts == 0) | (parts == IGNORE_INDEX)).all():
        sample = dict(sample, human_parts=torch.full_like(parts, IGNORE_INDEX))
    return sample


def _check_fill(image_fill: Sequence[float]) -> tuple[float, float, float]:
    fill = tuple(float(v) for v in image_fill)
    if len(fill) != 3 or not all(0.0 <= v <= 1.0 for v in fill):
        raise ValueError(f"image_fill must be 3 RGB values in [0, 1], got {list(image_fill)}")
    return fill


def _check_range(value: Sequence[float], name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
        raise ValueError(f"{name} must be [min, max] with 0 < min <= max, got {list(value)}")
    return pair


class ATRCTrainTransform:
    """Training augmentation of ATRC / InvPT / TaskPrompter / MLoRE (module docstring).

    Samples: "image" (3,H,W) RGB in [0,1] with 8-bit values; targets as DESIGN.md. Returns maps
    of `crop_size`, the image on the 8-bit grid and `image_fill` where padded.

    Args:
        crop_size: [height, width] of the crops (their TRAIN.SCALE).
        scale_range: [min, max] of the uniform scale factor.
        cat_max_ratio: a crop whose largest semseg class covers this share of the labelled pixels
            (or with fewer than two classes) is redrawn, up to 10 times; 1 disables the check.
        flip_prob: probability of the horizontal flip.
        brightness_delta: brightness offsets uniform in [-delta, delta] (8-bit units).
        contrast_range, saturation_range: [min, max] of the uniform factors.
        hue_delta: hue shifts uniform in integers [-delta, delta - 1] of OpenCV's 180 hues.
        image_fill: RGB colour of the image padding, in [0, 1].

    `draws` (a `TorchDraws`) gives every random number; tests swap it for recorded ones.
    """

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        brightness_delta: float = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        image_fill: Sequence[float] = IMAGENET_MEAN,
    ) -> None:
        self.crop_size = _check_size(crop_size, "crop_size")
        self.scale_range = _check_range(scale_range, "scale_range")
        if not 0 < cat_max_ratio <= 1:
            raise ValueError(f"cat_max_ratio must be in (0, 1], got {cat_max_ratio}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if brightness_delta < 0:
            raise ValueError(f"brightness_delta must be >= 0, got {brightness_delta}")
        if int(hue_delta) != hue_delta or not 1 <= hue_delta <= 90:
            raise ValueError(f"hue_delta must be an integer in [1, 90] (of 180 hues), got {hue_delta}")
        self.cat_max_ratio = float(cat_max_ratio)
        self.flip_prob = float(flip_prob)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = _check_range(contrast_range, "contrast_range")
        self.saturation_range = _check_range(saturation_range, "saturation_range")
        self.hue_delta = int(hue_delta)
        self.image_fill = _check_fill(image_fill)
        self.draws = TorchDraws()

    def crop_origin(self, planes: Planes) -> tuple[int, int] | None:
        """(top, left) of the crop, None when the scaled sample already has the crop's size."""
        h, w = planes["image"].shape[:2]
        ch, cw = self.crop_size
        if (h, w) == (ch, cw):
            return None

        def draw() -> tuple[int, int]:
            return self.draws.randint(0, max(h - ch, 0)), self.draws.randint(0, max(w - cw, 0))

        origin = draw()
        if self.cat_max_ratio < 1 and "semseg" in planes:  # without semseg: no retries (as MLoRE)
            for _ in range(CROP_RETRIES):
                top, left = origin
                if is_balanced(planes["semseg"][top : top + ch, left : left + cw], self.cat_max_ratio):
                    break
                origin = draw()
        return origin

    def photometric(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 RGB image in 0..255 (float) -> uint8, truncated first and after every operation."""
        image = image.astype(np.uint8)
        if self.draws.random() < 0.5:
            image = _affine_uint8(image, beta=self.draws.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = self.draws.random() < 0.5
        if contrast_first:
            image = self._contrast(image)
        if self.draws.random() < 0.5:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # 8-bit: hue 0..179, saturation 0..255
            hsv[..., 1] = _affine_uint8(hsv[..., 1], alpha=self.draws.uniform(*self.saturation_range))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if self.draws.random() < 0.5:
            hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
            shift = self.draws.randint(-self.hue_delta, self.hue_delta - 1)
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if not contrast_first:
            image = self._contrast(image)
        return image

    def _contrast(self, image: np.ndarray) -> np.ndarray:
        if self.draws.random() < 0.5:
            return _affine_uint8(image, alpha=self.draws.uniform(*self.contrast_range))
        return image

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        planes = scale_planes(to_planes(sample), self.draws.uniform(*self.scale_range))
        planes = crop_planes(planes, self.crop_origin(planes), self.crop_size)
        if self.draws.random() < self.flip_prob:
            planes = flip_planes(planes)
        planes["image"] = self.photometric(planes["image"])
        out = pad_centred(from_planes(sample, planes), self.crop_size, self.image_fill)
        return ignore_unannotated_parts(out)


class ATRCValTransform:
    """Test-time padding of ATRC / InvPT / TaskPrompter / MLoRE: centred, to at least `size`.

    Args:
        size: [height, width] (their TEST.SCALE); a larger side keeps its size.
        image_fill: RGB colour of the image padding, in [0, 1].
    """

    def __init__(self, *, size: Sequence[int], image_fill: Sequence[float] = IMAGENET_MEAN) -> None:
        self.size = _check_size(size, "size")
        self.image_fill = _check_fill(image_fill)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        return ignore_unannotated_parts(pad_centred(sample, self.size, self.image_fill))


__all__ = ["ATRCTrainTransform", "ATRCValTransform", "TorchDraws"]
