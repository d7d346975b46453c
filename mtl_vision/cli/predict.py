"""`mtl-predict ckpt=<path> input=<image or folder> output=<folder>`: run a checkpoint on images.

See conf/predict.yaml for the files written. Each image is processed at its own size (padded to
a multiple of `pad_to`, the prediction cropped back), so any image size works.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from mtl_vision.cli import CONFIG_DIR, check_config_dir
from mtl_vision.cli.build import build_module, load_run
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
    return images


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
    for path in images:
        image = read_rgb(path)
        h, w = image.shape[-2:]
        padded = F.pad(image[None], (0, -w % pad_to, 0, -h % pad_to), mode="replicate").to(device)
        preds = module.predict_tasks(padded)
        tiles = {}
        for task in facts.tasks:
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
    log.info("predictions of %d images written to %s", len(images), out)
    return images


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def _hydra_main(cfg: DictConfig) -> None:
    predict(cfg)


def main() -> None:
    check_config_dir()
    _hydra_main()


if __name__ == "__main__":
    main()
