"""Surface-normal metric: angular errors over a split, median from a fine histogram, per evaluation protocol."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from mtl_vision.metrics.functional import (
    NORMAL_WITHIN_DEG,
    _histogram_median,
    _normal_angles,
    _normal_compute,
    _normal_histogram_update,
    _normal_num_bins,
    _normal_sums_update,
    _protocol_normals,
)
from mtl_vision.metrics.mtan import NORMAL_KEYS, batch_mean, normal_batch
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, check_protocol

__all__ = ["NormalMetrics"]


class NormalMetrics(Metric):
    """mean / median / rmse angular error (degrees) and within-11.25/22.5/30 (percent) over a split.

    Keeping every per-pixel angle of a split would not fit a summable state, so the state is:
    exact float64 sums of angle and angle^2, exact int64 counts of valid pixels and of angles
    below each within-threshold (so mean, rmse and within-X equal ``normal_errors`` up to
    float rounding), plus an int64 histogram of angles over [0, 180] degrees with bins of
    ``bin_width_deg`` (18000 bins for 0.01). The median is read from the histogram with
    interpolation inside the bin; its error is below ``bin_width_deg`` (the functional
    ``normal_errors`` computes it exactly).

    ``protocol="mtinet"`` scores the prediction as MTI-Net stores it for its evaluator
    (SimonVandenhende/Multi-Task-Learning-PyTorch ``utils/utils.py: get_output``,
    ``evaluation/evaluate_utils.py: save_model_predictions``, ``evaluation/eval_normals.py``): a
    uint8 image ``floor((n + 1) * 255 / 2)`` of the unit prediction, read back as ``2 q / 255 - 1``
    (``functional.quantise_normals_uint8``).
    MTI-Net takes ``arccos`` of the float32 dot product; the angle here is the float64
    ``2 atan2`` form, which differs from it by float32 rounding only (up to about 0.02 degrees
    per pixel near 0 degrees, far less in the means). ``atrc`` and ``invpt`` score the
    prediction as given, as ATRC's ``MeanErrorInAngle`` and InvPT's ``NormalsMeter`` do (InvPT
    scales by 255 and back in float, without rounding to integers); both report ``mean`` only.

    ``protocol="mtan"`` (MTAN, nash-mtl, FAMO ``normal_error``) gives ``mean``, ``median`` and
    ``within_*`` as their trainers do: per validation batch (float32 ``acos``, exact median, their
    mask ``target.sum(channels) != 0``), then the mean over batches (``metrics/mtan.py``).

    Args:
        bin_width_deg: histogram resolution in degrees, in (0, 180].
        protocol: ``atrc`` (default), ``invpt`` or ``mtinet``.

    ``update(pred, target)``: normal vectors (N, 3, H, W); pred need not be unit length, or is the
    uint8 map MTI-Net stores (``(n + 1) * 255 / 2``, e.g. brought back to each image's own size by
    validation, ``engine.module``), read back as ``2 q / 255 - 1`` under every protocol and not
    quantised again; target pixels with a zero vector are invalid. ``compute()`` returns ``{"mean", "median", "rmse",
    "within_11_25", "within_22_5", "within_30"}``.
    """

    is_differentiable = False
    # mixed: the angle errors are lower-is-better, the within-X ratios higher-is-better
    higher_is_better = None
    full_state_update = False

    hist: Tensor
    sum_angle: Tensor
    sum_sq_angle: Tensor
    n_valid: Tensor
    within: Tensor

    def __init__(self, bin_width_deg: float = 0.01, protocol: str = DEFAULT_PROTOCOL, **kwargs) -> None:
        super().__init__(**kwargs)
        self.protocol = check_protocol(protocol, where="protocol")
        num_bins = _normal_num_bins(bin_width_deg)
        self.bin_width_deg = float(bin_width_deg)
        self.add_state("hist", default=torch.zeros(num_bins, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("sum_angle", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sum_sq_angle", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_valid", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(
            "within", default=torch.zeros(len(NORMAL_WITHIN_DEG), dtype=torch.int64), dist_reduce_fx="sum"
        )
        if self.protocol == "mtan":
            self.add_state("batch_errors", default=torch.zeros(len(NORMAL_KEYS), dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("n_batches", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch of predicted and ground-truth normals, (N, 3, H, W)."""
        angles = _normal_angles(_protocol_normals(pred, self.protocol), target)
        sum_angle, sum_sq_angle, n_valid, within = _normal_sums_update(angles)
        self.sum_angle += sum_angle
        self.sum_sq_angle += sum_sq_angle
        self.n_valid += n_valid
        self.within += within
        self.hist += _normal_histogram_update(angles, self.bin_width_deg)
        if self.protocol == "mtan" and (errors := normal_batch(pred, target)) is not None:
            self.batch_errors += torch.tensor(errors, dtype=torch.float64, device=self.batch_errors.device)
            self.n_batches += 1

    def compute(self) -> dict[str, Tensor]:
        """Split-level angular errors; median from the histogram (error < ``bin_width_deg``)."""
        median = _histogram_median(self.hist, self.bin_width_deg)
        out = _normal_compute(self.sum_angle, self.sum_sq_angle, self.n_valid, self.within, median)
        if self.protocol == "mtan":
            out |= dict(zip(NORMAL_KEYS, batch_mean(self.batch_errors, self.n_batches)))
        return out
