"""Prediction pictures of a fixed set of validation images, drawn at validation.

One PNG per image: one row per task, columns image | target | prediction, each with a label strip
above it, colour-mapped by the task's `colorize` (class palettes, depth ramp, normals as RGB,
boundaries and saliency as heat maps). Target and prediction are colour-mapped together, so a
depth prediction shares its target's scale. Pixels without ground truth (ignore 255, padding,
invalid depth or normals) are white in the target tile.

Files: `<dirpath>/epoch<EEE>_step<SSSSSS>/<index>.png` (`index` = position in the validation
set); the same grids go to every logger that takes images (wandb, TensorBoard).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.precision import Precision
from PIL import Image, ImageDraw
from torch import Tensor

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.transforms import GEOMETRY
from mtl_vision.tasks import get_task

log = logging.getLogger(__name__)

GAP = 4  # white pixels between tiles
LABEL_HEIGHT = 14  # label strip above every tile
COLUMNS = ("image", "target", "prediction")


def to_uint8(rgb: Tensor) -> np.ndarray:
    """(3,H,W) float in [0,1] -> (H,W,3) uint8."""
    return np.ascontiguousarray((rgb.float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())


def tile_grid(
    rows: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]] | None = None, *, gap: int = GAP
) -> Image.Image:
    """Equal-sized (H,W,3) uint8 tiles in rows and columns on white, with a text strip of
    `LABEL_HEIGHT` pixels above every tile when `labels` (same nesting as `rows`) are given.
    Size: (len(rows) * (H + label) + (len(rows) - 1) * gap) x (C * W + (C - 1) * gap)."""
    if not rows or not rows[0]:
        raise ValueError("tile_grid: no tiles")
    h, w = rows[0][0].shape[:2]
    columns = max(len(r) for r in rows)
    for tile in (t for r in rows for t in r):
        if tile.shape != (h, w, 3):
            raise ValueError(f"tile_grid: tiles must all be ({h}, {w}, 3) uint8, got {tile.shape}")
    label_h = LABEL_HEIGHT if labels is not None else 0
    canvas = Image.new(
        "RGB", (columns * w + (columns - 1) * gap, len(rows) * (h + label_h) + (len(rows) - 1) * gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = r * (h + label_h + gap)
        for c, tile in enumerate(row):
            x = c * (w + gap)
            canvas.paste(Image.fromarray(tile), (x, y + label_h))
            if labels is not None:
                draw.text((x + 2, y + 1), labels[r][c], fill="black")
    return canvas


def _invalid(task: str, target: Tensor) -> Tensor:
    """(H,W) bool: pixels without ground truth (the value padding writes; see data.transforms)."""
    fill = 0.0 if task in GEOMETRY else IGNORE_INDEX
    return (target == fill).all(dim=0) if target.dim() == 3 else target == fill


def task_tiles(task: str, image: Tensor, target: Tensor, pred: Tensor) -> list[np.ndarray]:
    """[image, target, prediction] (H,W,3) uint8 tiles of one task for one image.

    Args:
        image: (3,H,W) in [0,1]; target: as the dataset gives it ((H,W) or (C,H,W));
        pred: the activated prediction (`TaskSpec.activate`) with the same shape as `target`.
    """
    if pred.shape[-2:] != target.shape[-2:]:  # targets at the image's own size (MTINetValTransform targets="original")
        size = tuple(target.shape[-2:])
        image = torch.nn.functional.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        pred = torch.nn.functional.interpolate(pred.reshape(1, -1, *pred.shape[-2:]).float(), size=size, mode="nearest")
        pred = pred.reshape(*pred.shape[1:-2], *size) if target.dim() == 3 else pred[0, 0]
    target, pred = target.cpu(), pred.cpu().to(target.dtype)
    width = target.shape[-1]
    # side by side through one colorize call: value ranges (depth) are shared by both tiles
    both = get_task(task).colorize(torch.cat([target, pred], dim=-1)[None])[0]
    target_rgb, pred_rgb = both[..., :width], both[..., width:]
    target_rgb = target_rgb.masked_fill(_invalid(task, target), 1.0)
    return [to_uint8(image), to_uint8(target_rgb), to_uint8(pred_rgb)]


class ValidationPictures(L.Callback):
    """Draws the first `num_images` validation images (by index: the same ones every time) with
    every task's target and prediction, on global rank 0, after validation.

    Args:
        dirpath: folder of the PNGs (`<run dir>/pictures`).
        num_images: how many images of the validation set, from index 0.
        every_n_validations: draw at every n-th validation (sanity checks do not count).
        log_key: key of the pictures in loggers that take images (wandb, TensorBoard).
    """

    def __init__(
        self,
        *,
        dirpath: str | os.PathLike,
        num_images: int = 4,
        every_n_validations: int = 1,
        log_key: str = "val/pictures",
    ) -> None:
        if num_images < 1:
            raise ValueError(f"ValidationPictures: num_images must be >= 1, got {num_images}")
        if every_n_validations < 1:
            raise ValueError(f"ValidationPictures: every_n_validations must be >= 1, got {every_n_validations}")
        self.dirpath = Path(dirpath)
        self.num_images = num_images
        self.every_n_validations = every_n_validations
        self.log_key = log_key
        self._samples: list[tuple[int, Mapping[str, Any]]] | None = None
        self._validations = 0

    def _fixed_samples(self, trainer: L.Trainer) -> list[tuple[int, Mapping[str, Any]]]:
        if self._samples is None:
            dataset = getattr(trainer.datamodule, "val_set", None)
            if dataset is None:
                loaders = trainer.val_dataloaders
                loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
                dataset = getattr(loader, "dataset", None)
            if dataset is None or not hasattr(dataset, "__len__"):
                log.warning(
                    "ValidationPictures: no indexable validation set (trainer.datamodule.val_set or the validation "
                    "dataloader's dataset); no pictures are drawn"
                )
                self._samples = []
            else:
                self._samples = [(i, dataset[i]) for i in range(min(self.num_images, len(dataset)))]
        return self._samples

    @torch.no_grad()
    def draw(
        self, pl_module: L.LightningModule, sample: Mapping[str, Any], precision: Precision | None = None
    ) -> Image.Image:
        """The grid of one sample: a row per task of `pl_module.eval_tasks`, columns `COLUMNS`. `precision`:
        the trainer's precision plugin (autocast under mixed precision, input dtype under true half)."""
        precision = precision or Precision()
        image = sample["image"]
        with precision.forward_context():
            preds = pl_module.predict_tasks(precision.convert_input(image[None].to(pl_module.device)))
        rows = [task_tiles(task, image, sample[task], preds[task][0]) for task in pl_module.eval_tasks]
        labels = [[task, *COLUMNS[1:]] for task in pl_module.eval_tasks]
        return tile_grid(rows, labels)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._validations += 1
        if (self._validations - 1) % self.every_n_validations:
            return
        samples = self._fixed_samples(trainer)
        if not samples:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            grids = [self.draw(pl_module, sample, trainer.precision_plugin) for _, sample in samples]
        finally:
            pl_module.train(was_training)
        folder = self.dirpath / f"epoch{trainer.current_epoch:03d}_step{trainer.global_step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for (index, _), grid in zip(samples, grids):
            grid.save(folder / f"{index:04d}.png")
        captions = [f"val[{index}]" for index, _ in samples]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=self.log_key, images=grids, step=trainer.global_step, caption=captions)
            elif isinstance(logger, TensorBoardLogger):
                for caption, grid in zip(captions, grids):
                    logger.experiment.add_image(
                        f"{self.log_key}/{caption}", np.asarray(grid), trainer.global_step, dataformats="HWC"
                    )
