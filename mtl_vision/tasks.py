"""The task registry: the one place a dense prediction task is defined.

A `TaskSpec` says how many channels a head predicts, how its raw output is turned into a
prediction, which loss trains it, which metrics evaluate it, which metric is primary (for
checkpoint selection and the multi-task delta) and how it is drawn. Datasets, decoders, losses,
metrics and pictures all read `TASKS`; adding a task touches this file plus its metric.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from mtl_vision import losses, viz
from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.errors import closest
from mtl_vision.metrics import (
    DepthMetrics,
    EdgeApproxMetrics,
    NormalMetrics,
    SaliencyMetrics,
    SegmentationMetrics,
)
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL


@dataclass(frozen=True)
class TaskSpec:
    """Everything the framework knows about one task.

    Args:
        name: registry key, also the key of the task in every task dict.
        channels: output channels of the head; None means one channel per class, the number
            of classes being given by the dataset (40 NYUD classes, 21 PASCAL classes, ...).
        loss: `loss(raw (N,C,H,W), target, **kwargs) -> scalar`, targets as in DESIGN.md.
        metric: builds the torchmetrics `Metric` for this task from the dataset's facts and the
            evaluation `protocol` (`eval.protocol`, mtl_vision/metrics/protocols.py).
        primary: key of the primary metric (as logged under `val/<task>/<key>`), the one the
            papers' tables and the multi-task delta use.
        lower_is_better: direction of the primary metric.
        proxy: key of a cheaper stand-in for the primary, logged during training where the
            primary itself is too costly (edge: `odsF_approx` instead of the exact BSDS `odsF`);
            used for selection when the primary was not computed, never mixed with it.
        lower_is_better_keys: metric keys of this task where lower is better (the others are
            higher-is-better); the LibMTL multi-task delta averages over all of them.
        activate: raw head output -> prediction in target units (labels, metres, unit vectors,
            probabilities); what metrics and pictures consume.
        colorize: prediction or target -> (N,3,H,W) float RGB in [0,1] for pictures.
        is_classification: target is an (N,H,W) class map with ignore value 255.
        other_channels: head widths accepted besides `channels` (saliency: 2, the two-class
            softmax head of InvPT, TaskPrompter and MLoRE), chosen by `data.head_channels`.
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
    proxy: str | None = None
    lower_is_better_keys: frozenset[str] = frozenset()
    other_channels: frozenset[int] = frozenset()

    @property
    def selection_key(self) -> str:
        """The key that training-time validation logs for this task: the proxy if there is one."""
        return self.proxy or self.primary

    def primary_in(self, keys) -> str | None:
        """The primary key if it is in `keys`, else the proxy if it is, else None."""
        for key in (self.primary, self.proxy):
            if key is not None and key in keys:
                return key
        return None

    def out_channels(self, num_classes: int | None = None, *, requested: int | None = None) -> int:
        if requested is not None:
            allowed = ({self.channels} if self.channels is not None else set()) | set(self.other_channels)
            if requested not in allowed:
                raise ValueError(
                    f"data.head_channels.{self.name}={requested}: a {self.name} head has "
                    f"{' or '.join(map(str, sorted(allowed))) or 'one channel per class'} channels"
                )
            return requested
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


def _foreground_probability(raw: Tensor) -> Tensor:
    """(N,1,H,W) probability of the positive class: sigmoid of one logit, or the softmax of a
    two-class head taken at class 1."""
    if raw.shape[1] == 2:
        return torch.softmax(raw.float(), dim=1)[:, 1:]
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


def _edge_metric(*, edge_tolerance: float, edge_exact: bool = False, **_) -> Metric:
    approx = EdgeApproxMetrics(tolerance=edge_tolerance)
    if not edge_exact:
        return approx
    from mtl_vision.metrics.edge import EdgeMetrics

    return MetricCollection(
        {"approx": approx, "exact": EdgeMetrics(max_dist=edge_tolerance)},
        compute_groups=False,
    )


TASKS: dict[str, TaskSpec] = {
    "semseg": _segmentation("semseg"),
    "human_parts": _segmentation("human_parts"),
    "depth": TaskSpec(
        name="depth",
        channels=1,
        loss=losses.depth_l1,
        metric=lambda *, protocol=DEFAULT_PROTOCOL, **_: DepthMetrics(protocol=protocol),
        primary="rmse",
        lower_is_better=True,
        lower_is_better_keys=frozenset({"rmse", "abs_err", "abs_rel", "log_rmse", "sq_rel"}),
        activate=_identity,
        colorize=viz.colorize_depth,
    ),
    "normals": TaskSpec(
        name="normals",
        channels=3,
        loss=losses.normals_loss,
        metric=lambda *, protocol=DEFAULT_PROTOCOL, **_: NormalMetrics(protocol=protocol),
        primary="mean",
        lower_is_better=True,
        lower_is_better_keys=frozenset({"mean", "median", "rmse"}),
        activate=_unit,
        colorize=viz.colorize_normals,
    ),
    "edge": TaskSpec(
        name="edge",
        channels=1,
        loss=losses.balanced_bce,
        # The exact BSDS benchmark (thinning, one-to-one matching) costs about a second per image,
        # so training validation logs the cheap tolerance-dilation estimate under its own name;
        # `mtl-eval` (edge_exact=true) computes both.
        metric=_edge_metric,
        primary="odsF",
        lower_is_better=False,
        proxy="odsF_approx",
        activate=_sigmoid,
        colorize=viz.colorize_heat,
    ),
    "saliency": TaskSpec(
        name="saliency",
        channels=1,
        loss=losses.saliency_bce,
        metric=lambda *, protocol=DEFAULT_PROTOCOL, **_: SaliencyMetrics(protocol=protocol),
        primary="maxF",
        lower_is_better=False,
        activate=_foreground_probability,
        colorize=viz.colorize_heat,
        other_channels=frozenset({2}),
    ),
}


def get_task(name: str) -> TaskSpec:
    """Look a task up, with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        close = closest(name, TASKS)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}{hint} (known tasks: {sorted(TASKS)})") from None


def check_tasks(names: Sequence[str], *, where: str) -> list[str]:
    """Validate a task list from config: known names, no duplicates, not empty."""
    if isinstance(names, str):
        raise ValueError(f"{where}={names!r} must be a list of tasks, e.g. {where}=[{names}]")
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
