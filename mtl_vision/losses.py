"""Per-task losses and the multi-task loss that applies them to a task dict.

Conventions follow the dense multi-task references (MTI-Net, InvPT): cross-entropy ignoring
255 for class maps, L1 on valid depth, L1 on unit normals over valid pixels, a balanced BCE for
boundaries whose positive weight is a dataset default (0.95 PASCAL, 0.8 NYUD), BCE for saliency.
Invalid geometry (depth 0, all-zero normals) and ignore labels never contribute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtl_vision.constants import IGNORE_INDEX


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    # An all-invalid batch gives zero loss with a live graph, never NaN.
    count = mask.sum()
    return (values * mask).sum() / count.clamp(min=1)


def cross_entropy(raw: Tensor, target: Tensor) -> Tensor:
    """raw (N,C,H,W) logits, target (N,H,W) int64 with 255 = ignore."""
    if (target != IGNORE_INDEX).any():
        return F.cross_entropy(raw.float(), target, ignore_index=IGNORE_INDEX)
    return raw.sum() * 0.0


def depth_l1(raw: Tensor, target: Tensor) -> Tensor:
    """raw (N,1,H,W) metres, target (N,1,H,W) metres with 0 = invalid."""
    valid = (target > 0).float()
    return _masked_mean((raw.float() - target).abs(), valid)


def normals_loss(raw: Tensor, target: Tensor, distance: str = "l1", channels: str = "mean") -> Tensor:
    """raw (N,3,H,W) unnormalised, target (N,3,H,W) unit vectors, all-zero = invalid.

    A distance of the unit prediction to the target per valid pixel, averaged over pixels:
    `distance="l1"`, the L1 distance, whose three absolute differences `channels` combines as
    "mean" (MTI-Net's loss) or "sum" (ATRC's and InvPT's, three times larger); `distance="cosine"`,
    1 - the dot product (MTAN's and EMA-Net/CTAL's loss; `channels` unused).
    """
    if distance not in ("l1", "cosine"):
        raise ValueError(f"loss.task_kwargs.normals.distance={distance!r}: expected 'l1' or 'cosine'")
    if channels not in ("mean", "sum"):
        raise ValueError(f"loss.task_kwargs.normals.channels={channels!r}: expected 'mean' or 'sum'")
    pred = F.normalize(raw.float(), dim=1, eps=1e-6)
    valid = (target.abs().sum(dim=1, keepdim=True) > 0).float()
    if distance == "cosine":
        return 1.0 - _masked_mean((pred * target.float()).sum(dim=1, keepdim=True), valid)
    per_pixel = (pred - target).abs().sum(dim=1, keepdim=True)
    return _masked_mean(per_pixel, valid) / (3.0 if channels == "mean" else 1.0)


def balanced_bce(raw: Tensor, target: Tensor, pos_weight: float = 0.95) -> Tensor:
    """Boundary loss: BCE with weight w on boundary pixels and 1-w elsewhere, averaged over pixels.

    raw (N,1,H,W) logits, target (N,1,H,W) in {0,1}; 255 = ignore.
    """
    if not 0.0 < pos_weight < 1.0:
        raise ValueError(f"edge pos_weight must lie in (0, 1), got {pos_weight}")
    valid = (target != IGNORE_INDEX).float()
    positive = (target == 1).float()
    weight = (pos_weight * positive + (1.0 - pos_weight) * (1.0 - positive)) * valid
    per_pixel = F.binary_cross_entropy_with_logits(raw.float(), positive, reduction="none")
    return _masked_mean(per_pixel * weight, valid)


def saliency_bce(raw: Tensor, target: Tensor, balanced: bool = False) -> Tensor:
    """Saliency loss, averaged over valid pixels. raw (N,1,H,W) logits, or (N,2,H,W) logits of a
    two-class head (whose cross-entropy is the BCE of the logit difference); target (N,1,H,W) in
    {0,1}, 255 = ignore.

    `balanced` weighs salient pixels by the batch's share of background pixels and background
    pixels by the share of salient ones (ASTMT's balanced cross-entropy, used by InvPT,
    TaskPrompter and MLoRE).
    """
    if raw.shape[1] == 2:
        raw = raw[:, 1:] - raw[:, :1]
    valid = (target != IGNORE_INDEX).float()
    positive = (target == 1).float()
    per_pixel = F.binary_cross_entropy_with_logits(raw.float(), positive, reduction="none")
    if balanced:
        negative_share = ((1.0 - positive) * valid).sum() / valid.sum().clamp(min=1)
        per_pixel = per_pixel * (negative_share * positive + (1.0 - negative_share) * (1.0 - positive))
    return _masked_mean(per_pixel, valid)


class MultiTaskLoss(nn.Module):
    """Applies each task's registered loss to a prediction dict, deep supervision included.

    Args:
        tasks: task names, in order.
        task_kwargs: extra keyword arguments of a task's loss, e.g. `{"edge": {"pos_weight": 0.8}}`;
            entries for tasks that are not trained are ignored.
        aux_weight: weight of every auxiliary (intermediate) prediction's loss, see below.
        aux_weights: per aux-set weights overriding `aux_weight`, e.g. `{"initial": 0.5}`.

    A decoder may return `"aux": {name: {task: map}}` beside the final predictions (PAD-Net's
    initial predictions, MTI-Net's per-scale ones, ...). Each aux map is scored with its task's
    loss and added, weighted, to that task's loss: the balancer then sees one loss per task, as
    the papers' total "final + Σ auxiliary" losses are grouped per task. A task without a final
    prediction (the decoder's `auxiliary_tasks`) is scored by its weighted aux predictions alone.
    The unweighted parts are kept in `last_aux` ({"<task>/<name>": loss}) for logging.
    """

    def __init__(
        self,
        *,
        tasks: Sequence[str],
        task_kwargs: Mapping[str, Mapping[str, float]] | None = None,
        aux_weight: float = 1.0,
        aux_weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        from mtl_vision.tasks import check_tasks, get_task  # tasks.py imports this module

        self.tasks = check_tasks(tasks, where="MultiTaskLoss")
        self._fns = {t: get_task(t).loss for t in self.tasks}
        self.task_kwargs = {t: dict((task_kwargs or {}).get(t, {})) for t in self.tasks}
        self.aux_weight = float(aux_weight)
        self.aux_weights = {k: float(v) for k, v in (aux_weights or {}).items()}
        self.last_aux: dict[str, Tensor] = {}

    def _one(self, task: str, pred: Tensor, target: Tensor, what: str) -> Tensor:
        if pred.shape[-2:] != target.shape[-2:]:
            raise ValueError(
                f"{what}: prediction size {tuple(pred.shape[-2:])} != target size {tuple(target.shape[-2:])}"
            )
        return self._fns[task](pred, target, **self.task_kwargs[task])

    def forward(self, preds: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """preds: raw outputs at target resolution (and optional "aux"); returns {task: scalar loss}."""
        aux = preds.get("aux") or {}
        weighted = {t for name, maps in aux.items() if self.aux_weights.get(name, self.aux_weight) for t in maps}
        missing = [t for t in self.tasks if t not in targets or (t not in preds and t not in weighted)]
        if missing:
            raise ValueError(
                f"MultiTaskLoss: tasks {missing} missing from the targets, or from both the final predictions and "
                "the weighted aux predictions"
            )
        out = {task: self._one(task, preds[task], targets[task], f"task {task!r}") for task in self.tasks if task in preds}
        self.last_aux = {}
        for name, maps in aux.items():
            weight = self.aux_weights.get(name, self.aux_weight)
            unknown = [t for t in maps if t not in self.tasks]
            if unknown:
                raise ValueError(f"aux predictions {name!r} have tasks {unknown} that are not trained ({self.tasks})")
            for task, pred in maps.items():
                value = self._one(task, pred, targets[task], f"aux {name!r} of task {task!r}")
                self.last_aux[f"{task}/{name}"] = value.detach()
                if weight:
                    out[task] = out[task] + weight * value if task in out else weight * value
        return {task: out[task] for task in self.tasks}
