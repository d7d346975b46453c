"""Exact BSDS boundary benchmark (ODS / OIS F-measure and AP) in Python.

Martin, Fowlkes & Malik, "Learning to Detect Natural Image Boundaries Using Local Brightness,
Color, and Texture Cues", TPAMI 2004; the protocol of the BSDS500 ``correspondPixels`` /
``evaluate_boundaries`` code as reimplemented by pyEdgeEval (the correctness reference):

* thresholds ``k / (T + 1)``, ``k = 1..T``; a pixel is an edge at ``t`` when ``prob >= t``;
* the binary map is thinned (bwmorph 'thin' / ``skimage.morphology.thin``);
* predicted and ground-truth pixels are matched one-to-one when their distance is
  ``<= max_dist * image diagonal``. ``correspondPixels`` solves a min-cost assignment whose
  outlier cost (100 x the radius per unmatched pixel) dwarfs any distance, so its matching has
  maximum cardinality; only the cardinality enters the counts, and we compute it with a sparse
  assignment (unit real edges, outlier edges of cost 2) on the graph of pixel pairs in range;
* per threshold ``cntR = cntP =`` matched pairs, ``sumR`` = GT pixels, ``sumP`` = predicted
  pixels; ODS interpolates P/R linearly between neighbouring thresholds (101 steps), OIS takes
  each image's best threshold and sums its counts, AP is pyEdgeEval's 100-point sum / 101.

Ignore pixels (target 255) are neither ground truth nor predictions: predicted pixels there are
dropped after thinning, so they count neither as true nor as false positives.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching
from torch import Tensor

from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.data.pascal_context import thin

__all__ = ["boundary_counts", "ods_f"]

# The NYUD tolerance (0.011 of the diagonal); PASCAL uses 0.0075.
DEFAULT_MAX_DIST = 0.011
EDGE_NUM_THRESHOLDS = 99


def _thresholds(num_thresholds: int) -> np.ndarray:
    return np.linspace(1.0 / (num_thresholds + 1), 1.0 - 1.0 / (num_thresholds + 1), num_thresholds)


def _gt_neighbours(gt: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, int]:
    """CSR over flat pixel indices: for every pixel, the ids of GT pixels within ``radius``.

    The ground truth is fixed over the thresholds, so this is built once per image and each
    threshold only gathers the rows of its predicted pixels.
    """
    h, w = gt.shape
    gy, gx = np.nonzero(gt)
    n_gt = gy.size
    r = int(math.ceil(radius))
    dv, du = np.mgrid[-r : r + 1, -r : r + 1]
    keep = du * du + dv * dv <= radius * radius  # inclusive, as ``d2 > maxDist^2 -> skip``
    dv, du = dv[keep], du[keep]
    py = gy[None, :] + dv[:, None]
    px = gx[None, :] + du[:, None]
    ids = np.broadcast_to(np.arange(n_gt, dtype=np.int32)[None, :], py.shape)
    inside = (py >= 0) & (py < h) & (px >= 0) & (px < w)
    pix = (py * w + px)[inside]
    ids = ids[inside]
    order = np.argsort(pix, kind="stable")
    indptr = np.zeros(h * w + 1, dtype=np.int64)
    np.cumsum(np.bincount(pix, minlength=h * w), out=indptr[1:])
    return indptr, ids[order], n_gt


def _match_cardinality(pred_pix: np.ndarray, indptr: np.ndarray, gt_ids: np.ndarray, n_gt: int) -> int:
    """Size of a maximum one-to-one matching between predicted pixels and GT pixels in range.

    Solved like ``correspondPixels``: a sparse min-cost assignment in which every predicted
    pixel may also take its own outlier column at a cost larger than any set of real matches,
    so the optimum has maximum cardinality. (scipy's Hopcroft-Karp is far slower on these dense
    local graphs; LAPJVsp is used instead.)
    """
    starts = indptr[pred_pix]
    degree = indptr[pred_pix + 1] - starts
    has = degree > 0
    if not has.any():
        return 0
    starts, degree = starts[has], degree[has]
    n_pred = degree.size
    real_ptr = np.zeros(n_pred + 1, dtype=np.int64)
    np.cumsum(degree, out=real_ptr[1:])
    # positions starts[i] + 0..degree[i]-1, concatenated without a Python loop
    pos = np.arange(real_ptr[-1], dtype=np.int64) + np.repeat(starts - real_ptr[:-1], degree)
    row_ptr = real_ptr + np.arange(n_pred + 1)  # one extra (outlier) entry per row, last in the row
    cols = np.empty(row_ptr[-1], dtype=np.int64)
    weights = np.ones(row_ptr[-1], dtype=np.float64)
    outlier = row_ptr[1:] - 1
    is_real = np.ones(row_ptr[-1], dtype=bool)
    is_real[outlier] = False
    cols[is_real] = gt_ids[pos]
    cols[outlier] = n_gt + np.arange(n_pred)
    weights[outlier] = 2.0  # real edge 1, outlier 2: each extra match lowers the cost by 1
    graph = csr_matrix((weights, cols, row_ptr), shape=(n_pred, n_gt + n_pred))
    _, col = min_weight_full_bipartite_matching(graph)
    return int((col < n_gt).sum())


def boundary_counts(
    prob: np.ndarray, target: np.ndarray, max_dist: float = DEFAULT_MAX_DIST, num_thresholds: int = EDGE_NUM_THRESHOLDS
) -> np.ndarray:
    """Per-threshold BSDS counts of one image.

    Args:
        prob: (H, W) edge probabilities in [0, 1].
        target: (H, W) ground truth, 1 = edge, 0 = background, 255 = ignore.

    Returns:
        (T, 4) float64 array of ``cntR, sumR, cntP, sumP`` per threshold.
    """
    prob = np.asarray(prob, dtype=np.float64)
    target = np.asarray(target)
    gt = target == 1
    valid = (target != IGNORE_INDEX).reshape(-1)
    h, w = gt.shape
    indptr, gt_ids, n_gt = _gt_neighbours(gt, max_dist * math.hypot(h, w))
    out = np.zeros((num_thresholds, 4), dtype=np.float64)
    out[:, 1] = n_gt
    prev_on, prev = -1, (0, 0)
    for k, t in enumerate(_thresholds(num_thresholds)):
        on = prob >= t
        n_on = int(on.sum())
        if n_on != prev_on:  # binarisations are nested: equal size means the same map
            pred_pix = np.flatnonzero(thin(on))
            pred_pix = pred_pix[valid[pred_pix]]
            matched = _match_cardinality(pred_pix, indptr, gt_ids, n_gt) if n_gt else 0
            prev_on, prev = n_on, (matched, pred_pix.size)
        out[k, 0], out[k, 2], out[k, 3] = prev[0], prev[0], prev[1]
    return out


def _f1(cnt_r, sum_r, cnt_p, sum_p):
    rec = cnt_r / (sum_r + (sum_r == 0))
    prec = cnt_p / (sum_p + (sum_p == 0))
    return rec, prec, 2.0 * prec * rec / (prec + rec + ((prec + rec) == 0))


def _boundary_update(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, T, 4) per-image counts -> summable states: per-threshold sums (T, 4) and the sum of
    every image's counts at its own best threshold (4,), i.e. ODS and OIS statistics."""
    _, _, f = _f1(counts[..., 0], counts[..., 1], counts[..., 2], counts[..., 3])
    best = np.argmax(f, axis=1)  # first maximum, as np.argmax in pyEdgeEval
    ois = counts[np.arange(counts.shape[0]), best].sum(axis=0)
    return counts.sum(axis=0), ois


def _boundary_compute(per_threshold: np.ndarray, ois: np.ndarray) -> dict[str, float]:
    rec, prec, _ = _f1(*per_threshold.T)
    # ODS: linear interpolation of P and R between neighbouring thresholds, 101 steps.
    d = np.linspace(0.0, 1.0, 101)[None, :]
    r = rec[1:, None] * d + rec[:-1, None] * (1.0 - d)
    p = prec[1:, None] * d + prec[:-1, None] * (1.0 - d)
    _, _, f_interp = _f1(r, 1.0, p, 1.0)
    _, _, f0 = _f1(rec[0], 1.0, prec[0], 1.0)
    ods = max(float(f0), float(f_interp.max(initial=0.0)))
    _, _, ois_f = _f1(*ois)
    # AP as pyEdgeEval: recall levels 0, 0.01, ..., 0.99, best precision at recall >= level, / 101.
    levels = np.arange(0.0, 1.0, 0.01)
    ap = sum(np.max(prec[rec >= lv], initial=0.0) for lv in levels) / 101.0
    return {"odsF": ods * 100.0, "oisF": float(ois_f) * 100.0, "ap": float(ap) * 100.0}


def _counts_star(args: tuple) -> np.ndarray:
    return boundary_counts(*args)


def _to_numpy(x: Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim != 3:
        raise ValueError(f"Expected `{name}` of shape (N, H, W) or (N, 1, H, W), got {x.shape}")
    return x


def ods_f(
    probs: Tensor | np.ndarray,
    targets: Tensor | np.ndarray,
    max_dist: float = DEFAULT_MAX_DIST,
    num_thresholds: int = EDGE_NUM_THRESHOLDS,
    workers: int = 1,
) -> dict[str, float]:
    """BSDS boundary benchmark over a split: ``{"odsF", "oisF", "ap"}`` in percent.

    Args:
        probs: (N, H, W) or (N, 1, H, W) edge probabilities in [0, 1].
        targets: same shape, 1 = edge, 0 = background, 255 = ignore.
        max_dist: match radius as a fraction of the image diagonal (0.011 NYUD, 0.0075 PASCAL).
        num_thresholds: thresholds ``k / (T + 1)``, ``k = 1..T``.
        workers: processes over images (0 = all CPUs).
    """
    probs, targets = _to_numpy(probs, "probs"), _to_numpy(targets, "targets")
    if probs.shape != targets.shape:
        raise ValueError(f"Expected `probs` and `targets` of the same shape, got {probs.shape} and {targets.shape}")
    if not max_dist > 0:
        raise ValueError(f"Expected `max_dist` > 0, got {max_dist}")
    if num_thresholds < 1:
        raise ValueError(f"Expected `num_thresholds` >= 1, got {num_thresholds}")
    if probs.shape[0] == 0:
        raise ValueError("Expected at least one image in `probs`")
    jobs = [(p, t, max_dist, num_thresholds) for p, t in zip(probs, targets)]
    workers = workers or os.cpu_count() or 1
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
            counts = list(pool.map(_counts_star, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
    else:
        counts = [_counts_star(job) for job in jobs]
    return _boundary_compute(*_boundary_update(np.stack(counts)))
