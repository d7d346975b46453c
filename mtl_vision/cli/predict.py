"""`mtl-predict ckpt=<path> input=<image or folder> output=<folder>`: run a checkpoint on images.

See conf/predict.yaml for the files written. Each image is processed at its own size (padded to
a multiple of `pad_to`, the prediction cropped back), so any image size works; `max_side`
downscales larger images first. An unreadable image is skipped and listed at the end (and in
`<output>/skipped.txt`); two inputs that would write the same output names are refused.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from mtl_vision.cli import CONFIG_DIR, check_config_dir, exit_with_one_line, one_line, user_errors
from mtl_vision.cli.build import build_module, load_run
from mtl_vision.cli.overrides import check_overrides
from mtl_vision.data.io import read_rgb
from mtl_vision.engine.pictures import tile_grid, to_uint8
from mtl_vision.tasks import get_task

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path: str | Path) -> list[Path]:
    """The image files of a folder (sorted, not recursive) or the one image `path` names."""
    path = Path(path)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"input={str(path)!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input={str(path)!r}: no such image or folder")
    images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"input={str(path)!r}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
    clashes = defaultdict(list)
    for image in images:
        clashes[image.stem].append(image.name)
    clashes = {stem: names for stem, names in clashes.items() if len(names) > 1}
    if clashes:
        shown = "; ".join(" and ".join(names) for names in clashes.values())
        raise ValueError(
            f"input={str(path)!r}: {shown} would write the same output files (named by the file stem); "
            "rename one of each, or predict them into different output folders"
        )
    return images


# a side above this without max_side gets a warning: time and memory grow with the pixel count
LARGE_SIDE = 4096


def load_image(path: Path, max_side: int | None) -> torch.Tensor:
    """(3,H,W) in [0,1], downscaled (antialiased) so that its longer side is at most `max_side`."""
    image = read_rgb(path)
    h, w = image.shape[-2:]
    if max_side is not None and max(h, w) > max_side:
        scale = max_side / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
        log.info("%s: %dx%d downscaled to %dx%d (max_side=%d)", path.name, w, h, size[1], size[0], max_side)
    elif max(h, w) > LARGE_SIDE:
        log.warning("%s is %dx%d: slow and memory-hungry at full size; max_side=%d would downscale it",
                    path.name, w, h, LARGE_SIDE)  # fmt: skip
    return image


def _raw(task: str, pred: torch.Tensor) -> np.ndarray:
    """One image's activated prediction (C,H,W) or (H,W) as the array written to .npy."""
    spec = get_task(task)
    if spec.is_classification:
        return pred.to(torch.uint8 if int(pred.max()) < 256 else torch.int32).cpu().numpy()
    array = pred.float().cpu().numpy()
    if array.ndim == 3 and array.shape[0] == 3:
        return array.transpose(1, 2, 0)  # normals as HxWx3, as the datasets store them
    return array[0] if array.ndim == 3 else array


@torch.inference_mode()
def predict(cfg: DictConfig) -> list[Path]:
    """Write the predictions of `cfg.ckpt` for every image of `cfg.input` into `cfg.output`."""
    images = list_images(cfg.input)
    run_cfg, facts, state = load_run(cfg.ckpt)
    module = build_module(run_cfg, facts)
    module.load_state_dict(state)
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    module = module.to(device).eval()
    out = Path(cfg.output)
    pad_to = int(cfg.pad_to)
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    max_side = cfg.get("max_side")
    if max_side is not None and int(max_side) < 1:
        raise ValueError(f"max_side must be >= 1 or null, got {max_side}")
    skipped: list[str] = []
    done: list[Path] = []
    for path in images:
        try:
            image = load_image(path, int(max_side) if max_side is not None else None)
        except Exception as err:  # a corrupt file or a decompression bomb: skip it, keep the rest
            log.warning("skipped %s: %s", path, one_line(err))
            skipped.append(f"{path}: {one_line(err)}")
            continue
        done.append(path)
        h, w = image.shape[-2:]
        padded = F.pad(image[None], (0, -w % pad_to, 0, -h % pad_to), mode="replicate").to(device)
        preds = module.predict_tasks(padded)
        tiles = {}
        for task in module.eval_tasks:
            pred = preds[task][0, ..., :h, :w]
            color = to_uint8(get_task(task).colorize(pred[None])[0])
            tiles[task] = color
            for kind, suffix in (("color", ".png"), ("raw", ".npy")):
                (out / kind / task).mkdir(parents=True, exist_ok=True)
            Image.fromarray(color).save(out / "color" / task / f"{path.stem}.png")
            np.save(out / "raw" / task / f"{path.stem}.npy", _raw(task, pred))
            if task == "edge":
                (out / "edge").mkdir(exist_ok=True)
                edge8 = (pred.float().clamp(0, 1) * 255).round().byte().reshape(h, w).cpu().numpy()
                Image.fromarray(edge8).save(out / "edge" / f"{path.stem}.png")
        (out / "panels").mkdir(parents=True, exist_ok=True)
        # image | one colour map per task, each with its name above
        tile_grid([[to_uint8(image), *tiles.values()]], [["image", *tiles]]).save(out / "panels" / f"{path.stem}.png")
    if skipped:
        out.mkdir(parents=True, exist_ok=True)
        (out / "skipped.txt").write_text("\n".join(skipped) + "\n")
        log.warning("skipped %d unreadable image(s), listed in %s:\n  %s", len(skipped), out / "skipped.txt",
                    "\n  ".join(skipped))  # fmt: skip
        if not done:
            raise ValueError(f"input={str(cfg.input)!r}: none of the {len(images)} images could be read")
    log.info("predictions of %d images written to %s", len(done), out)
    return done


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        predict(cfg)
    except user_errors() as err:
        exit_with_one_line(err)


def main() -> None:
    check_config_dir()
    check_overrides("predict", sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
