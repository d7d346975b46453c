"""Joint transforms: one geometry for the image and every target of a sample.

Training (as the dense multi-task references, MTI-Net / InvPT): random scaling, random crop with
padding, horizontal flip, photometric jitter on the image only. Class maps use nearest
interpolation; depth and normals use a masked bilinear resize that averages valid pixels only, so
valid and invalid geometry never mix; normals are renormalised and a flip negates their x
component. Padding uses the ignore value (255) for class maps, boundaries and saliency and the
invalid value (0) for depth and normals, so padded pixels never count in losses or metrics.
Validation pads to a fixed size the same way, which makes every metric equal to the metric on the
original-size region, as the reference protocols compute it.

Images stay RGB in [0,1]; the model applies the backbone's normalisation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from mtl_vision.constants import IGNORE_INDEX

CLASS_MAPS = ("semseg", "human_parts")
BINARY_MAPS = ("edge", "saliency")
GEOMETRY = ("depth", "normals")
MAPS = ("image", *CLASS_MAPS, *BINARY_MAPS, *GEOMETRY)  # everything that shares the sample's geometry

# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane.
_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_FROM_YIQ = torch.linalg.inv(_TO_YIQ)


def _resize_nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    """(H,W) or (C,H,W) map, any dtype."""
    squeeze = x.dim() == 2
    y = x[None, None] if squeeze else x[None]
    y = F.interpolate(y.float(), size=size, mode="nearest").to(x.dtype)
    return y[0, 0] if squeeze else y[0]


def resize_sample(sample: dict[str, Any], size: tuple[int, int]) -> dict[str, Any]:
    """Resize the image and every target of a sample to `size` = (H, W).

    The image and the masked geometry (values times validity, and the validity itself) go through
    one bilinear call, about twice as fast on one CPU thread as one call each;
    a geometry pixel stays valid where most of its interpolation weight came from valid pixels,
    and its value is the average of those valid pixels only.
    """
    out = dict(sample)
    image = sample["image"]
    tasks = [task for task in GEOMETRY if task in sample]
    dtype = image.dtype
    for task in tasks:
        dtype = torch.promote_types(dtype, sample[task].dtype)  # as torch.cat of the planes promotes
    # The planes written into one buffer (torch.cat would copy them once more). Channels are
    # resized independently, so the result equals one call per map, except that a 3-channel
    # input takes another kernel (the image alone): it keeps that call as it was.
    channels = 3 + sum(sample[task].shape[0] + 1 for task in tasks)
    planes = torch.empty((1, channels, *image.shape[-2:]), dtype=dtype)
    planes[0, :3] = image
    slices, start = {}, 3
    for task in tasks:
        x, stop = sample[task], start + sample[task].shape[0]
        valid = (x.abs().sum(dim=0, keepdim=True) > 0).to(x.dtype)
        torch.mul(x, valid, out=planes[0, start:stop])
        planes[0, stop : stop + 1] = valid
        slices[task], start = (start, stop), stop + 1
    resized = F.interpolate(planes, size=size, mode="bilinear", align_corners=False)[0]
    out["image"] = resized[:3].clamp_(0, 1)
    for task, (a, b) in slices.items():
        # in place on the fresh `resized`: where(den > 0.5, num / max(den, 1e-6), 0) without temporaries
        num, den = resized[a:b], resized[b : b + 1]
        value = num.div_(den.clamp(min=1e-6)).masked_fill_(torch.logical_not(den > 0.5), 0.0)
        if task == "normals":
            # Written out: F.normalize over dim 0 of a (3,H,W) map is ~50x slower on one CPU thread.
            value.div_((value * value).sum(dim=0, keepdim=True).sqrt_().clamp_(min=1e-6))
        out[task] = value
    for task in CLASS_MAPS + BINARY_MAPS:
        if task in sample:
            out[task] = _resize_nearest(sample[task], size)
    return out


def target_fill(task: str) -> float:
    """The value a target of `task` is padded with: one no loss or metric counts (255 for class
    maps, edges and saliency; 0 = invalid for depth and normals)."""
    return 0.0 if task in GEOMETRY else IGNORE_INDEX


def pad_sample(sample: dict[str, Any], size: tuple[int, int], *, top: int = 0, left: int = 0) -> dict[str, Any]:
    """Pad every map to `size` with the image at (top, left); image padding is black, a target's
    is its fill value (`target_fill`)."""
    return _pad_flip(sample, size, top=top, left=left, flip=False)


def crop_sample(sample: dict[str, Any], top: int, left: int, size: tuple[int, int]) -> dict[str, Any]:
    out = dict(sample)
    for key in MAPS:
        if key in sample:
            out[key] = sample[key][..., top : top + size[0], left : left + size[1]]
    return out


def flip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Horizontal flip; the normals' x component changes sign (camera-frame normals)."""
    return _pad_flip(sample, tuple(sample["image"].shape[-2:]), top=0, left=0, flip=True)


def _check_size(size: Sequence[int], name: str) -> tuple[int, int]:
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{name} must be [height, width] with positive values, got {list(size)}")
    return size


class TrainTransform:
    """Random scale, random crop (padding where the scaled sample is smaller), flip, jitter.

    The outputs are those of jitter -> `crop_sample` -> `resize_sample` -> `pad_sample` ->
    `flip_sample`, bit for bit; the jitter after contrast runs on the crop only, and in a
    DataLoader worker the resize, padding and flip run as one compiled pass (`data.resample`).

    Args:
        crop_size: [height, width] of the training crops.
        scale_range: [min, max] random scale factor (InvPT and MTI-Net use 0.5-2.0).
        flip_prob: probability of a horizontal flip.
        brightness, contrast, saturation: maximal relative jitter (0 disables); hue: maximal shift.
    """

    def __init__(
        self,
        *,
        crop_size: Sequence[int],
        scale_range: Sequence[float] = (0.5, 2.0),
        flip_prob: float = 0.5,
        brightness: float = 0.25,
        contrast: float = 0.25,
        saturation: float = 0.25,
        hue: float = 0.05,
    ) -> None:
        self.crop_size = _check_size(crop_size, "crop_size")
        lo, hi = (float(s) for s in scale_range)
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be [min, max] with 0 < min <= max, got {list(scale_range)}")
        self.scale_range = (lo, hi)
        self.flip_prob = flip_prob
        self.jitter = (brightness, contrast, saturation, hue)

    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand(()))

    def _randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi]."""
        return lo + int(torch.randint(0, hi - lo + 1, ()))

    def _jitter_draws(self) -> list[tuple[str, float]]:
        """The photometric ops in their random order with their random factors, drawn from torch's
        RNG in the order `_photometric` draws them (the order, then each op's factor)."""
        names = [n for n, amount in zip(_JITTER_OPS, self.jitter, strict=True) if amount > 0]
        draws = []
        for i in torch.randperm(len(names)).tolist():
            amount = self.jitter[_JITTER_OPS.index(names[i])]
            lo, hi = (-amount, amount) if names[i] == "hue" else (1 - amount, 1 + amount)
            draws.append((names[i], self._uniform(lo, hi)))
        return draws

    def _photometric(self, image: Tensor) -> Tensor:
        image = _jitter(image, self._jitter_draws())
        return image.clamp(0, 1)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        # Jitter first, so that padding stays black whatever the contrast and hue draws.
        draws = self._jitter_draws()
        h, w = sample["image"].shape[-2:]
        ch, cw = self.crop_size
        scale = self._uniform(*self.scale_range)
        # The crop of the scaled image, in source pixels; where it leaves the image it is padding.
        rh, rw = max(1, round(ch / scale)), max(1, round(cw / scale))
        top, left = self._randint(min(0, h - rh), max(0, h - rh)), self._randint(min(0, w - rw), max(0, w - rw))
        y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + rh, h), min(left + rw, w)
        # The jitter is per pixel except contrast, whose mean grey is the whole image's: the ops up
        # to contrast run on the whole image, the rest on the crop only (the same values there).
        split = next((i + 1 for i, (name, _) in enumerate(draws) if name == "contrast"), 0)
        image = _jitter(sample["image"], draws[:split])[..., y0:y1, x0:x1]
        sample = crop_sample(sample, y0, x0, (y1 - y0, x1 - x0))
        sample["image"] = _jitter(image, draws[split:]).clamp(0, 1)
        # Only the part inside the image is resized (cost bounded by the crop size), then padded.
        size = (min(ch, max(1, round((y1 - y0) * ch / rh))), min(cw, max(1, round((x1 - x0) * cw / rw))))
        off_y = off_x = 0
        if size != (ch, cw):
            off_y = min(round((y0 - top) * ch / rh), ch - size[0])
            off_x = min(round((x0 - left) * cw / rw), cw - size[1])
        flip = float(torch.rand(())) < self.flip_prob  # resizing and padding draw nothing
        if size != (y1 - y0, x1 - x0):
            if _fusable(sample, size):
                return _resize_pad_flip(sample, size, (ch, cw), top=off_y, left=off_x, flip=flip)
            sample = resize_sample(sample, size)
        return _pad_flip(sample, (ch, cw), top=off_y, left=off_x, flip=flip)


_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _jitter(image: Tensor, draws: Sequence[tuple[str, float]]) -> Tensor:
    """Apply photometric ops (name, factor) in order (torchvision's kernels; hue: `_rotate_hue`),
    compiled for float32 RGB images on the CPU (`data.jitter`: the same bits; contrast's mean and
    blend stay torch's)."""
    compiled = (image.dtype == torch.float32 and image.dim() == 3 and image.shape[0] == 3
                and image.device.type == "cpu" and not image.requires_grad and image.numel() > 0)
    if compiled and draws:
        from mtl_vision.data import jitter

        compiled = jitter.available()
    for name, factor in draws:
        fast = compiled and factor >= 0  # torchvision names a negative factor in its error
        if name == "brightness":
            image = jitter.brightness(image, factor) if fast else TF.adjust_brightness(image, factor)
        elif name == "contrast":
            image = jitter.contrast(image, factor) if fast else TF.adjust_contrast(image, factor)
        elif name == "saturation":
            image = jitter.saturation(image, factor) if fast else TF.adjust_saturation(image, factor)
        else:
            image = jitter.hue(image, _hue_matrix(factor)) if compiled else _rotate_hue(image, factor)
    return image


def _fusable(sample: dict[str, Any], size: tuple[int, int]) -> bool:
    """Whether `_resize_pad_flip` gives this sample's bits: one torch thread (a DataLoader worker;
    torch's kernel splits its loop otherwise), float32 image and geometry on the CPU, geometry
    present (the image alone takes another torch kernel), a resize to at least
    `resample.MIN_OUTPUT` values, and kernels that match torch on this machine."""
    from mtl_vision.data import resample

    if torch.get_num_threads() != 1:
        return False
    geometry = [k for k in GEOMETRY if k in sample]
    channels = 3 + sum(sample[k].shape[0] + 1 for k in geometry)
    if not geometry or channels * size[0] * size[1] < resample.MIN_OUTPUT:
        return False
    for key in MAPS:
        if key in sample:
            x = sample[key]
            if not isinstance(x, Tensor) or x.device.type != "cpu" or x.requires_grad:
                return False
            if (key == "image" or key in GEOMETRY) and x.dtype != torch.float32:
                return False
            if key in CLASS_MAPS + BINARY_MAPS and x.dtype not in _NUMPY_DTYPES:
                return False
    if sample["image"].dim() != 3 or sample["image"].shape[0] != 3:
        return False
    return resample.available()


_NUMPY_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.uint8, torch.int16, torch.bool)


def _resize_pad_flip(sample: dict[str, Any], size: tuple[int, int], out_size: tuple[int, int], *, top: int,
                     left: int, flip: bool) -> dict[str, Any]:
    """`resize_sample(sample, size)`, then `_pad_flip(..., out_size, top, left, flip)`, in one pass
    per map by the compiled kernels of `data.resample` (the same bits)."""
    from mtl_vision.data import resample

    h, w = sample["image"].shape[-2:]
    ph, pw = out_size
    padded = size != out_size
    if flip:
        left = pw - size[1] - left
    ys, xs = resample.linear_taps(h, size[0]), resample.linear_taps(w, size[1])
    rows = cols = None
    out = dict(sample)
    for key in MAPS:
        if key not in sample:
            continue
        x = sample[key].numpy()
        if key == "image" or key in GEOMETRY:
            y = np.zeros((x.shape[0], ph, pw), np.float32) if padded else np.empty((x.shape[0], ph, pw), np.float32)
            mode = resample.PLAIN if key == "image" else resample.UNIT if key == "normals" else resample.MASKED
            resample.resize_map(x, y, ys, xs, top=top, left=left, flip=flip, mode=mode)
        else:
            if rows is None:
                rows, cols = resample.nearest_index(h, size[0]), resample.nearest_index(w, size[1])
            shape = (*x.shape[:-2], ph, pw)
            y = np.full(shape, target_fill(key), x.dtype) if padded else np.empty(shape, x.dtype)
            resample.nearest_map(x[None] if x.ndim == 2 else x, y[None] if y.ndim == 2 else y, rows, cols, top, left,
                                 flip)
        out[key] = torch.from_numpy(y)
    return out


def _pad_flip(sample: dict[str, Any], size: tuple[int, int], *, top: int, left: int, flip: bool) -> dict[str, Any]:
    """Every map padded to `size` with the image at (top, left) (image padding black, a target's
    its `target_fill`), then flipped horizontally if `flip` (the normals' x changes sign): one copy
    of each map for both, none where neither applies. `pad_sample` and `flip_sample` are this."""
    h, w = sample["image"].shape[-2:]
    ph, pw = size
    if (h, w) == (ph, pw) and not flip:
        return dict(sample)
    if h + top > ph or w + left > pw:
        raise ValueError(f"cannot pad a {h}x{w} sample to {ph}x{pw} at offset ({top}, {left})")
    if flip:
        left = pw - w - left  # the flip of a padded map is the flipped map padded mirror-wise
    out = dict(sample)
    for key in MAPS:
        if key not in sample:
            continue
        x = sample[key]
        if (h, w) == (ph, pw):
            y = x.flip(-1)
        else:
            y = x.new_full((*x.shape[:-2], ph, pw), 0.0 if key == "image" else target_fill(key))
            y[..., top : top + h, left : left + w] = x.flip(-1) if flip else x
        if flip and key == "normals":
            y[0, top : top + h, left : left + w].neg_()  # camera-frame normals: x changes sign
        out[key] = y
    return out


class MTANTrainTransform:
    """MTAN's NYUv2 augmentation, as the balancing papers train with it (lorenmt/mtan
    `im2im_pred/create_dataset.py` `RandomScaleCrop` and the flip of `NYUv2.__getitem__`, copied
    by nash-mtl and FAMO `experiments/nyuv2/data.py`): a scale s drawn from `scales`, a crop of
    int(H/s) x int(W/s) at a uniform position, resized back to H x W (image and normals bilinear
    with align_corners=True, normals not renormalised; class maps and depth nearest, depth divided
    by s), then a horizontal flip with probability `flip_prob` (normals' x negated). Invalid
    geometry is not masked: bilinear normals mix valid and invalid pixels, as theirs do.

    Args:
        scales: the scale choices (theirs: 1.0, 1.2, 1.5).
        flip_prob: probability of the flip (theirs: `torch.rand(1) < 0.5`).
    """

    def __init__(self, *, scales: Sequence[float] = (1.0, 1.2, 1.5), flip_prob: float = 0.5) -> None:
        self.scales = [float(s) for s in scales]
        if not self.scales or min(self.scales) < 1.0:
            raise ValueError(f"scales={list(scales)}: expected scale factors >= 1 (the crop is H/s x W/s)")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob={flip_prob}: expected a probability in [0, 1]")
        self.flip_prob = float(flip_prob)

    def _randint(self, lo: int, hi: int) -> int:
        """Uniform integer in [lo, hi] (their `random.randint`)."""
        return lo + int(torch.randint(0, hi - lo + 1, ()))

    def _flip_draw(self) -> float:
        return float(torch.rand(()))

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        h, w = sample["image"].shape[-2:]
        scale = self.scales[self._randint(0, len(self.scales) - 1)]
        ch, cw = int(h / scale), int(w / scale)
        top, left = self._randint(0, h - ch), self._randint(0, w - cw)
        out = dict(sample)
        for key in MAPS:
            if key not in sample:
                continue
            x = sample[key][..., top : top + ch, left : left + cw]
            if key in ("image", "normals"):
                out[key] = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=True)[0]
            else:
                out[key] = _resize_nearest(x, (h, w))
            if key == "depth":
                out[key] = out[key] / scale
        if self._flip_draw() < self.flip_prob:
            out = flip_sample(out)
        return out


def _rotate_hue(image: Tensor, shift: float) -> Tensor:
    """Hue shift by `shift` turns as a rotation of the chroma plane in YIQ space (a linear map,
    ~20x cheaper than an RGB->HSV->RGB round trip and the usual fast approximation)."""
    return torch.einsum("ij,jhw->ihw", _hue_matrix(shift).to(image.dtype), image)


def _hue_matrix(shift: float) -> Tensor:
    """(3,3) float32 RGB -> RGB map of `_rotate_hue`."""
    angle = 2.0 * math.pi * shift
    cos, sin = math.cos(angle), math.sin(angle)
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    return _FROM_YIQ @ rotate @ _TO_YIQ


class ValTransform:
    """Pad (bottom and right) to at least a fixed size with ignore/invalid values; never resizes.

    Args:
        size: [height, width]; images already larger in a dimension keep their size there (NYUD
            480x640 from the MTI-Net layout stays as it is under the InvPT 448x576 setting).
    """

    def __init__(self, *, size: Sequence[int]) -> None:
        self.size = _check_size(size, "size")

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        h, w = sample["image"].shape[-2:]
        target = (max(h, self.size[0]), max(w, self.size[1]))
        return pad_sample(sample, target) if target != (h, w) else sample


__all__ = ["MTANTrainTransform", "TrainTransform", "ValTransform", "crop_sample", "flip_sample", "pad_sample", "resize_sample"]
