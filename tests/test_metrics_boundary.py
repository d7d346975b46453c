"""Exact BSDS boundary benchmark (`mtl_vision.metrics.boundary`, `EdgeMetrics`): hand-worked cases,
brute-force checks of the matching, and agreement with pyEdgeEval 0.2.8 (the reference).

What is compared with pyEdgeEval, and how closely:

* thinning: identical to its ``binary_thin`` (pixel for pixel), so ``sumP`` is identical at
  every threshold; ``sumR`` is identical;
* matches (``cntR = cntP``): ours are the maximum one-to-one matching. pyEdgeEval's
  ``correspondPixels`` solves a min-cost assignment whose outlier nodes are joined by a sparse
  random graph (degree 6, seeded from the clock), which now and then forces a pixel that could
  be matched to be an outlier. Its counts are therefore never above ours and change from run
  to run: on images this small a few per mille fewer matches and an odsF 0.05-0.3 points lower
  (0.01 points on 480x640 ones), hence the tolerances below.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter, zoom
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching

from mtl_vision.data.pascal_context import label_boundaries
from mtl_vision.metrics import EdgeMetrics
from mtl_vision.metrics.boundary import _match_count, _radius, _thresholds, boundary_counts, bsds_thin, ods_f
from mtl_vision.morphology import thin

H, W = 40, 60  # diagonal 72.1 px; max_dist 0.03 -> 2.16 px


def _line(col: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[5:35, col] = 1
    return m


def _synthetic(seed: int, h: int = 64, w: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Label-map boundaries as GT; the GT shifted by 1 px, blurred, plus smooth noise as prediction."""
    rng = np.random.default_rng(seed)
    lab = np.argmax(np.stack([zoom(rng.random((h // 16 + 1, w // 16 + 1)), 16, order=1)[:h, :w] for _ in range(4)]), 0)
    gt = label_boundaries(lab).astype(np.uint8)
    edge = gaussian_filter(np.roll(gt, 1, axis=1).astype(float), 1.5)
    p = 2 * edge + 0.5 * gaussian_filter(rng.random((h, w)), 1) + 0.2 * rng.random((h, w))
    return np.clip(p / p.max(), 0, 1), gt


# --------------------------------------------------------------------------- hand-worked cases


def test_perfect_prediction_is_100():
    gt = _line(20)[None]
    out = ods_f(gt.astype(np.float32), gt, max_dist=0.03)
    assert out == pytest.approx({"odsF": 100.0, "oisF": 100.0, "ap": 100.0 * 100 / 101})


def test_shift_within_tolerance_matches():
    out = ods_f(_line(22)[None].astype(float), _line(20)[None], max_dist=0.03)  # 2 px <= 2.16
    assert out["odsF"] == pytest.approx(100.0)


def test_shift_beyond_tolerance_is_zero():
    out = ods_f(_line(23)[None].astype(float), _line(20)[None], max_dist=0.03)  # 3 px > 2.16
    assert out == {"odsF": 0.0, "oisF": 0.0, "ap": 0.0}


def test_tolerance_is_inclusive():
    h, w, max_dist = 30, 40, 0.04  # diagonal 50 -> radius exactly 2
    assert _radius(h, w, max_dist) == 2.0
    gt = np.zeros((h, w), np.uint8)
    gt[10, 10] = 1
    for (dr, dc), matched in (((0, 2), 1), ((2, 0), 1), ((1, 1), 1), ((2, 1), 0), ((0, 3), 0)):
        pred = np.zeros((h, w))
        pred[10 + dr, 10 + dc] = 1.0
        assert boundary_counts(pred, gt, max_dist)[0, 0] == matched, (dr, dc)


def test_one_to_one():
    gt = np.zeros((H, W), dtype=np.uint8)
    gt[20, 30] = 1
    pred = np.zeros((H, W))
    pred[20, 29] = pred[20, 31] = 1.0  # two isolated pixels, both within range of the one GT pixel
    c = boundary_counts(pred, gt, max_dist=0.03)
    np.testing.assert_array_equal(c[0], [1, 1, 1, 2])  # cntR, sumR, cntP, sumP
    assert ods_f(pred[None], gt[None], max_dist=0.03)["odsF"] == pytest.approx(100 * 2 * 0.5 / 1.5)


def test_matching_is_maximum_not_greedy():
    # GT a, b; prediction x near both, y near a only: greedy x-a would leave y alone, the maximum is 2.
    gt = np.zeros((H, W), np.uint8)
    pred = np.zeros((H, W))
    gt[20, 20] = gt[20, 22] = 1  # a, b (radius 2.16)
    pred[20, 21] = 1.0  # x: 1 px from both
    pred[20, 18] = 1.0  # y: 2 px from a, 4 px from b
    np.testing.assert_array_equal(boundary_counts(pred, gt, max_dist=0.03)[0], [2, 2, 2, 2])


def test_thresholds_and_counts_per_threshold():
    gt = _line(20)
    pred = _line(20) * 0.5 + _line(40) * 0.25  # true line at 0.5, a false one at 0.25
    c = boundary_counts(pred, gt, max_dist=0.03, num_thresholds=3)  # thresholds 0.25, 0.5, 0.75
    np.testing.assert_array_equal(c, [[30, 30, 30, 60], [30, 30, 30, 30], [0, 30, 0, 0]])


def test_empty_prediction_and_empty_gt():
    gt = _line(20)[None]
    assert ods_f(np.zeros((1, H, W)), gt, max_dist=0.03)["odsF"] == 0.0
    c = boundary_counts(_line(10).astype(float), np.zeros((H, W), np.uint8), max_dist=0.03)
    assert (c[:, :3] == 0).all() and (c[:, 3] == 30).all()


def test_ignore_pixels_are_neither_gt_nor_prediction():
    gt = _line(20)
    gt[:, 40:] = 255
    pred = _line(20).astype(float)
    pred[10:30, 50] = 1.0  # a false positive, but inside the ignored region
    c = boundary_counts(pred, gt, max_dist=0.03)
    np.testing.assert_array_equal(c[0], [30, 30, 30, 30])


def test_thin_lines_are_kept():
    m = np.zeros((20, 30), bool)
    m[5, 3:27] = True  # straight
    m[np.arange(8, 18), np.arange(8, 18)] = True  # 8-connected diagonal
    np.testing.assert_array_equal(bsds_thin(m), m)


def test_thick_blob_is_thinned_before_matching():
    gt = np.zeros((H, W), np.uint8)
    gt[20, 10:50] = 1
    pred = np.zeros((H, W))
    pred[18:23, 10:50] = 1.0  # 5 px thick bar on the GT line
    thinned = bsds_thin(pred > 0)
    assert thinned.sum(axis=0)[12:48].max() == 1  # one pixel per column away from the ends
    assert thinned[20, 12:48].all()
    c = boundary_counts(pred, gt, max_dist=0.03)[0]
    assert c[3] == thinned.sum() < 60 and c[0] == c[2] == min(40, c[3])


def test_thinning_stops_like_bsds():
    # pyEdgeEval stops when the first subiteration removes nothing; skimage would go on and
    # remove the corner of this L with its second subiteration.
    m = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], bool)
    np.testing.assert_array_equal(bsds_thin(m), m)
    np.testing.assert_array_equal(thin(m), [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_torch_input_and_shape_errors():
    gt = torch.from_numpy(_line(20))[None, None]
    assert ods_f(gt.to(torch.bfloat16), gt, max_dist=0.03)["odsF"] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="same shape"):
        ods_f(np.zeros((1, H, W)), np.zeros((1, H, W + 1)))


# --------------------------------------------------------------------------- brute force


def test_matching_size_equals_brute_force_maximum():
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(4, 40, 2)
        pred = rng.random((h, w)) < rng.uniform(0.02, 0.5)
        gt = rng.random((h, w)) < rng.uniform(0.02, 0.5)
        radius = rng.uniform(0.9, 4.0)
        p, g = np.argwhere(pred), np.argwhere(gt)
        if len(p) and len(g):
            near = ((p[:, None, :] - g[None, :, :]) ** 2).sum(-1) <= radius * radius
            expected = int((maximum_bipartite_matching(csr_matrix(near), perm_type="column") >= 0).sum())
        else:
            expected = 0
        assert _match_count(pred, gt, radius) == expected


def test_counts_use_bsds_thinning_and_maximum_matching():
    prob, gt = _synthetic(3, 48, 64)
    max_dist = 0.02
    c = boundary_counts(prob, gt, max_dist, num_thresholds=7)
    for k, thr in enumerate(_thresholds(7)):
        pred = bsds_thin(prob >= thr)
        matched = _match_count(pred, gt, _radius(48, 64, max_dist))
        np.testing.assert_array_equal(c[k], [matched, gt.sum(), matched, pred.sum()])


# --------------------------------------------------------------------------- pyEdgeEval


def test_thinning_identical_to_pyedgeeval():
    pe_thin = pytest.importorskip("pyEdgeEval.preprocess", reason="pyEdgeEval (+ opencv) not installed").binary_thin
    rng = np.random.default_rng(1)
    for i in range(150):
        h, w = rng.integers(3, 48, 2)
        if i % 3:
            mask = gaussian_filter(rng.random((h, w)), rng.uniform(0.5, 3)) > rng.uniform(0.45, 0.55)
        else:
            mask = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        np.testing.assert_array_equal(bsds_thin(mask), pe_thin(mask))


@pytest.mark.parametrize("max_dist", [0.011, 0.0075])
def test_counts_agree_with_pyedgeeval(max_dist):
    evaluate = pytest.importorskip(
        "pyEdgeEval.common.binary_label.evaluate_boundaries", reason="pyEdgeEval (+ opencv) not installed"
    ).evaluate_boundaries_threshold
    from pyEdgeEval.common.metrics import compute_rec_prec_f1, interpolated_max_scores
    from pyEdgeEval.common.utils import check_thresholds

    num_thresholds = 19  # the counts do not depend on T; fewer thresholds keep the reference fast
    thresholds = check_thresholds(num_thresholds)
    np.testing.assert_array_equal(thresholds, _thresholds(num_thresholds))
    data = [_synthetic(s, 96, 128) for s in range(2)]
    ours = np.stack([boundary_counts(p, g, max_dist, num_thresholds) for p, g in data])
    ref = np.stack([np.stack(evaluate(thresholds, p, g, max_dist=max_dist), axis=1) for p, g in data])
    np.testing.assert_array_equal(ours[..., [1, 3]], ref[..., [1, 3]])  # sumR, sumP: identical
    np.testing.assert_array_equal(ref[..., 0], ref[..., 2])
    deficit = ours[..., 0] - ref[..., 0]  # the reference's random shortfall (see the module doc)
    assert (deficit >= 0).all() and (deficit <= 0.01 * ours[..., 0] + 2).all()

    rec, prec, _ = compute_rec_prec_f1(*ref.sum(0).T)
    ref_ods = 100 * float(interpolated_max_scores(thresholds, rec, prec)[3])
    best = [c[np.argmax(compute_rec_prec_f1(*c.T)[2])] for c in ref]
    ref_ois = 100 * float(compute_rec_prec_f1(*np.sum(best, 0))[2])
    out = ods_f(np.stack([d[0] for d in data]), np.stack([d[1] for d in data]), max_dist, num_thresholds)
    assert 0 <= out["odsF"] - ref_ods < 0.5  # more matches at every threshold: never a lower odsF
    assert abs(out["oisF"] - ref_ois) < 0.5  # the per-image best threshold may move either way


# --------------------------------------------------------------------------- split level


def test_workers_give_the_same_result():
    data = [_synthetic(s, 32, 40) for s in range(3)]
    probs, gts = np.stack([d[0] for d in data]), np.stack([d[1] for d in data])
    assert ods_f(probs, gts, workers=2) == ods_f(probs, gts, workers=1)


def test_edge_metrics_over_batches_equals_ods_f():
    data = [_synthetic(s, 48, 64) for s in range(5)]
    probs = torch.from_numpy(np.stack([d[0] for d in data])).float()
    gts = torch.from_numpy(np.stack([d[1] for d in data]))
    gts[0, :, :5] = 255
    metric = EdgeMetrics(max_dist=0.0075)
    metric.update(probs[:2, None], gts[:2, None])
    metric.update(probs[2:], gts[2:])
    out = metric.compute()
    assert set(out) == {"odsF", "oisF", "ap"} and all(v.dtype == torch.float64 for v in out.values())
    expected = ods_f(probs, gts, max_dist=0.0075)
    assert {k: float(v) for k, v in out.items()} == pytest.approx(expected, abs=1e-12)
    metric.reset()
    metric.update(probs, gts)
    assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(expected, abs=1e-12)


def test_edge_metrics_cut_validation_padding_and_threads_agree():
    """Validation pads at the bottom/right with 255; the tolerance must use the original diagonal."""
    data = [_synthetic(s, 48, 64) for s in range(3)]
    probs = torch.from_numpy(np.stack([d[0] for d in data])).float()
    gts = torch.from_numpy(np.stack([d[1] for d in data]))
    expected = ods_f(probs, gts, max_dist=0.03)
    padded_p = torch.nn.functional.pad(probs, (0, 16, 0, 8), value=0.9)  # confident junk in the padding
    padded_t = torch.nn.functional.pad(gts, (0, 16, 0, 8), value=255)
    for workers in (1, 2):
        metric = EdgeMetrics(max_dist=0.03, workers=workers)
        metric.update(padded_p, padded_t)
        assert {k: float(v) for k, v in metric.compute().items()} == pytest.approx(expected, abs=1e-12)
    # without the cut, the larger diagonal (a larger radius) would change the numbers
    assert ods_f(padded_p, padded_t, max_dist=0.03) != pytest.approx(expected, abs=1e-6)


def test_edge_metrics_argument_checks():
    with pytest.raises(ValueError, match="max_dist"):
        EdgeMetrics(max_dist=0)
    with pytest.raises(ValueError, match="num_thresholds"):
        EdgeMetrics(max_dist=0.011, num_thresholds=0)
    with pytest.raises(ValueError, match="same shape"):
        EdgeMetrics(max_dist=0.011).update(torch.zeros(1, 8, 8), torch.zeros(1, 8, 9))
    assert math.isclose(EdgeMetrics(max_dist=0.011).max_dist, 0.011)
