"""Functional metrics: hand-worked examples, edge cases, and independent NumPy reimplementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from mtl_vision.metrics import functional as FM

# --------------------------------------------------------------------------- #
# NumPy references (straightforward, written independently of the torch code)
# --------------------------------------------------------------------------- #


def np_miou(labels: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int = 255) -> dict:
    valid = target != ignore_index
    ious = []
    for c in range(num_classes):  # same loop as the MTI-Net / InvPT SemsegMeter
        tp = np.sum((target == c) & (labels == c) & valid)
        fp = np.sum((target != c) & (labels == c) & valid)
        fn = np.sum((target == c) & (labels != c) & valid)
        ious.append(tp / max(tp + fp + fn, 1e-8))
    return {
        "mIoU": 100 * np.mean(ious),
        "pixel_acc": 100 * np.sum((labels == target) & valid) / np.sum(valid),
        "ious": 100 * np.array(ious),
    }


def np_depth(pred: np.ndarray, target: np.ndarray) -> dict:
    valid = target > 0
    p = np.maximum(pred[valid].astype(np.float64), 1e-9)
    g = target[valid].astype(np.float64)
    return {
        "rmse": np.sqrt(np.mean((p - g) ** 2)),
        "abs_err": np.mean(np.abs(p - g)),
        "abs_rel": np.mean(np.abs(p - g) / g),
        "log_rmse": np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2)),
        "delta1": 100 * np.mean(np.maximum(p / g, g / p) < 1.25),
    }


def np_normals(pred: np.ndarray, target: np.ndarray) -> dict:
    p = np.moveaxis(pred.astype(np.float64), 1, -1).reshape(-1, 3)
    g = np.moveaxis(target.astype(np.float64), 1, -1).reshape(-1, 3)
    valid = np.linalg.norm(g, axis=1) != 0
    p, g = p[valid], g[valid]
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    g = g / np.linalg.norm(g, axis=1, keepdims=True)
    deg = np.rad2deg(np.arccos(np.clip(np.sum(p * g, axis=1), -1, 1)))
    return {
        "mean": deg.mean(),
        "median": np.median(deg),
        "rmse": np.sqrt(np.mean(deg**2)),
        "within_11_25": 100 * np.mean(deg < 11.25),
        "within_22_5": 100 * np.mean(deg < 22.5),
        "within_30": 100 * np.mean(deg < 30),
    }


def np_max_f(prob: np.ndarray, target: np.ndarray, beta2: float = 0.3) -> float:
    valid = target != 255
    gt = (target == 1) & valid
    best = 0.0
    for k in range(1, 20):
        t = np.float32(k / 20)  # float32 probabilities are compared with float32 thresholds
        pr = (prob >= t) & valid
        tp, pp, gp = np.sum(pr & gt), np.sum(pr), np.sum(gt)
        if tp == 0 or pp == 0:
            continue
        p, r = tp / pp, tp / gp
        best = max(best, (1 + beta2) * p * r / (beta2 * p + r))
    return 100 * best


def np_ods_f_approx(prob: np.ndarray, target: np.ndarray, tolerance: float, num_thresholds: int = 99) -> float:
    n, h, w = prob.shape
    r = max(1, int(round(tolerance * math.hypot(h, w))))
    size = (1, 2 * r + 1, 2 * r + 1)  # square neighbourhood per image
    valid = target != 255
    gt = (target == 1) & valid
    near_gt = ndimage.maximum_filter(gt.astype(np.uint8), size=size, mode="constant") > 0
    best = 0.0
    for k in range(1, num_thresholds + 1):
        t = np.float32(k / (num_thresholds + 1))
        e = (prob >= t) & valid  # binarise, then dilate (the torch code pools first)
        near_e = ndimage.maximum_filter(e.astype(np.uint8), size=size, mode="constant") > 0
        pp, correct = e.sum(), (e & near_gt).sum()
        gp, recalled = gt.sum(), (gt & near_e).sum()
        if pp == 0 or correct == 0:
            continue
        p, rc = correct / pp, recalled / gp
        best = max(best, 2 * p * rc / (p + rc))
    return 100 * best


# --------------------------------------------------------------------------- #
# Segmentation
# --------------------------------------------------------------------------- #

LABELS = torch.tensor([[[0, 1, 2], [1, 1, 0]]])
TARGET = torch.tensor([[[0, 1, 1], [2, 1, 255]]])


def test_miou_hand_worked():
    # valid (target, pred) pairs: (0,0) (1,1) (1,2) (2,1) (1,1); the 255 pixel is skipped
    # class 0: TP 1, FP 0, FN 0 -> 100 ; class 1: TP 2, FP 1, FN 1 -> 50 ; class 2: TP 0, FP 1, FN 1 -> 0
    out = FM.miou(LABELS, TARGET, num_classes=3, class_names=["bg", "a", "b"])
    assert out == pytest.approx({"mIoU": 50.0, "pixel_acc": 60.0, "IoU/bg": 100.0, "IoU/a": 50.0, "IoU/b": 0.0})
    # default names are the class ids; (N, 1, H, W) is accepted
    out = FM.miou(LABELS[:, None], TARGET[:, None], num_classes=3)
    assert out["IoU/1"] == pytest.approx(50.0)


def test_miou_ignore_index_excluded():
    labels = LABELS.clone()
    labels[0, 1, 2] = 2  # the pixel under target 255 changes prediction: nothing moves
    assert FM.miou(labels, TARGET, 3) == pytest.approx(FM.miou(LABELS, TARGET, 3))
    # a custom ignore_index: ignoring class-2 target pixels instead (255 then must be a real class -> error)
    with pytest.raises(ValueError, match="target"):
        FM.miou(LABELS, TARGET, 3, ignore_index=2)
    target = TARGET.clone()
    target[0, 1, 2] = 0
    out = FM.miou(LABELS, target, 3, ignore_index=2)
    # valid pairs: (0,0) (1,1) (1,2) (1,1) (0,0): class0 2/2, class1 2/3, class2 TP0 FP1 FN0 -> 0
    assert out["IoU/0"] == pytest.approx(100.0)
    assert out["IoU/1"] == pytest.approx(200 / 3)
    assert out["IoU/2"] == pytest.approx(0.0)
    assert out["pixel_acc"] == pytest.approx(80.0)


def test_miou_absent_class_counts_as_zero():
    # class 3 never occurs in target nor prediction: IoU 0 and still part of the mean (MTI-Net / InvPT)
    out = FM.miou(LABELS, TARGET, num_classes=4)
    assert out["IoU/3"] == 0.0
    assert out["mIoU"] == pytest.approx((100 + 50 + 0 + 0) / 4)


def test_miou_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        FM.miou(LABELS, TARGET, num_classes=0)
    with pytest.raises(ValueError, match="class_names"):
        FM.miou(LABELS, TARGET, num_classes=3, class_names=["a"])
    with pytest.raises(ValueError, match="integer"):
        FM.miou(LABELS.float(), TARGET, num_classes=3)
    with pytest.raises(ValueError, match="same shape"):
        FM.miou(LABELS[:, :1], TARGET, num_classes=3)
    with pytest.raises(ValueError, match="labels"):
        FM.miou(LABELS + 1, TARGET, num_classes=3)  # predicted id 3 out of range


def test_miou_matches_numpy():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (4, 17, 23), generator=g)
    target = torch.randint(0, 6, (4, 17, 23), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    labels[labels == 5] = 0  # make class 5 only a target class
    out = FM.miou(labels, target, num_classes=7)  # class 6 is empty
    ref = np_miou(labels.numpy(), target.numpy(), 7)
    assert out["mIoU"] == pytest.approx(ref["mIoU"], rel=1e-12)
    assert out["pixel_acc"] == pytest.approx(ref["pixel_acc"], rel=1e-12)
    assert [out[f"IoU/{c}"] for c in range(7)] == pytest.approx(ref["ious"].tolist(), rel=1e-12)


# --------------------------------------------------------------------------- #
# Depth
# --------------------------------------------------------------------------- #


def test_depth_hand_worked():
    pred = torch.tensor([[[1.0, 2.0], [4.0, 7.0]]])
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # last pixel invalid (no depth)
    # valid errors 0, 1, 2 ; relative 0, 1, 1 ; log ratios 0, ln2, ln2 ; ratios 1, 2, 2
    out = FM.depth_errors(pred, target)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert out["abs_rel"] == pytest.approx(2 / 3)
    assert out["log_rmse"] == pytest.approx(math.sqrt(2 * math.log(2) ** 2 / 3))
    assert out["delta1"] == pytest.approx(100 / 3)
    # channel dim accepted; half precision upcast (all values exactly representable)
    out16 = FM.depth_errors(pred[:, None].half(), target[:, None])
    assert out16 == pytest.approx(out)
    outbf = FM.depth_errors(pred.bfloat16(), target.bfloat16())
    assert outbf == pytest.approx(out)


def test_depth_delta1_boundary_and_invalid_pixels():
    # ratio exactly 1.25 is not within (strict <), 1.2 is; negative / nan target pixels are invalid
    pred = torch.tensor([[[1.25, 1.2, 5.0, 5.0]]], dtype=torch.float64)
    target = torch.tensor([[[1.0, 1.0, -1.0, float("nan")]]], dtype=torch.float64)
    out = FM.depth_errors(pred, target)
    assert out["delta1"] == pytest.approx(50.0)
    assert out["rmse"] == pytest.approx(math.sqrt((0.25**2 + 0.2**2) / 2))


def test_depth_split_rmse_is_not_mean_of_image_rmse():
    # image A: one valid pixel, error 3 ; image B: four valid pixels, error 0 (+ invalid ones)
    pred = torch.tensor([[[4.0, 9.0, 9.0], [9.0, 9.0, 9.0]], [[1.0, 1.0, 1.0], [1.0, 5.0, 5.0]]])
    target = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    out = FM.depth_errors(pred, target)
    assert out["rmse"] == pytest.approx(math.sqrt(9 / 5))  # pooled over the 5 valid pixels
    per_image = [FM.depth_errors(pred[i : i + 1], target[i : i + 1])["rmse"] for i in range(2)]
    assert per_image == pytest.approx([3.0, 0.0])
    assert np.mean(per_image) == pytest.approx(1.5)
    assert out["rmse"] != pytest.approx(np.mean(per_image))


def test_depth_nonpositive_prediction_clamped():
    pred = torch.tensor([[[-1.0, 0.0]]])
    target = torch.tensor([[[1.0, 2.0]]])
    out = FM.depth_errors(pred, target)
    eps = 1e-9
    assert out["rmse"] == pytest.approx(math.sqrt(((1 - eps) ** 2 + (2 - eps) ** 2) / 2))
    assert out["log_rmse"] == pytest.approx(math.sqrt((math.log(eps / 1) ** 2 + math.log(eps / 2) ** 2) / 2))
    assert out["abs_rel"] == pytest.approx(((1 - eps) / 1 + (2 - eps) / 2) / 2)
    assert out["delta1"] == 0.0
    assert all(math.isfinite(v) for v in out.values())


def test_depth_argument_errors():
    with pytest.raises(ValueError, match="pred"):
        FM.depth_errors(torch.rand(2, 2, 3, 3), torch.rand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="same shape"):
        FM.depth_errors(torch.rand(2, 3, 3), torch.rand(2, 3, 4))


def test_depth_matches_numpy():
    g = torch.Generator().manual_seed(1)
    target = torch.rand(3, 19, 21, generator=g) * 10
    target[torch.rand(target.shape, generator=g) < 0.2] = 0
    pred = target + torch.randn(target.shape, generator=g)  # some predictions <= 0
    assert (pred <= 0).any()
    out = FM.depth_errors(pred, target)
    ref = np_depth(pred.numpy(), target.numpy())
    assert out == pytest.approx(ref, rel=1e-10)


# --------------------------------------------------------------------------- #
# Normals
# --------------------------------------------------------------------------- #


def _normals_example() -> tuple[torch.Tensor, torch.Tensor]:
    c20, s20 = math.cos(math.radians(20)), math.sin(math.radians(20))
    c25, s25 = math.cos(math.radians(25)), math.sin(math.radians(25))
    pred_vecs = [
        (3.0, 0.0, 0.0),  # 0 deg (scale does not matter)
        (0.0, 1.0, 0.0),  # 90
        (1.0, 1.0, 0.0),  # 45
        (-2.0, 0.0, 0.0),  # 180
        (c20, s20, 0.0),  # 20
        (c25, 0.0, s25),  # 25
        (0.0, 0.0, 0.0),  # zero prediction -> 90
        (1.0, 0.0, 0.0),  # invalid target pixel, skipped
    ]
    target_vecs = [(2.0, 0.0, 0.0)] * 7 + [(0.0, 0.0, 0.0)]
    pred = torch.tensor(pred_vecs, dtype=torch.float64).T.reshape(1, 3, 2, 4)
    target = torch.tensor(target_vecs, dtype=torch.float64).T.reshape(1, 3, 2, 4)
    return pred, target


def test_normals_hand_worked():
    pred, target = _normals_example()
    angles = [0, 90, 45, 180, 20, 25, 90]
    out = FM.normal_errors(pred, target)
    assert out["mean"] == pytest.approx(sum(angles) / 7)
    assert out["median"] == pytest.approx(45.0)
    assert out["rmse"] == pytest.approx(math.sqrt(sum(a * a for a in angles) / 7))
    assert out["within_11_25"] == pytest.approx(100 / 7)
    assert out["within_22_5"] == pytest.approx(200 / 7)
    assert out["within_30"] == pytest.approx(300 / 7)
    # float32 / bfloat16 predictions give the same numbers up to their rounding
    out32 = FM.normal_errors(pred.float(), target.float())
    assert out32 == pytest.approx(out, abs=1e-4)
    outbf = FM.normal_errors(pred.bfloat16(), target.float())
    assert outbf["mean"] == pytest.approx(out["mean"], abs=0.5)


def test_normals_even_count_median_and_no_valid_pixels():
    pred, target = _normals_example()
    target[0, :, 0, 0] = 0  # drop the 0-degree pixel: angles 90 45 180 20 25 90 -> median (45 + 90) / 2
    assert FM.normal_errors(pred, target)["median"] == pytest.approx(67.5)
    out = FM.normal_errors(pred, torch.zeros_like(target))
    assert all(math.isnan(v) for v in out.values())


def test_normals_argument_errors():
    with pytest.raises(ValueError, match="pred"):
        FM.normal_errors(torch.rand(2, 2, 3, 3), torch.rand(2, 2, 3, 3))
    with pytest.raises(ValueError, match="target"):
        FM.normal_errors(torch.rand(2, 3, 3, 3), torch.rand(2, 3, 3, 4))


def test_normals_matches_numpy():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(3, 3, 15, 18, generator=g, dtype=torch.float64)
    pred = target + 0.7 * torch.randn(target.shape, generator=g, dtype=torch.float64)
    target[:, :, :3] = 0  # invalid rows
    out = FM.normal_errors(pred, target)
    ref = np_normals(pred.numpy(), target.numpy())
    for k in ("mean", "median", "rmse"):
        assert out[k] == pytest.approx(ref[k], abs=1e-6), k
    for k in ("within_11_25", "within_22_5", "within_30"):
        assert out[k] == pytest.approx(ref[k], abs=1e-9), k


# --------------------------------------------------------------------------- #
# Saliency
# --------------------------------------------------------------------------- #


def test_max_f_hand_worked():
    prob = torch.tensor([[[0.9, 0.6, 0.3, 0.8, 0.2, 0.1, 0.95]]])
    target = torch.tensor([[[1, 1, 1, 0, 0, 0, 255]]])  # the 0.95 pixel is ignored
    # thresholds 0.25 / 0.30: predicted {0.9, 0.6, 0.3, 0.8} -> TP 3, PP 4, GT 3 -> P 0.75, R 1
    # -> F = 1.3 * 0.75 / (0.3 * 0.75 + 1) = 0.7959..., the best of the 19 thresholds:
    #   t <= 0.10: P 1/2 R 1 -> 0.5652 ; 0.15-0.20: P 3/5 R 1 -> 0.6610 ; 0.35-0.60: P 2/3 R 2/3 -> 0.6667
    #   0.65-0.80: P 1/2 R 1/3 -> 0.4483 ; 0.85-0.90: P 1 R 1/3 -> 0.6842 ; 0.95: no prediction -> 0
    expected = 100 * 1.3 * 0.75 / (0.3 * 0.75 + 1)
    assert FM.max_f(prob, target)["maxF"] == pytest.approx(expected)
    assert FM.max_f(prob[:, None].half(), target[:, None])["maxF"] == pytest.approx(expected)
    assert FM.max_f(prob.bfloat16(), target.float())["maxF"] == pytest.approx(expected)


def test_max_f_threshold_is_inclusive():
    # prob == 0.05 is predicted positive at t = 0.05 (>=, ATRC / InvPT); with > it would never be
    prob = torch.tensor([[[0.05, 0.0]]])
    target = torch.tensor([[[1, 0]]])
    assert FM.max_f(prob, target)["maxF"] == pytest.approx(100.0)
    assert FM.max_f(prob.half(), target)["maxF"] == pytest.approx(100.0)


def test_max_f_degenerate_is_zero():
    prob = torch.zeros(1, 4, 4)
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    assert FM.max_f(prob, target)["maxF"] == 0.0  # no predicted, no GT positives: F undefined -> 0


def test_max_f_matches_numpy():
    g = torch.Generator().manual_seed(3)
    target = (torch.rand(4, 16, 20, generator=g) < 0.3).long()
    prob = (0.5 * target + 0.6 * torch.rand(target.shape, generator=g)).clamp(0, 1)
    prob[0, 0, :5] = torch.tensor([0.05, 0.1, 0.5, 0.7, 0.95])  # exact ties with thresholds
    target[torch.rand(target.shape, generator=g) < 0.05] = 255
    out = FM.max_f(prob, target)["maxF"]
    assert out == pytest.approx(np_max_f(prob.numpy(), target.numpy()), rel=1e-12)
    assert 0 < out < 100


# --------------------------------------------------------------------------- #
# Edge (approximate odsF)
# --------------------------------------------------------------------------- #


def _edge_example() -> tuple[torch.Tensor, torch.Tensor]:
    # 10x10 image, diagonal 14.1: tolerance 0.0075 -> r = max(1, round(0.106)) = 1 px
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :, 4] = 1  # GT vertical line, column 4, 10 px
    prob = torch.zeros(1, 10, 10)
    prob[0, :5, 5] = 0.8  # 1 px off the GT line (within tolerance), rows 0-4
    prob[0, :5, 9] = 0.9  # 5 px off (outside tolerance), rows 0-4
    return prob, target


def test_ods_f_approx_hand_worked():
    prob, target = _edge_example()
    # t <= 0.8: 10 predicted, 5 correct -> P 0.5 ; GT rows 0-5 recalled (row 5 via the diagonal of
    # the square neighbourhood) -> R 0.6 -> F = 2 * 0.5 * 0.6 / 1.1 ; 0.8 < t <= 0.9: P 0, R 0 -> 0
    expected = 100 * 2 * 0.5 * 0.6 / 1.1
    assert FM.ods_f_approx(prob, target, tolerance=0.0075)["odsF_approx"] == pytest.approx(expected)
    assert FM.ods_f_approx(prob[:, None].half(), target[:, None], 0.0075)["odsF_approx"] == pytest.approx(expected)
    # tolerance 0.36 -> r = round(5.09) = 5: the far line matches too; every GT row is within 5 rows of 0-4
    assert FM.ods_f_approx(prob, target, tolerance=0.36)["odsF_approx"] == pytest.approx(100.0)
    # tolerance 0.3 -> r = 4: far line still unmatched, GT rows 0-8 recalled -> P 0.5, R 0.9
    assert FM.ods_f_approx(prob, target, tolerance=0.3)["odsF_approx"] == pytest.approx(100 * 0.9 / 1.4)


def test_ods_f_approx_offsets_and_ignore():
    target = torch.zeros(1, 10, 10, dtype=torch.long)
    target[0, :, 4] = 1
    near = torch.zeros(1, 10, 10)
    near[0, :, 5] = 0.7  # whole line offset by 1 px -> perfect within tolerance
    assert FM.ods_f_approx(near, target, 0.0075)["odsF_approx"] == pytest.approx(100.0)
    far = torch.zeros(1, 10, 10)
    far[0, :, 8] = 0.7  # offset by 4 px -> nothing matches
    assert FM.ods_f_approx(far, target, 0.0075)["odsF_approx"] == 0.0
    # predictions inside an ignored region neither count as false positives nor recall GT
    target_ign = target.clone()
    target_ign[0, :, 8:] = 255
    both = near.clone()
    both[0, :, 8] = 0.9
    assert FM.ods_f_approx(both, target_ign, 0.0075)["odsF_approx"] == pytest.approx(100.0)


def test_ods_f_approx_argument_errors():
    prob, target = _edge_example()
    with pytest.raises(ValueError, match="tolerance"):
        FM.ods_f_approx(prob, target, tolerance=0.0)
    with pytest.raises(ValueError, match="num_thresholds"):
        FM.ods_f_approx(prob, target, tolerance=0.01, num_thresholds=0)


def test_ods_f_approx_matches_naive_per_threshold_dilation():
    # the implementation pools the probability map once; the reference binarises then dilates per threshold
    g = torch.Generator().manual_seed(4)
    target = (torch.rand(3, 24, 30, generator=g) < 0.05).long()
    prob = torch.rand(target.shape, generator=g) ** 3
    target[:, :2] = 255
    for tol in (0.0075, 0.05):
        out = FM.ods_f_approx(prob, target, tol)["odsF_approx"]
        assert out == pytest.approx(np_ods_f_approx(prob.numpy(), target.numpy(), tol), rel=1e-12)
        assert 0 < out < 100
    out = FM.ods_f_approx(prob, target, 0.05, num_thresholds=9)["odsF_approx"]
    assert out == pytest.approx(np_ods_f_approx(prob.numpy(), target.numpy(), 0.05, num_thresholds=9), rel=1e-12)


def test_perfect_predictions_give_the_ideal_values():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (2, 16, 20), generator=g)
    assert FM.miou(labels, labels, num_classes=5)["mIoU"] == pytest.approx(100.0)
    depth = torch.rand(2, 16, 20, generator=g) + 0.5
    assert FM.depth_errors(depth, depth) == pytest.approx({"rmse": 0.0, "abs_err": 0.0, "abs_rel": 0.0, "log_rmse": 0.0, "delta1": 100.0})
    normals = torch.nn.functional.normalize(torch.randn(2, 3, 16, 20, generator=g), dim=1)
    out = FM.normal_errors(normals, normals)
    assert out["mean"] == pytest.approx(0.0, abs=1e-5) and out["within_11_25"] == pytest.approx(100.0)
    mask = (torch.rand(2, 16, 20, generator=g) > 0.7).float()
    assert FM.max_f(mask, mask)["maxF"] == pytest.approx(100.0)
    edges = torch.zeros(1, 40, 60)
    edges[0, 5:35, 20] = 1
    # AP sums precision at recall levels 0, 0.01, ..., 0.99 and divides by 101, as pyEdgeEval does
    assert FM.ods_f(edges, edges, max_dist=0.011) == pytest.approx({"odsF": 100.0, "oisF": 100.0, "ap": 10000 / 101})
    assert FM.ods_f(torch.zeros_like(edges), edges, max_dist=0.011)["odsF"] == 0.0
