"""Functional dense-prediction metrics for multi-task evaluation.

Every metric is split in two halves that are shared with the stateful classes in
this package (``segmentation.py``, ``depth.py``, ...):

* ``_<task>_update(pred, target) -> statistics``: turns one batch into summable
  sufficient statistics (counts in int64, sums in float64);
* ``_<task>_compute(statistics) -> dict[str, Tensor]``: turns statistics summed
  over a whole split into the final values.

The exact boundary benchmark ``ods_f`` lives in ``boundary.py`` (thinning and matching
kernels) and is re-exported here. The public functions (``miou``, ``depth_errors``,
``normal_errors``, ``max_f``, ``ods_f_approx``) call ``_update`` once on the whole split and ``_compute`` on the
result, so the formulas exist once and a Metric accumulated over any batching
gives the same numbers as the functional on the concatenated split.

Conventions (they follow the published multi-task protocols, see the docstrings):
ratios (IoU, accuracy, F, within-X) are in percent, depth errors in the unit of
the input (metres), angles in degrees. ``max_f``, ``depth_errors`` and ``normal_errors``
take the evaluation ``protocol`` (``atrc`` | ``invpt`` | ``mtinet``, see ``protocols.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtl_vision.constants import IGNORE_INDEX as IGNORE_LABEL
from mtl_vision.metrics.boundary import ods_f  # the exact BSDS benchmark (numba), a twin like the others
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, check_protocol

__all__ = [
    "depth_errors",
    "dequantise_normals_uint8",
    "max_f",
    "miou",
    "normal_errors",
    "ods_f",
    "ods_f_approx",
    "quantise_normals_uint8",
    "quantise_saliency_uint8",
    "stored_probability",
]

# Non-positive depth predictions are replaced by this before every term (as the reference
# evaluators do), see ``_depth_update``.
DEPTH_PRED_EPS = 1e-9
# Thresholds of the within-X normal accuracies (strict ``angle < X``, as in ASTMT / MTI-Net).
NORMAL_WITHIN_DEG = (11.25, 22.5, 30.0)
_NORMAL_WITHIN_KEYS = ("within_11_25", "within_22_5", "within_30")
# Saliency: thresholds k/20, k = 1..19 (ATRC / InvPT ``threshold_step=0.05``), F_beta with beta^2 = 0.3.
SALIENCY_NUM_THRESHOLDS = 19
SALIENCY_BETA_SQUARED = 0.3
# MTI-Net saliency: np.linspace(0.2, 0.9, 15) (0.2, 0.25, ..., 0.9), predicted salient where ``> t``.
MTINET_SALIENCY_THRESHOLDS = tuple(float(t) for t in np.linspace(0.2, 0.9, 15))
# Edge: 99 thresholds k/100, k = 1..99, like the BSDS ``edgesEvalImg`` default.
EDGE_NUM_THRESHOLDS = 99
# Label used for "don't care" pixels in saliency / edge targets.


# --------------------------------------------------------------------------- #
# Shared input handling
# --------------------------------------------------------------------------- #
def _squeeze_channel(x: Tensor, name: str) -> Tensor:
    """(N, 1, H, W) -> (N, H, W); (N, H, W) is returned unchanged."""
    if x.ndim == 4:
        if x.shape[1] != 1:
            raise ValueError(f"Expected `{name}` of shape (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"Expected `{name}` of shape (N, H, W) or (N, 1, H, W), got {tuple(x.shape)}")
    return x


def _check_map_pair(pred: Tensor, target: Tensor, pred_name: str, target_name: str) -> tuple[Tensor, Tensor]:
    """Validate and squeeze a pair of single-channel maps to matching (N, H, W)."""
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise ValueError(f"Expected `{pred_name}` and `{target_name}` to be torch.Tensor")
    pred = _squeeze_channel(pred.detach(), pred_name)
    target = _squeeze_channel(target.detach(), target_name)
    if pred.shape != target.shape:
        raise ValueError(
            f"Expected `{pred_name}` and `{target_name}` to have the same shape, "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return pred, target


def _as_floating(x: Tensor) -> Tensor:
    """Integer / bool maps become float32; floating maps keep their dtype."""
    return x if x.is_floating_point() else x.float()


def _threshold_index(prob: Tensor, thresholds: Tensor) -> Tensor:
    """Number of thresholds ``t`` with ``prob >= t``, per pixel (int64, same shape as ``prob``).

    The thresholds are first rounded to ``prob``'s dtype so that a probability that
    equals a threshold in its own precision (e.g. a float16 0.35) counts as ``>=``
    that threshold; the comparison itself then runs exactly in float32 / float64.
    """
    work = torch.float64 if prob.dtype == torch.float64 else torch.float32
    thr = thresholds.to(device=prob.device, dtype=prob.dtype).to(work)
    # right=True: index = #{t : t <= prob}, i.e. how many thresholds the pixel passes.
    return torch.bucketize(prob.to(work).contiguous(), thr, right=True)


def _positives_per_threshold(index: Tensor, num_thresholds: int) -> Tensor:
    """From per-pixel ``_threshold_index`` values, count pixels passing each threshold: (T,) int64."""
    hist = torch.bincount(index.reshape(-1), minlength=num_thresholds + 1)
    # pixel passes threshold j (0-based) iff index > j -> reversed cumulative sum of hist[1:]
    return hist.flip(0).cumsum(0).flip(0)[1:]


def _uniform_thresholds(num_thresholds: int, name: str = "num_thresholds") -> Tensor:
    """k / (T + 1) for k = 1..T in float64, e.g. 0.05..0.95 for T = 19, 0.01..0.99 for T = 99."""
    if not isinstance(num_thresholds, int) or num_thresholds < 1:
        raise ValueError(f"Expected `{name}` to be a positive int, got {num_thresholds!r}")
    return torch.arange(1, num_thresholds + 1, dtype=torch.float64) / (num_thresholds + 1)


def _to_floats(values: dict[str, Tensor]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items()}


# --------------------------------------------------------------------------- #
# Semantic segmentation / human parts: mIoU from a confusion matrix
# --------------------------------------------------------------------------- #
def _check_num_classes(num_classes: int, class_names: Sequence[str] | None) -> None:
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"Expected `num_classes` to be a positive int, got {num_classes!r}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(
            f"Expected `class_names` to have `num_classes`={num_classes} entries, got {len(class_names)}"
        )


def _confusion_matrix_update(labels: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """Confusion matrix of one batch, rows = target class, columns = predicted class.

    Args:
        labels: predicted class ids, (N, H, W) or (N, 1, H, W), integer dtype.
        target: ground-truth class ids, same shape, integer dtype; ``ignore_index`` pixels are skipped.

    Returns:
        (num_classes, num_classes) int64 counts.

    Raises:
        ValueError: on float inputs, shape mismatch, or ids outside ``[0, num_classes)`` at
            non-ignored pixels (a silent wrap-around in ``bincount`` would corrupt the matrix).
    """
    labels, target = _check_map_pair(labels, target, "labels", "target")
    if labels.is_floating_point() or target.is_floating_point():
        raise ValueError(
            f"Expected `labels` and `target` to hold integer class ids, got {labels.dtype} and {target.dtype}"
        )
    valid = target != ignore_index
    t = target[valid].long()
    p = labels[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(
            f"Expected non-ignored `target` values in [0, {num_classes}) (or `ignore_index`={ignore_index}), "
            f"got range [{int(t.min())}, {int(t.max())}]"
        )
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(
            f"Expected `labels` values in [0, {num_classes}) at non-ignored pixels, "
            f"got range [{int(p.min())}, {int(p.max())}]"
        )
    # bincount without weights is deterministic on CUDA (unlike histc / weighted bincount)
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _miou_compute(confmat: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Tensor]:
    """mIoU, pixel accuracy and per-class IoU (percent) from a split-level confusion matrix.

    A class with TP + FP + FN = 0 (never in the target nor in the prediction) gets IoU 0
    and still counts in the mean, exactly as the reference ``SemsegMeter`` of MTI-Net /
    InvPT (``tp / max(tp + fp + fn, 1e-8)`` then ``np.mean`` over all classes) and ATRC's
    ``MeanIoU`` (NaN -> 0, then mean). On the standard splits every class occurs, so this
    only matters for tiny / partial validation sets, where mIoU is then pessimistic.
    ``pixel_acc`` is NaN if no pixel was counted.
    """
    confmat = confmat.to(torch.float64)
    tp = confmat.diagonal()
    union = confmat.sum(0) + confmat.sum(1) - tp  # TP + FP + FN
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.zeros_like(tp)) * 100.0
    out = {"mIoU": iou.mean(), "pixel_acc": tp.sum() / confmat.sum() * 100.0}
    for c in range(confmat.shape[0]):
        name = class_names[c] if class_names is not None else str(c)
        out[f"IoU/{name}"] = iou[c]
    return out


def miou(
    labels: Tensor,
    target: Tensor,
    num_classes: int,
    ignore_index: int = 255,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
    """Mean intersection-over-union over a whole split (one confusion matrix).

    Args:
        labels: predicted class ids, (N, H, W) (or (N, 1, H, W)), integer dtype.
        target: ground-truth class ids, same shape; pixels equal to ``ignore_index`` are excluded.
        num_classes: number of classes C (ids 0..C-1).
        ignore_index: target label of "don't care" pixels.
        class_names: optional C names used in the per-class keys.

    Returns:
        ``{"mIoU", "pixel_acc", "IoU/<name>" for each class}`` in percent. Classes absent from
        both target and prediction get IoU 0 and count in the mean (MTI-Net / InvPT protocol).
    """
    _check_num_classes(num_classes, class_names)
    return _to_floats(_miou_compute(_confusion_matrix_update(labels, target, num_classes, ignore_index), class_names))


# --------------------------------------------------------------------------- #
# Depth
# --------------------------------------------------------------------------- #
def _positive_depth(pred: Tensor) -> Tensor:
    """Non-positive predicted depths replaced by ``DEPTH_PRED_EPS`` (NaN stays NaN)."""
    return torch.where(pred <= 0, torch.full_like(pred, DEPTH_PRED_EPS), pred)


def _depth_update(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Sufficient statistics of depth errors for one batch.

    Args:
        pred: predicted depth, (N, H, W) or (N, 1, H, W), any floating dtype.
        target: ground-truth depth, same shape; pixels with ``target > 0`` are valid
            (0 / negative / NaN mark missing depth).

    Returns:
        ``(sum_sq_err, sum_abs_rel, sum_sq_log_err, n_valid, n_delta1, sum_abs_err)``: float64 sums
        and int64 counts.

    Non-positive predictions become ``DEPTH_PRED_EPS`` = 1e-9 before all terms, as the reference
    evaluators do (``pred[pred <= 0] = 1e-9`` in MTI-Net's ``eval_depth`` and in InvPT /
    TaskPrompter / MLoRE's ``DepthMeter``; positive values, even below 1e-9, are kept). For
    rmse this is a no-op in practice; for log_rmse / abs_rel / delta1 it keeps the terms finite
    and strongly penalised. A NaN prediction stays NaN.
    """
    pred, target = _check_map_pair(pred, target, "pred", "target")
    # float64: float16 cannot hold 1e-9, and per-pixel errors are summed over ~1e8 pixels
    pred = _as_floating(pred).to(torch.float64)
    target = _as_floating(target).to(torch.float64)
    valid = target > 0
    p = _positive_depth(pred[valid])
    g = target[valid]
    diff = p - g
    log_diff = torch.log(p) - torch.log(g)
    ratio = torch.maximum(p / g, g / p)
    return (
        (diff * diff).sum(),
        (diff.abs() / g).sum(),
        (log_diff * log_diff).sum(),
        torch.tensor(g.numel(), dtype=torch.int64, device=g.device),
        (ratio < 1.25).sum(),
        diff.abs().sum(),
    )


def _depth_compute(
    sum_sq_err: Tensor,
    sum_abs_rel: Tensor,
    sum_sq_log_err: Tensor,
    n_valid: Tensor,
    n_delta1: Tensor,
    sum_abs_err: Tensor,
) -> dict[str, Tensor]:
    """rmse / abs_err / abs_rel / log_rmse over all valid pixels of the split (not per-image
    means); delta1 in %."""
    n = n_valid.to(torch.float64)
    return {
        "rmse": torch.sqrt(sum_sq_err / n),
        "abs_err": sum_abs_err / n,
        "abs_rel": sum_abs_rel / n,
        "log_rmse": torch.sqrt(sum_sq_log_err / n),
        "delta1": n_delta1.to(torch.float64) / n * 100.0,
    }


def _depth_sq_rel_update(pred: Tensor, target: Tensor) -> Tensor:
    """Sum of (p - g)^2 / g over the valid pixels of one batch (float64), masks and clamp as in
    ``_depth_update``: the InvPT / TaskPrompter / MLoRE ``sq_rel`` numerator."""
    pred, target = _check_map_pair(pred, target, "pred", "target")
    pred = _as_floating(pred).to(torch.float64)
    target = _as_floating(target).to(torch.float64)
    valid = target > 0
    g = target[valid]
    diff = _positive_depth(pred[valid]) - g
    return (diff * diff / g).sum()


def _depth_sq_rel_compute(sum_sq_rel: Tensor, n_valid: Tensor) -> dict[str, Tensor]:
    """``sq_rel`` = mean over the valid pixels of the split of (p - g)^2 / g (metres)."""
    return {"sq_rel": sum_sq_rel / n_valid.to(torch.float64)}


def depth_errors(pred: Tensor, target: Tensor, *, protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Depth errors pooled over every valid pixel of the split.

    Args:
        pred: predicted depth in metres, (N, H, W) or (N, 1, H, W).
        target: ground-truth depth, same shape; valid where ``target > 0``.
        protocol: ``atrc`` / ``mtinet`` (these keys) or ``invpt`` (adds ``sq_rel``), see ``DepthMetrics``.

    Returns:
        ``{"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"}``; rmse = sqrt(sum (p-g)^2 / N_valid),
        abs_err = mean |p-g| (MTAN's and EMA-Net's "abs"), abs_rel = mean |p-g|/g, log_rmse = sqrt(mean (log p - log g)^2) (natural log),
        delta1 = % of valid pixels with max(p/g, g/p) < 1.25; under ``invpt`` also
        sq_rel = mean (p-g)^2/g. Non-positive predictions become 1e-9. All NaN if no pixel is valid.
    """
    protocol = check_protocol(protocol, where="protocol")
    stats = _depth_update(pred, target)
    out = _depth_compute(*stats)
    if protocol == "invpt":
        out |= _depth_sq_rel_compute(_depth_sq_rel_update(pred, target), stats[3])
    return _to_floats(out)


# --------------------------------------------------------------------------- #
# Surface normals
# --------------------------------------------------------------------------- #
def _channel_norm(x: Tensor) -> Tensor:
    """Euclidean norm over the 3 channels of a (N, 3, H, W) map -> (N, H, W).

    Written out per channel: a strided ``vector_norm(dim=1)`` is several times slower on CPU.
    """
    return torch.sqrt(x[:, 0] * x[:, 0] + x[:, 1] * x[:, 1] + x[:, 2] * x[:, 2])


def _normal_angles(pred: Tensor, target: Tensor) -> Tensor:
    """Angular errors in degrees at the valid pixels, flattened: (N_valid,) float64.

    Args:
        pred: predicted normals, (N, 3, H, W), any scale (normalised here).
        target: ground-truth normals, (N, 3, H, W); valid where the vector has a finite nonzero norm.

    ``angle = 2 atan2(|p - g|, |p + g|)`` on unit vectors (ATRC / InvPT formula): exact to
    rounding near 0 and 180 degrees, where ``acos`` of the dot product loses precision. A zero
    predicted vector stays zero and scores 90 degrees, as with the reference ``normalize_tensor``.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise ValueError("Expected `pred` and `target` to be torch.Tensor")
    if pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"Expected `pred` of shape (N, 3, H, W), got {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(f"Expected `target` of shape {tuple(pred.shape)} like `pred`, got {tuple(target.shape)}")
    pred = _as_floating(pred.detach()).to(torch.float64)
    target = _as_floating(target.detach()).to(torch.float64)
    g_norm = _channel_norm(target)
    valid = (g_norm > 0) & torch.isfinite(g_norm)
    p_norm = _channel_norm(pred)
    # zero vectors stay zero instead of becoming NaN
    p = pred / torch.where(p_norm > 0, p_norm, torch.ones_like(p_norm)).unsqueeze(1)
    g = target / torch.where(valid, g_norm, torch.ones_like(g_norm)).unsqueeze(1)
    angle = 2.0 * torch.atan2(_channel_norm(p - g), _channel_norm(p + g))
    angle = angle[valid]
    return torch.rad2deg(angle)


def _normal_sums_update(angles: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(sum_angle, sum_sq_angle, n_valid, within_counts (3,))`` of a flat float64 angle tensor."""
    within = torch.stack([(angles < t).sum() for t in NORMAL_WITHIN_DEG])
    n = torch.tensor(angles.numel(), dtype=torch.int64, device=angles.device)
    return angles.sum(), (angles * angles).sum(), n, within


def _normal_num_bins(bin_width_deg: float) -> int:
    if not (isinstance(bin_width_deg, (int, float)) and 0 < bin_width_deg <= 180):
        raise ValueError(f"Expected `bin_width_deg` in (0, 180], got {bin_width_deg!r}")
    # tolerance guards 180 / 0.01 = 18000.000000000004 against an extra empty bin
    return max(1, math.ceil(180.0 / bin_width_deg - 1e-6))


def _normal_histogram_update(angles: Tensor, bin_width_deg: float) -> Tensor:
    """Histogram of angles in ``[0, 180]`` with bins ``[k w, (k+1) w)`` (180 goes to the last bin): int64."""
    num_bins = _normal_num_bins(bin_width_deg)
    idx = torch.floor(angles / bin_width_deg).long().clamp_(0, num_bins - 1)
    return torch.bincount(idx, minlength=num_bins)


def _histogram_median(hist: Tensor, bin_width_deg: float) -> Tensor:
    """Median of the binned samples, interpolated inside the bin (float64 scalar, NaN if empty).

    The ``c`` samples of a bin are placed at its ``(k - 0.5) / c`` fractions; the median is the
    middle sample (odd count) or the mean of the two middle samples (even count), as ``np.median``.
    Each middle sample is estimated inside its true bin, so the error is below ``bin_width_deg``.
    """
    hist = hist.to(torch.int64)
    n = int(hist.sum())
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=hist.device)
    cum = hist.cumsum(0)
    ranks = torch.tensor([(n + 1) // 2, n // 2 + 1], dtype=torch.int64, device=hist.device)  # 1-based
    if n % 2 == 1:
        ranks = ranks[:1]
    b = torch.searchsorted(cum, ranks)  # first bin whose cumulative count reaches the rank
    before = cum[b] - hist[b]
    est = (b.to(torch.float64) + (ranks - before - 0.5).to(torch.float64) / hist[b].to(torch.float64)) * bin_width_deg
    return est.mean()


def _normal_compute(
    sum_angle: Tensor, sum_sq_angle: Tensor, n_valid: Tensor, within: Tensor, median: Tensor
) -> dict[str, Tensor]:
    """mean / median / rmse (degrees) and within-X (percent) over all valid pixels of the split."""
    n = n_valid.to(torch.float64)
    out = {
        "mean": sum_angle / n,
        "median": median.to(torch.float64),
        "rmse": torch.sqrt(sum_sq_angle / n),
    }
    for key, count in zip(_NORMAL_WITHIN_KEYS, within.to(torch.float64)):
        out[key] = count / n * 100.0
    return out


def _exact_median(values: Tensor) -> Tensor:
    """``np.median`` semantics (mean of the two middle values for even counts); NaN if empty."""
    n = values.numel()
    if n == 0:
        return torch.tensor(float("nan"), dtype=torch.float64, device=values.device)
    lo = torch.kthvalue(values, (n + 1) // 2).values
    hi = torch.kthvalue(values, n // 2 + 1).values
    return (lo + hi) / 2


def quantise_normals_uint8(pred: Tensor) -> Tensor:
    """Normals as MTI-Net saves them for its evaluator: uint8 (N, 3, H, W).

    Each vector is normalised (``F.normalize``, eps 1e-12), mapped to ``(n + 1) * 255 / 2`` in
    float32 and truncated to an integer, as numpy's ``astype(np.uint8)`` does before the PNG is
    written (MTI-Net ``utils/utils.py: get_output`` + ``evaluate_utils.py: save_model_predictions``).
    """
    if not isinstance(pred, Tensor) or pred.ndim != 4 or pred.shape[1] != 3:
        raise ValueError(f"Expected `pred` of shape (N, 3, H, W), got {getattr(pred, 'shape', type(pred))}")
    unit = F.normalize(_as_floating(pred.detach()).to(torch.float32), dim=1)
    return ((unit + 1.0) * 255 / 2.0).floor().clamp_(0, 255).to(torch.uint8)


def dequantise_normals_uint8(stored: Tensor) -> Tensor:
    """The float32 vectors MTI-Net's evaluator reads back from the uint8 image: ``2 q / 255 - 1``
    (not unit length; the angle normalises them)."""
    return 2.0 * stored.to(torch.float32) / 255.0 - 1.0


def _protocol_normals(pred: Tensor, protocol: str) -> Tensor:
    """The prediction a protocol scores: a uint8 ``pred`` is a map as MTI-Net stores it and is read
    back (``dequantise_normals_uint8``) under every protocol; a float one goes through the uint8
    round trip under ``mtinet`` and is scored as is under the others."""
    if pred.dtype == torch.uint8:
        return dequantise_normals_uint8(pred)
    return dequantise_normals_uint8(quantise_normals_uint8(pred)) if protocol == "mtinet" else pred


def normal_errors(pred: Tensor, target: Tensor, *, protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Angular errors of surface normals pooled over every valid pixel of the split.

    Args:
        pred: predicted normals, (N, 3, H, W) (normalised to unit length here); uint8: the map
            MTI-Net stores (``quantise_normals_uint8``), read back as ``2 q / 255 - 1``.
        target: ground-truth normals, (N, 3, H, W); pixels with a zero vector are invalid.
        protocol: ``atrc`` / ``invpt`` score ``pred``; ``mtinet`` scores a float ``pred`` after the
            uint8 round trip of ``quantise_normals_uint8`` (see ``NormalMetrics``).

    Returns:
        ``{"mean", "median", "rmse"}`` in degrees (exact median, ``np.median`` semantics) and
        ``{"within_11_25", "within_22_5", "within_30"}``: % of valid pixels with angle strictly
        below 11.25 / 22.5 / 30 degrees. All NaN if no pixel is valid.
    """
    pred = _protocol_normals(pred, check_protocol(protocol, where="protocol"))
    angles = _normal_angles(pred, target)
    return _to_floats(_normal_compute(*_normal_sums_update(angles), median=_exact_median(angles)))


# --------------------------------------------------------------------------- #
# Saliency: max F-beta
# --------------------------------------------------------------------------- #
def _saliency_thresholds() -> Tensor:
    """0.05, 0.10, ..., 0.95 (float64 k / 20; compared in the probability's precision).

    The authors build them as ``torch.arange(0.05, 1, 0.05)`` in float32, whose rounding has
    changed between torch releases: current torch gives 0.59999996 for the 12th value, one
    float32 step below float32(0.6), which ``float32(k / 20)`` gives (as does the same arange
    computed in double precision). The two differ only for a probability equal to 0.59999996.
    """
    return _uniform_thresholds(SALIENCY_NUM_THRESHOLDS)


def stored_probability(stored: Tensor) -> Tensor:
    """A probability map as MTI-Net's evaluators read their uint8 PNG back: ``q / 255`` in float32
    (``np.array(Image.open(f)).astype(np.float32) / 255.``), same shape."""
    if not isinstance(stored, Tensor) or stored.dtype != torch.uint8:
        raise ValueError(f"Expected a uint8 torch.Tensor (a stored map), got {getattr(stored, 'dtype', type(stored))}")
    return stored.to(torch.float32) / 255.0


def _probability(prob: Tensor) -> Tensor:
    """A saliency / edge map as a floating probability: a uint8 map is a stored one (``q / 255``)."""
    return stored_probability(prob) if prob.dtype == torch.uint8 else _as_floating(prob)


def _saliency_masks(prob: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(prob, valid, salient)`` of a checked (N, H, W) pair; 255 in the target is "don't care".
    A uint8 ``prob`` is a stored map and comes back as ``q / 255``."""
    prob, target = _check_map_pair(prob, target, "prob", "target")
    valid = target != IGNORE_LABEL
    return _probability(prob), valid, valid & (target > 0.5)


def _saliency_counts(prob: Tensor, valid: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """``(true_pos (19,), pred_pos (19,))``: pixels with ``prob >= t`` per threshold 0.05..0.95."""
    index = _threshold_index(prob, _saliency_thresholds())
    return _positives_per_threshold(index[gt], SALIENCY_NUM_THRESHOLDS), _positives_per_threshold(
        index[valid], SALIENCY_NUM_THRESHOLDS
    )


def _saliency_update(prob: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-threshold counts of one batch.

    Args:
        prob: saliency probabilities in [0, 1], (N, H, W) or (N, 1, H, W).
        target: binary ground truth (salient where ``> 0.5``), same shape; 255 = ignored.

    Returns:
        ``(true_pos (19,), pred_pos (19,), gt_pos ())`` int64; a pixel is predicted salient at
        threshold ``t`` when ``prob >= t``, as in ATRC ``MaxF``.
    """
    prob, valid, gt = _saliency_masks(prob, target)
    return (*_saliency_counts(prob, valid, gt), gt.sum())


def _saliency_compute(true_pos: Tensor, pred_pos: Tensor, gt_pos: Tensor) -> dict[str, Tensor]:
    """maxF (percent) over the thresholds from split-level counts.

    F_beta = (1 + b^2) P R / (b^2 P + R) with b^2 = 0.3; an undefined F (no predicted or no
    true positive, 0/0) counts as 0, as in the reference (``fscore[fscore != fscore] = 0``).
    """
    tp = true_pos.to(torch.float64)
    precision = tp / pred_pos.to(torch.float64)
    recall = tp / gt_pos.to(torch.float64)
    b2 = SALIENCY_BETA_SQUARED
    f = (1 + b2) * precision * recall / (b2 * precision + recall)
    return {"maxF": torch.nan_to_num(f, nan=0.0).max() * 100.0}


def _saliency_sigmoid_prob_update(prob: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(true_pos (19,), pred_pos (19,))`` of the InvPT pipeline: thresholds on sigmoid(prob).

    Their ``get_output`` hands ``255 * prob`` to ``SaliencyMeter``, which divides by 255 and then
    applies ``torch.sigmoid`` (meant for logits) to that probability; the same float32 steps here.
    """
    prob, valid, gt = _saliency_masks(prob, target)
    squashed = torch.sigmoid(prob.to(torch.float32) * 255.0 / 255.0)
    return _saliency_counts(squashed, valid, gt)


# MTI-Net's code base (SimonVandenhende/Multi-Task-Learning-PyTorch utils/config.py INFER_FLAGVALS):
# the interpolation with which its save_model_predictions brings each encoded map back to the
# image's own size before the evaluators behind its published numbers read it
RESIZE_BACK_FLAGS = {
    "semseg": cv2.INTER_NEAREST,
    "human_parts": cv2.INTER_NEAREST,
    "saliency": cv2.INTER_LINEAR,
    "edge": cv2.INTER_LINEAR,
    "normals": cv2.INTER_LINEAR,
    "depth": cv2.INTER_LINEAR,
}


def mtinet_encoding(task: str, raw: Tensor) -> np.ndarray:
    """A raw head output (N, C, H, W) as MTI-Net's `utils/utils.py get_output` encodes it, in
    float32 on the CPU: class ids (N, H, W) int64 (their `torch.max` over the channels);
    `255 / (1 + exp(-x))` (N, H, W) for saliency and edge (a two-class saliency head:
    255 * softmax at class 1); `(normalize(n) + 1) * 255 / 2` (N, H, W, 3) for normals; depth as is
    (N, H, W)."""
    x = raw.detach().float().permute(0, 2, 3, 1)
    if task in ("semseg", "human_parts"):
        out = torch.max(x, dim=3)[1]
    elif task == "normals":
        out = (F.normalize(x, p=2, dim=3) + 1.0) * 255 / 2.0
    elif task in ("saliency", "edge"):
        out = 255 * torch.softmax(x, dim=3)[..., 1] if x.shape[3] == 2 else 255 / (1 + torch.exp(-x[..., 0]))
    elif task == "depth":
        out = x[..., 0]
    else:
        raise ValueError(f"task {task!r}: MTI-Net's code base stores no {task} maps (known: {sorted(RESIZE_BACK_FLAGS)})")
    return out.cpu().numpy()


def stored_at_original_size(task: str, raw: Tensor, sizes: Sequence[tuple[int, int]], padded: tuple[int, int]) -> Tensor:
    """The maps MTI-Net's `evaluation/evaluate_utils.py save_model_predictions` writes for a batch,
    in our layout: per image, `mtinet_encoding` brought to the image's own (H, W) of `sizes` by
    `cv2.resize` with `RESIZE_BACK_FLAGS` and cast to uint8 as their PNGs (depth stays float32, as
    their .mat), then padded at the bottom and right to `padded` (the batch's padded targets, which
    are ignored there). Returns class maps (N, H, W) int64, saliency and edge (N, 1, H, W) uint8,
    normals (N, 3, H, W) uint8, depth (N, 1, H, W) float32, on `raw`'s device; the metrics read
    the uint8 maps as stored (`metrics.functional.stored_probability`, `dequantise_normals_uint8`)."""
    maps = []
    for array, (h, w) in zip(mtinet_encoding(task, raw), sizes):
        resized = cv2.resize(array, (w, h), interpolation=RESIZE_BACK_FLAGS[task])  # OpenCV takes (W, H)
        stored = torch.from_numpy(np.ascontiguousarray(resized if task == "depth" else resized.astype(np.uint8)))
        stored = stored.permute(2, 0, 1) if stored.dim() == 3 else stored[None]
        maps.append(F.pad(stored, (0, padded[1] - w, 0, padded[0] - h)))
    out = torch.stack(maps).to(raw.device)
    return out[:, 0].long() if task in ("semseg", "human_parts") else out


def quantise_saliency_uint8(prob: Tensor) -> Tensor:
    """Saliency as MTI-Net saves it: ``255 * prob`` in float32, truncated to uint8 (numpy's
    ``astype(np.uint8)`` before the PNG is written), same shape as ``prob``."""
    if not isinstance(prob, Tensor):
        raise ValueError("Expected `prob` to be a torch.Tensor")
    return (_as_floating(prob.detach()).to(torch.float32) * 255).floor().clamp_(0, 255).to(torch.uint8)


def _mtinet_passes(device: torch.device) -> Tensor:
    """For each stored value q = 0..255: how many MTI-Net thresholds ``q / 255`` exceeds (int64 (256,)).

    Their evaluator divides the uint8 image by 255 in float32 and compares it with the float64
    thresholds as numpy < 1.24 (which their ``np.bool`` needs) does: in float32. So q = 51, 102,
    153, 204 equal the thresholds 0.2, 0.4, 0.6, 0.8 and are not above them.
    """
    values = torch.arange(256, dtype=torch.float32) / 255.0
    thresholds = torch.tensor(MTINET_SALIENCY_THRESHOLDS, dtype=torch.float64).to(torch.float32)
    return (values[:, None] > thresholds[None, :]).sum(1).to(device)


def _per_image_positives(passes: Tensor, mask: Tensor, num_thresholds: int) -> Tensor:
    """(N, T) int64: per image, the pixels of ``mask`` that pass each threshold."""
    n = passes.shape[0]
    image = torch.arange(n, device=passes.device).view(n, 1, 1).expand_as(passes)
    index = image[mask] * (num_thresholds + 1) + passes[mask]
    hist = torch.bincount(index, minlength=n * (num_thresholds + 1)).view(n, num_thresholds + 1)
    return hist.flip(1).cumsum(1).flip(1)[:, 1:]


def _saliency_per_image_update(
    prob: Tensor, target: Tensor, *, stored: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MTI-Net's per-image saliency statistics of one batch, from the uint8-stored prediction
    (``stored=False``: from the float32 ``255 * prob / 255`` that MTLoRA's online meter thresholds).
    A uint8 ``prob`` is that stored map already (``255 p`` as MTI-Net's ``save_model_predictions``
    writes it, e.g. after bringing it back to the image's own size): it is read as stored, never
    quantised again, whatever ``stored`` says.

    Returns:
        ``(iou_sum (15,), precision_sum (15,), recall_sum (15,), n_images ())``: float64 sums over
        the batch's images of IoU, precision and recall at each threshold of
        ``MTINET_SALIENCY_THRESHOLDS`` (salient where ``q / 255 > t``), and the int64 image count.
        Per image, as MTI-Net ``jaccard.py``: IoU = TP / |pred ∪ gt| (1 when both are empty),
        precision = TP / (TP + FP + 1e-12), recall = TP / (TP + FN + 1e-12). Target pixels 255
        are left out of both masks; an image with no other pixel is not counted.
    """
    given = prob
    prob, valid, gt = _saliency_masks(prob, target)
    num = len(MTINET_SALIENCY_THRESHOLDS)
    if given.dtype == torch.uint8:
        passes = _mtinet_passes(prob.device)[_squeeze_channel(given.detach(), "prob").long()]
    elif stored:
        passes = _mtinet_passes(prob.device)[quantise_saliency_uint8(prob).long()]
    else:
        thresholds = torch.tensor(MTINET_SALIENCY_THRESHOLDS, dtype=torch.float32, device=prob.device)
        online = _as_floating(prob.detach()).to(torch.float32) * 255.0 / 255.0
        passes = (online[..., None] > thresholds).sum(-1)
    tp = _per_image_positives(passes, gt, num)
    pred_pos = _per_image_positives(passes, valid, num)
    gt_pos = gt.sum((1, 2))[:, None]
    keep = valid.flatten(1).any(1)
    tp, pred_pos, gt_pos = (x[keep].to(torch.float64) for x in (tp, pred_pos, gt_pos))
    union = gt_pos + pred_pos - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.ones_like(tp))
    precision = tp / (pred_pos + 1e-12)
    recall = tp / (gt_pos + 1e-12)
    return iou.sum(0), precision.sum(0), recall.sum(0), keep.sum()


def _saliency_per_image_compute(
    iou_sum: Tensor, precision_sum: Tensor, recall_sum: Tensor, n_images: Tensor
) -> dict[str, Tensor]:
    """MTI-Net's saliency scores (percent): per threshold, mean IoU and the F1 of the mean
    precision and mean recall (``2 P R / (P + R + 1e-12)``), each maximised over the thresholds
    (possibly at different ones). NaN when no image was counted."""
    n = n_images.to(torch.float64)
    precision, recall = precision_sum / n, recall_sum / n
    f1 = 2 * precision * recall / (precision + recall + 1e-12)
    return {"maxF1_per_image": f1.max() * 100.0, "max_mIoU_per_image": (iou_sum / n).max() * 100.0}


def max_f(prob: Tensor, target: Tensor, *, protocol: str = DEFAULT_PROTOCOL) -> dict[str, float]:
    """Saliency scores of a whole split under an evaluation protocol (see ``SaliencyMetrics``).

    Args:
        prob: saliency probabilities, (N, H, W) or (N, 1, H, W); uint8: the map MTI-Net stores
            (``255 p``), read as ``q / 255`` and, by the per-image scores, as stored.
        target: binary ground truth, same shape; 255 = ignored.
        protocol: ``atrc``, ``invpt`` or ``mtinet``.

    Returns:
        In percent: ``maxF`` (every protocol: F_beta, beta^2 = 0.3, thresholds 0.05..0.95 with
        ``prob >= t``, counts pooled over the split), plus ``maxF_sigmoid_prob`` under ``invpt``
        and ``maxF1_per_image``, ``max_mIoU_per_image`` under ``mtinet``.
    """
    protocol = check_protocol(protocol, where="protocol")
    true_pos, pred_pos, gt_pos = _saliency_update(prob, target)
    out = _saliency_compute(true_pos, pred_pos, gt_pos)
    if protocol == "invpt":
        out["maxF_sigmoid_prob"] = _saliency_compute(*_saliency_sigmoid_prob_update(prob, target), gt_pos)["maxF"]
    elif protocol == "mtinet":
        out |= _saliency_per_image_compute(*_saliency_per_image_update(prob, target))
    elif protocol == "mtlora":
        out["maxF_sigmoid_prob"] = _saliency_compute(*_saliency_sigmoid_prob_update(prob, target), gt_pos)["maxF"]
        out |= _saliency_per_image_compute(*_saliency_per_image_update(prob, target, stored=False))
    return _to_floats(out)


# --------------------------------------------------------------------------- #
# Edge: cheap training-time approximation of BSDS odsF
# --------------------------------------------------------------------------- #
def _edge_radius(height: int, width: int, tolerance: float) -> int:
    """Match radius in pixels: ``round(tolerance * image diagonal)``, at least 1."""
    return max(1, int(round(tolerance * math.hypot(height, width))))


def _check_tolerance(tolerance: float) -> None:
    if not (isinstance(tolerance, (int, float)) and 0 < tolerance < 1):
        raise ValueError(f"Expected `tolerance` in (0, 1) (fraction of the image diagonal), got {tolerance!r}")


def _dilate(x: Tensor, radius: int) -> Tensor:
    """Max over the (2r+1) x (2r+1) square around each pixel of a (N, H, W) map (separable max-pool)."""
    k = 2 * radius + 1
    x = x.unsqueeze(1)
    # a square max-pool is a row max-pool followed by a column max-pool: O(k) instead of O(k^2)
    x = F.max_pool2d(x, kernel_size=(1, k), stride=1, padding=(0, radius))
    x = F.max_pool2d(x, kernel_size=(k, 1), stride=1, padding=(radius, 0))
    return x.squeeze(1)


def _edge_update(
    prob: Tensor, target: Tensor, tolerance: float, num_thresholds: int = EDGE_NUM_THRESHOLDS
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-threshold matching counts of one batch for the approximate odsF.

    Args:
        prob: edge probabilities, (N, H, W) or (N, 1, H, W); uint8: a stored map, read as q / 255.
        target: binary edge ground truth (edge where ``> 0.5``), same shape; 255 = ignored.
        tolerance: match distance as a fraction of the image diagonal (BSDS uses 0.0075).
        num_thresholds: T thresholds k / (T + 1), k = 1..T (default 99: 0.01..0.99).

    Returns:
        ``(pred_correct (T,), pred_pos (T,), gt_recalled (T,), gt_pos ())`` int64.

    Approximation of BSDS ``correspondPixels``: no thinning and no one-to-one matching. With
    ``r = max(1, round(tolerance * diag))`` and a SQUARE (2r+1)^2 neighbourhood (Chebyshev
    distance, slightly more lenient than the BSDS disk along diagonals): a predicted pixel
    (``prob >= t``) is correct if a GT edge pixel lies in its neighbourhood; a GT pixel is
    recalled if a predicted pixel lies in its neighbourhood. Because binarising commutes with
    max-pooling, "some pixel within r has prob >= t" equals "max-pooled prob >= t", so every
    threshold comes from one dilation of the GT and one of the prob map, plus histograms.
    Ignored pixels neither count nor help match other pixels.
    """
    _check_tolerance(tolerance)
    prob, target = _check_map_pair(prob, target, "prob", "target")
    thresholds = _uniform_thresholds(num_thresholds)
    valid = target != IGNORE_LABEL
    gt = valid & (target > 0.5)
    radius = _edge_radius(prob.shape[-2], prob.shape[-1], tolerance)
    prob = _probability(prob)  # a uint8 map is a stored one: q / 255
    work = torch.float64 if prob.dtype == torch.float64 else torch.float32

    near_gt = _dilate(gt.to(work), radius) > 0
    index = _threshold_index(prob, thresholds)
    pred_correct = _positives_per_threshold(index[valid & near_gt], num_thresholds)
    pred_pos = _positives_per_threshold(index[valid], num_thresholds)

    # -1 < every threshold: ignored pixels never recall a GT pixel; max-pool keeps the exact values
    masked = torch.where(valid, prob.to(work), torch.full_like(prob, -1.0, dtype=work))
    near_max = _dilate(masked, radius)
    # near_max holds original prob values, cast back so the >= comparison uses prob's precision
    gt_recalled = _positives_per_threshold(_threshold_index(near_max[gt].to(prob.dtype), thresholds), num_thresholds)
    return pred_correct, pred_pos, gt_recalled, gt.sum()


def _edge_compute(pred_correct: Tensor, pred_pos: Tensor, gt_recalled: Tensor, gt_pos: Tensor) -> dict[str, Tensor]:
    """Approximate odsF (percent): F = 2PR / (P + R) maximised over the common threshold; 0/0 -> 0."""
    precision = pred_correct.to(torch.float64) / pred_pos.to(torch.float64)
    recall = gt_recalled.to(torch.float64) / gt_pos.to(torch.float64)
    f = 2 * precision * recall / (precision + recall)
    return {"odsF_approx": torch.nan_to_num(f, nan=0.0).max() * 100.0}


def ods_f_approx(
    prob: Tensor, target: Tensor, tolerance: float, num_thresholds: int = EDGE_NUM_THRESHOLDS
) -> dict[str, float]:
    """Cheap, APPROXIMATE dataset-scale (ODS) boundary F-measure for monitoring during training.

    Not the BSDS / SEISM benchmark (no thinning, no one-to-one matching, square neighbourhood);
    numbers are optimistic relative to it and are only comparable with each other.

    Args:
        prob: edge probabilities, (N, H, W) or (N, 1, H, W).
        target: binary edge ground truth, same shape; 255 = ignored.
        tolerance: match radius as a fraction of the image diagonal, r = max(1, round(tol * diag)) px.
        num_thresholds: T thresholds k / (T + 1) (default 99: 0.01..0.99); predicted edge = ``prob >= t``.

    Returns:
        ``{"odsF_approx"}`` in percent (counts pooled over the split before P, R, F).
    """
    return _to_floats(_edge_compute(*_edge_update(prob, target, tolerance, num_thresholds)))
