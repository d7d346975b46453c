"""Saliency metrics under the named evaluation protocols (``protocols.py``): ATRC's maxF from
split-level counts, InvPT's pipeline, MTI-Net's per-image scores of the uint8-stored maps."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import (
    MTINET_SALIENCY_THRESHOLDS,
    SALIENCY_NUM_THRESHOLDS,
    _saliency_compute,
    _saliency_per_image_compute,
    _saliency_per_image_update,
    _saliency_sigmoid_prob_update,
    _saliency_update,
)
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, check_protocol

__all__ = ["SaliencyMetrics"]


class SaliencyMetrics(Metric):
    """Saliency scores (percent) of a split under an evaluation protocol.

    Every protocol reports ``maxF``, ATRC's (brdav/atrc ``src/data/metrics.py: MaxF``): int64
    true-positive and predicted-positive counts per threshold 0.05, 0.10, ..., 0.95 (salient =
    ``prob >= t``) and the ground-truth positive count, summed over the split; then
    F_beta = (1 + 0.3) P R / (0.3 P + R), maximised over the thresholds. ATRC accumulates the
    counts in float32, which stops being exact past 2^24 pixels; ours are exact.

    ``protocol="invpt"`` adds ``maxF_sigmoid_prob`` (InvPT, TaskPrompter, MLoRE:
    ``utils/utils.py: get_output`` then ``evaluation/eval_sal.py: SaliencyMeter``, threshold step
    0.05, beta^2 = 0.3): the same pooled maxF, but the thresholds are applied to sigmoid(prob),
    because their meter squashes what it receives, a probability already. sigmoid(prob) lies in
    [0.5, 0.73], so thresholds up to 0.5 mark every pixel salient, 0.55..0.70 act (in exact
    arithmetic) like thresholds of about 0.20, 0.41, 0.62, 0.85 on the probability, and 0.75
    and above mark none. This is the maxF their code reports; it is not comparable with ``maxF``. InvPT
    itself returns a fraction, TaskPrompter and MLoRE percent; here it is percent.

    ``protocol="mtinet"`` adds MTI-Net's scores (SimonVandenhende/Multi-Task-Learning-PyTorch
    ``evaluation/eval_sal.py: eval_sal`` on the maps ``save_model_predictions`` writes): the
    probability is stored as uint8 (``floor(255 p)``), read back as ``q / 255`` and thresholded
    with a strict ``>`` at the 15 values ``np.linspace(0.2, 0.9, 15)``. Per image and threshold
    it takes IoU, precision and recall (``jaccard.py``); these are averaged over the images, and
    ``max_mIoU_per_image`` is the best mean IoU over the thresholds (MTI-Net's saliency
    ``mIoU``, its primary), ``maxF1_per_image`` the best F1 (beta^2 = 1) of the mean precision
    and mean recall (MTI-Net's ``maxF``). The states are per-threshold float64 sums over images.

    Args:
        protocol: ``atrc`` (default), ``invpt``, ``mtinet`` or ``mtlora`` (both additions, the
            per-image scores of the float probability instead of the uint8-stored one).

    ``update(pred, target)``: ``pred`` are probabilities (after the task's activation), (N, H, W)
    or (N, 1, H, W), or uint8 maps as MTI-Net stores them (``255 p``, e.g. brought back to each
    image's own size by validation, ``engine.module``): these are read as ``q / 255`` and, by the
    per-image scores, as stored, not quantised again; ``target`` binary (salient where > 0.5),
    255 = ignored (left out of every count; an image with nothing else is not counted by the
    per-image scores).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    true_pos: Tensor
    pred_pos: Tensor
    gt_pos: Tensor

    def __init__(self, protocol: str = DEFAULT_PROTOCOL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.protocol = check_protocol(protocol, where="protocol")
        counts = ["true_pos", "pred_pos"]
        if self.protocol in ("invpt", "mtlora"):
            counts += ["sigmoid_true_pos", "sigmoid_pred_pos"]
        for name in counts:
            self.add_state(name, default=torch.zeros(SALIENCY_NUM_THRESHOLDS, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("gt_pos", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        if self.protocol in ("mtinet", "mtlora"):
            num = len(MTINET_SALIENCY_THRESHOLDS)
            for name in ("iou_sum", "precision_sum", "recall_sum"):
                self.add_state(name, default=torch.zeros(num, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("n_images", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of saliency probabilities ``pred`` and binary targets."""
        true_pos, pred_pos, gt_pos = _saliency_update(pred, target)
        self.true_pos += true_pos
        self.pred_pos += pred_pos
        self.gt_pos += gt_pos
        if self.protocol in ("invpt", "mtlora"):
            true_pos, pred_pos = _saliency_sigmoid_prob_update(pred, target)
            self.sigmoid_true_pos += true_pos
            self.sigmoid_pred_pos += pred_pos
        if self.protocol in ("mtinet", "mtlora"):
            stats = _saliency_per_image_update(pred, target, stored=self.protocol == "mtinet")
            iou_sum, precision_sum, recall_sum, n_images = stats
            self.iou_sum += iou_sum
            self.precision_sum += precision_sum
            self.recall_sum += recall_sum
            self.n_images += n_images

    def compute(self) -> dict[str, Tensor]:
        """The protocol's scores in percent (see the class docstring for the keys)."""
        out = _saliency_compute(self.true_pos, self.pred_pos, self.gt_pos)
        if self.protocol in ("invpt", "mtlora"):
            out["maxF_sigmoid_prob"] = _saliency_compute(self.sigmoid_true_pos, self.sigmoid_pred_pos, self.gt_pos)[
                "maxF"
            ]
        if self.protocol in ("mtinet", "mtlora"):
            out |= _saliency_per_image_compute(self.iou_sum, self.precision_sum, self.recall_sum, self.n_images)
        return out
