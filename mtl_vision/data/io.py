"""Reading dataset files with errors that name the file (and the sample id) that is wrong.

Every loader goes through these readers, so a missing, unreadable or corrupt file always gives
the same kind of message: `<dataset> <split>/<id>: <what> (<path>)`.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class DataFileError(ValueError):
    """A dataset file is missing, unreadable, corrupt or holds values outside the contract."""


_MALLOC_TUNED = False


def keep_sample_buffers() -> bool:
    """Let this process's allocator (glibc) keep the memory of freed MB-sized arrays for the next
    sample instead of returning it to the OS; returns whether the setting took (False off glibc).

    A sample allocates and frees tens of MB (decoded maps, inflated .mat files, resized crops);
    glibc gives blocks above its mmap threshold (128 kB to 32 MB, adapting) back at once, so the
    next sample's arrays fault their pages in again: a third of a PASCAL sample's time. Called in
    each DataLoader worker (`datamodule.init_worker`) and by `mtl-bench data`; a worker's memory
    then stays at its peak, about two samples' worth.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # 32 MB is glibc's largest mmap threshold on 64-bit; trim only when 512 MB lie free at the top
    _MALLOC_TUNED = bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))
    return _MALLOC_TUNED


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
    from mtl_vision.data.decode import rgb_to_unit  # one compiled pass; numba is slow to import

    return torch.from_numpy(rgb_to_unit(array))


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MODES = {0: ("L", 1), 2: ("RGB", 3), 3: ("P", 1)}  # colour type -> (PIL mode, samples per pixel)


def decode_png(data: bytes, mode: str | None = None) -> np.ndarray | None:
    """A PNG file's pixels as `np.array(PIL.Image.open(file))` gives them, for the common case:
    8-bit grey, RGB or palette (indices), not interlaced, no transparency chunk, within PIL's
    `MAX_IMAGE_PIXELS` (PIL then refuses or warns, as ever), and `mode` None
    or the file's own; None for anything else or anything wrong (then PIL decodes it, or names
    the problem). libdeflate inflates the image data (~20x faster than zlib) and a compiled loop
    undoes the row filters: 3-5x faster than PIL on the distilled PASCAL maps."""
    try:
        import deflate
    except ImportError:
        return None
    if not data.startswith(_PNG_SIGNATURE):
        return None
    pos, header, chunks = 8, None, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        body = data[pos + 8 : pos + 8 + length]
        if len(body) != length or struct.unpack_from(">I", data, pos + 8 + length)[0] != zlib.crc32(kind + body):
            return None
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        elif kind in (b"tRNS", b"IEND"):
            if kind == b"tRNS":
                return None
            break
        pos += 12 + length
    if header is None or not chunks:
        return None
    width, height, depth, colour, _, _, interlace = header
    if depth != 8 or interlace != 0 or colour not in _PNG_MODES or width == 0 or height == 0:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and width * height > limit:
        return None  # PIL's decompression-bomb check warns or refuses it, by name
    own_mode, samples = _PNG_MODES[colour]
    if mode is not None and mode != own_mode:
        return None
    stride = width * samples
    try:
        raw = deflate.zlib_decompress(b"".join(chunks), height * (stride + 1))
    except (deflate.DeflateError, MemoryError, ValueError):
        return None
    from mtl_vision.data.decode import png_rows  # compiled; numba is slow to import

    rows = png_rows(raw, height, stride, samples)
    if rows is None:
        return None
    return rows.reshape(height, width, samples) if samples > 1 else rows


def read_pil(path: Path, *, sample: str | None = None, mode: str | None = None) -> np.ndarray:
    """An image file as a numpy array (uint8 or uint16 as stored; converted to `mode` if given);
    common PNGs through `decode_png`, the same pixels faster."""
    require_file(path, sample=sample)
    if path.suffix.lower() == ".png":
        with open(path, "rb") as f:
            pixels = decode_png(f.read(), mode)
        if pixels is not None:
            return pixels
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


_MAT_HEADER = 128  # MAT v5: 116 text + 8 subsystem offset + 2 version + 2 endian indicator ("IM": little-endian)
_MI_MATRIX, _MI_COMPRESSED = 14, 15


def inflate_mat(raw: bytes) -> bytes | None:
    """A little-endian MAT v5 file's bytes with every compressed variable (miCOMPRESSED) replaced
    by its inflated miMATRIX element, or None where the file is not one of those or libdeflate
    (the `deflate` package) is missing or refuses a stream: then scipy reads the file itself.

    libdeflate inflates the PASCAL annotations (a few MB of masks in ~10 kB) ~40x faster than
    zlib, which scipy streams through; it needs the output size, which is the inner element's
    8-byte tag plus the size that tag holds. scipy parses the result, so what `read_mat` returns
    is unchanged; a corrupt file gets scipy's own error.
    """
    try:
        import deflate
    except ImportError:
        return None
    if len(raw) < _MAT_HEADER or raw[126:128] != b"IM":
        return None
    pieces, pos = [raw[:_MAT_HEADER]], _MAT_HEADER
    while pos < len(raw):
        if pos + 8 > len(raw):
            return None
        mdtype, nbytes = struct.unpack_from("<II", raw, pos)
        body = raw[pos + 8 : pos + 8 + nbytes]
        if mdtype == _MI_MATRIX:  # stored uncompressed: as it is, with its padding to 8 bytes
            pieces.append(raw[pos : pos + 8 + nbytes + (-nbytes % 8)])
            pos += 8 + nbytes + (-nbytes % 8)
            continue
        if mdtype != _MI_COMPRESSED or len(body) != nbytes:
            return None
        try:
            inner_type, inner_bytes = struct.unpack("<II", zlib.decompressobj().decompress(body, 8))
            if inner_type != _MI_MATRIX:
                return None
            pieces.append(deflate.zlib_decompress(body, 8 + inner_bytes))
        except (zlib.error, struct.error, deflate.DeflateError, MemoryError, ValueError):
            return None
        pos += 8 + nbytes  # compressed elements are not padded
    return b"".join(pieces)


def read_mat(path: Path, *, sample: str | None = None) -> dict:
    """A MATLAB .mat file (v5) as scipy.io.loadmat's dict (inflated by libdeflate where it can)."""
    from scipy.io import loadmat  # scipy.io is slow to import; only PASCAL needs it
    from scipy.io.matlab import MatReadError

    require_file(path, sample=sample)
    try:
        with open(path, "rb") as f:
            raw = f.read()
        inflated = inflate_mat(raw)
        return loadmat(io.BytesIO(raw if inflated is None else inflated))
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
