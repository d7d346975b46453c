"""The task registry: the one place a dense prediction task is defined.

A `TaskSpec` says how many channels a head predicts, how its raw output is turned into a
prediction, which loss trains it, which metrics evaluate it, which metric is primary (for
checkpoint selection and the multi-task delta) and how it is drawn. Datasets, decoders, losses,
metrics and pictures all read `TASKS`; adding a task touches this file plus its metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mtl_vision import losses, viz
from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.metrics import (
    DepthMetrics,
    EdgeApproxMetrics,
    NormalMetrics,
    SaliencyMetrics,
    SegmentationMetrics,
)


@dataclass(frozen=True)
class TaskSpec:
    """Everything the framework knows about one task.

    Args:
        name: registry key, also the key of the task in every task dict.
        channels: output channels of the head; None means one channel per class, the number
            of classes being given by the dataset (40 NYUD classes, 21 PASCAL classes, ...).
        loss: `loss(raw (N,C,H,W), target, **kwargs) -> scalar`, targets as in DESIGN.md.
        metric: builds the torchmetrics `Metric` for this task from the dataset's facts.
        primary: key of the primary metric (as logged under `val/<task>/<key>`).
        lower_is_better: direction of the primary metric.
        activate: raw head output -> prediction in target units (labels, metres, unit vectors,
            probabilities); what metrics and pictures consume.
        colorize: prediction or target -> (N,3,H,W) float RGB in [0,1] for pictures.
        is_classification: target is an (N,H,W) class map with ignore value 255.
    """

    name: str
    channels: int | None
    loss: Callable[..., Tensor]
    metric: Callable[..., Metric]
    primary: str
    lower_is_better: bool
    activate: Callable[[Tensor], Tensor]
    colorize: Callable[[Tensor], Tensor]
    is_classification: bool = False

    def out_channels(self, num_classes: int | None = None) -> int:
        if self.channels is not None:
            return self.channels
        if num_classes is None or num_classes < 1:
            raise ValueError(f"task {self.name!r} needs the dataset's number of classes, got {num_classes!r}")
        return num_classes


def _argmax(raw: Tensor) -> Tensor:
    return raw.argmax(dim=1)


def _unit(raw: Tensor) -> Tensor:
    return F.normalize(raw.float(), dim=1, eps=1e-6)


def _identity(raw: Tensor) -> Tensor:
    return raw.float()


def _sigmoid(raw: Tensor) -> Tensor:
    return torch.sigmoid(raw.float())


def _segmentation(name: str) -> TaskSpec:
    return TaskSpec(
        name=name,
        channels=None,
        loss=losses.cross_entropy,
        metric=lambda *, num_classes, class_names=None, **_: SegmentationMetrics(
            num_classes=num_classes, ignore_index=IGNORE_INDEX, class_names=class_names
        ),
        primary="mIoU",
        lower_is_better=False,
        activate=_argmax,
        colorize=viz.colorize_labels,
        is_classification=True,
    )


TASKS: dict[str, TaskSpec] = {
    "semseg": _segmentation("semseg"),
    "human_parts": _segmentation("human_parts"),
    "depth": TaskSpec(
        name="depth",
        channels=1,
        loss=losses.depth_l1,
        metric=lambda **_: DepthMetrics(),
        primary="rmse",
        lower_is_better=True,
        activate=_identity,
        colorize=viz.colorize_depth,
    ),
    "normals": TaskSpec(
        name="normals",
        channels=3,
        loss=losses.normals_l1,
        metric=lambda **_: NormalMetrics(),
        primary="mean",
        lower_is_better=True,
        activate=_unit,
        colorize=viz.colorize_normals,
    ),
    "edge": TaskSpec(
        name="edge",
        channels=1,
        loss=losses.balanced_bce,
        # Exact BSDS odsF needs thinning and one-to-one matching over the split; until that
        # evaluator exists the logged edge metric is the cheap tolerance-dilation estimate,
        # named as such so it is never mistaken for the published number.
        metric=lambda *, edge_tolerance, **_: EdgeApproxMetrics(tolerance=edge_tolerance),
        primary="odsF_approx",
        lower_is_better=False,
        activate=_sigmoid,
        colorize=viz.colorize_heat,
    ),
    "saliency": TaskSpec(
        name="saliency",
        channels=1,
        loss=losses.bce,
        metric=lambda **_: SaliencyMetrics(),
        primary="maxF",
        lower_is_better=False,
        activate=_sigmoid,
        colorize=viz.colorize_heat,
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}") from None


def check_tasks(names: Sequence[str], *, where: str) -> list[str]:
    """Validate a task list from config: known names, no duplicates, not empty."""
    names = list(names)
    if not names:
        raise ValueError(f"{where}: the task list is empty")
    for name in names:
        get_task(name)
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: duplicated task in {names}")
    return names


def check_task_keys(values: dict, tasks: Sequence[str], *, what: str) -> None:
    """Raise when a task dict does not have exactly the expected task keys."""
    missing = [t for t in tasks if t not in values]
    extra = [k for k in values if k not in tasks]
    if missing or extra:
        raise ValueError(f"{what}: expected keys {list(tasks)}, missing {missing}, unexpected {extra}")
