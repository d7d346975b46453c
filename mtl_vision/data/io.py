"""Reading dataset files with errors that name the file (and the sample id) that is wrong.

Every loader goes through these readers, so a missing, unreadable or corrupt file always gives
the same kind of message: `<dataset> <split>/<id>: <what> (<path>)`.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataFileError(ValueError):
    """A dataset file is missing, unreadable, corrupt or holds values outside the contract."""


def _where(path: Path, sample: str | None) -> str:
    return f"{sample}: {path}" if sample else str(path)


def sample_index(index: int, count: int, split: str) -> int:
    """A dataset index in [-count, count) as a non-negative int; IndexError names the split."""
    if not -count <= index < count:
        raise IndexError(f"index {index} out of range for {count} {split!r} samples")
    return int(index) % count


def require_file(path: Path, *, sample: str | None = None) -> Path:
    if not path.is_file():
        raise DataFileError(f"missing file for {_where(path, sample)}")
    return path


def read_rgb(path: Path, *, sample: str | None = None) -> torch.Tensor:
    """JPEG/PNG image -> float32 (3,H,W) RGB in [0,1]."""
    array = read_pil(path, sample=sample, mode="RGB")
    # numpy's transpose + cast is ~3x faster than torch's permute().float() on one thread.
    return torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32)).div_(255.0)


def read_pil(path: Path, *, sample: str | None = None, mode: str | None = None) -> np.ndarray:
    """An image file as a numpy array (uint8 or uint16 as stored; converted to `mode` if given)."""
    require_file(path, sample=sample)
    try:
        with Image.open(path) as img:
            img.load()
            if mode is not None and img.mode != mode:
                img = img.convert(mode)
            return np.array(img)
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataFileError(f"unreadable or corrupt image for {_where(path, sample)}: {err}") from err


def read_npy(path: Path, *, sample: str | None = None) -> np.ndarray:
    require_file(path, sample=sample)
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise DataFileError(f"unreadable or corrupt .npy for {_where(path, sample)}: {err}") from err


def read_mat(path: Path, *, sample: str | None = None) -> dict:
    """A MATLAB .mat file (v5) as scipy.io.loadmat's dict."""
    from scipy.io import loadmat  # scipy.io is slow to import; only PASCAL needs it
    from scipy.io.matlab import MatReadError

    require_file(path, sample=sample)
    try:
        return loadmat(str(path))
    except (ValueError, OSError, TypeError, NotImplementedError, MatReadError, zlib.error) as err:
        raise DataFileError(f"unreadable or corrupt .mat for {_where(path, sample)}: {err}") from err


def read_ids(path: Path) -> list[str]:
    """A split file: one sample id per line (blank lines ignored)."""
    require_file(path)
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DataFileError(f"split file {path} lists no sample ids")
    return ids


def check_size(name: str, array_hw: tuple[int, int], image_hw: tuple[int, int], *, path: Path, sample: str) -> None:
    if tuple(array_hw) != tuple(image_hw):
        raise DataFileError(
            f"{sample}: {name} size {tuple(array_hw)} (HxW) does not match the image size {tuple(image_hw)} ({path})"
        )


def check_labels(labels: np.ndarray, num_classes: int, *, path: Path, sample: str, ignore: int = 255) -> None:
    bad = (labels != ignore) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        value = int(labels[bad].flat[0])
        raise DataFileError(f"{sample}: label value {value} outside [0, {num_classes}) or {ignore} in {path}")


def count_present(load: Callable[[int], dict], count: int, tasks: Sequence[str]) -> dict[str, int]:
    """Read samples 0..count-1 with `load` (raising the first error); {"samples": count, <task>:
    samples that have the task's map}: the counts `check()` of a dataset whose every read file is
    supervision (NYUD, Cityscapes) returns, the keys `mtl-data check` prints."""
    counts = dict.fromkeys(["samples", *tasks], 0)
    for index in range(count):
        sample = load(index)
        counts["samples"] += 1
        for task in tasks:
            counts[task] += task in sample
    return counts
