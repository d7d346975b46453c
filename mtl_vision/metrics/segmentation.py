"""Semantic segmentation / human-parts metric: split-level confusion matrix -> mIoU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import _check_num_classes, _confusion_matrix_update, _miou_compute

__all__ = ["SegmentationMetrics"]


class SegmentationMetrics(Metric):
    """mIoU, pixel accuracy and per-class IoU (percent) over a whole split.

    The state is one (C, C) int64 confusion matrix (rows = target, columns = prediction),
    summed over batches and over processes, so IoU_c = TP / (TP + FP + FN) is computed once
    on the split, never averaged per batch. A class absent from both target and prediction
    gets IoU 0 and counts in the mean (MTI-Net / InvPT ``SemsegMeter`` protocol).

    Args:
        num_classes: number of classes C (ids 0..C-1).
        ignore_index: target label of pixels to skip.
        class_names: optional C names for the ``IoU/<name>`` keys (default: ``str(c)``).

    ``update(pred, target)``: ``pred`` are predicted class ids (already arg-maxed), (N, H, W) or
    (N, 1, H, W), integer dtype; ``target`` the same shape. ``compute()`` returns
    ``{"mIoU", "pixel_acc", "IoU/<name>"...}`` as scalar tensors.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_num_classes(num_classes, class_names)
        if not isinstance(ignore_index, int):
            raise ValueError(f"Expected `ignore_index` to be an int, got {ignore_index!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        # int64: a split of 1e3 images x 1e6 pixels overflows neither int64 nor loses counts like float32
        self.add_state(
            "confmat", default=torch.zeros(num_classes, num_classes, dtype=torch.int64), dist_reduce_fx="sum"
        )

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predicted labels ``pred`` (N, H, W) and targets (N, H, W)."""
        self.confmat += _confusion_matrix_update(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Tensor]:
        """Split-level mIoU / pixel_acc / per-class IoU in percent."""
        return _miou_compute(self.confmat, self.class_names)
