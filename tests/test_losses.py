"""Per-task losses on hand-worked cases; invalid pixels never contribute."""

from __future__ import annotations

import math

import pytest
import torch

from mtl_vision import losses
from mtl_vision.losses import MultiTaskLoss


def test_cross_entropy_ignores_255():
    raw = torch.zeros(1, 2, 1, 2)
    raw[0, 0, 0, 0] = math.log(3.0)  # pixel 0: p(class 0) = 3/4
    target = torch.tensor([[[0, 255]]])
    assert losses.cross_entropy(raw, target).item() == pytest.approx(-math.log(0.75))


def test_cross_entropy_all_ignored_is_zero_with_graph():
    raw = torch.randn(1, 3, 2, 2, requires_grad=True)
    loss = losses.cross_entropy(raw, torch.full((1, 2, 2), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert raw.grad is not None and raw.grad.abs().sum() == 0


def test_depth_l1_on_valid_pixels_only():
    raw = torch.tensor([[[[1.0, 5.0, 100.0]]]])
    target = torch.tensor([[[[2.0, 3.0, 0.0]]]])  # last pixel invalid
    assert losses.depth_l1(raw, target).item() == pytest.approx((1.0 + 2.0) / 2)


def test_normals_loss_normalises_prediction_and_masks_invalid():
    raw = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]], [[0.0, 7.0]]]])  # (1,3,1,2): +x (scaled), +z
    target = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]], [[0.0, 0.0]]]])  # pixel 1 invalid (all zero)
    assert losses.normals_loss(raw, target).item() == pytest.approx(0.0, abs=1e-6)
    target_y = torch.tensor([[[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 0.0]]]])
    # |(1,0,0) - (0,1,0)|_1 = 2 over 3 channels of the one valid pixel
    assert losses.normals_loss(raw, target_y).item() == pytest.approx(2.0 / 3.0, abs=1e-6)
    # ATRC / InvPT: the three channels' differences summed per pixel
    assert losses.normals_loss(raw, target_y, channels="sum").item() == pytest.approx(2.0, abs=1e-6)
    with pytest.raises(ValueError, match="channels"):
        losses.normals_loss(raw, target_y, channels="median")
    with pytest.raises(ValueError, match="distance"):
        losses.normals_loss(raw, target_y, distance="angle")


def test_balanced_bce_matches_its_formula():
    raw = torch.tensor([[[[0.0, 2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 255.0]]]])
    w = 0.8
    p0, p1 = 0.5, 1 / (1 + math.exp(-2.0))
    expected = (w * -math.log(p0) + (1 - w) * -math.log(1 - p1)) / 2  # two valid pixels
    assert losses.balanced_bce(raw, target, pos_weight=w).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="pos_weight"):
        losses.balanced_bce(raw, target, pos_weight=1.5)


def test_bce_plain_mean():
    raw = torch.tensor([[[[0.0, 0.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    assert losses.saliency_bce(raw, target).item() == pytest.approx(math.log(2.0))


def test_two_class_saliency_loss_is_the_balanced_cross_entropy_of_astmt():
    # logits of (background, salient) for 4 pixels, one ignored; 1 salient of 3 valid
    raw = torch.tensor([[[[0.5, -1.0, 2.0, 0.0]], [[1.5, 0.0, -0.5, 3.0]]]])
    target = torch.tensor([[[[1.0, 0.0, 0.0, 255.0]]]])
    ce = [-torch.log_softmax(raw[0, :, 0, i], dim=0)[int(target[0, 0, 0, i])].item() for i in range(3)]
    assert losses.saliency_bce(raw, target).item() == pytest.approx(sum(ce) / 3, rel=1e-6)
    # class weights (1 - w, w), w = share of background among valid pixels (2/3); sum / valid pixels
    w = 2 / 3
    expected = (w * ce[0] + (1 - w) * ce[1] + (1 - w) * ce[2]) / 3
    assert losses.saliency_bce(raw, target, balanced=True).item() == pytest.approx(expected, rel=1e-6)
    # the one-logit form of the same head: the logit difference
    diff = raw[:, 1:] - raw[:, :1]
    assert losses.saliency_bce(diff, target, balanced=True).item() == pytest.approx(expected, rel=1e-6)


def test_multitask_loss_applies_task_kwargs_and_checks_keys():
    crit = MultiTaskLoss(tasks=["edge", "depth"], task_kwargs={"edge": {"pos_weight": 0.8}, "semseg": {}})
    preds = {"edge": torch.zeros(1, 1, 2, 2), "depth": torch.ones(1, 1, 2, 2)}
    targets = {"edge": torch.ones(1, 1, 2, 2), "depth": torch.full((1, 1, 2, 2), 3.0)}
    out = crit(preds, targets)
    assert set(out) == {"edge", "depth"}
    assert out["edge"].item() == pytest.approx(0.8 * math.log(2.0))
    assert out["depth"].item() == pytest.approx(2.0)
    with pytest.raises(ValueError, match="missing"):
        crit({"edge": preds["edge"]}, targets)
    with pytest.raises(ValueError, match="size"):
        crit({"edge": torch.zeros(1, 1, 3, 3), "depth": preds["depth"]}, targets)
    with pytest.raises(ValueError, match="unknown task"):
        MultiTaskLoss(tasks=["sementic"])


def test_a_task_without_final_prediction_is_scored_by_its_weighted_aux_predictions():
    """MTI-Net's auxiliary tasks (decoder.auxiliary_tasks): normals only in the deep supervision."""
    crit = MultiTaskLoss(tasks=["depth", "normals"], aux_weights={"scale_8": 0.5})
    depth = torch.full((1, 1, 2, 2), 3.0)
    normals = torch.zeros(1, 3, 2, 2)
    normals[:, 2] = 1.0
    targets = {"depth": depth, "normals": normals}
    off = torch.zeros(1, 3, 2, 2)
    off[:, 0] = 1.0  # |(1,0,0) - (0,0,1)|_1 = 2 over 3 channels
    preds = {
        "depth": torch.ones(1, 1, 2, 2),
        "aux": {"scale_4": {"depth": depth.clone(), "normals": off}, "scale_8": {"normals": off.clone()}},
    }
    out = crit(preds, targets)
    assert list(out) == ["depth", "normals"]
    assert out["depth"].item() == pytest.approx(2.0)  # final 2 + aux 0
    assert out["normals"].item() == pytest.approx(2 / 3 + 0.5 * 2 / 3)
    assert set(crit.last_aux) == {"depth/scale_4", "normals/scale_4", "normals/scale_8"}
    # a task with neither a final nor a weighted aux prediction has no loss: refused by name
    silent = MultiTaskLoss(tasks=["depth", "normals"], aux_weight=0.0)
    with pytest.raises(ValueError, match=r"\['normals'\]"):
        silent(preds, targets)


def test_cosine_normals_loss_is_one_minus_the_mean_dot_product_over_valid_pixels():
    """EMA-Net's (and MTAN's) normals loss: 1 - sum(pred_unit . gt * mask) / valid pixels."""
    torch.manual_seed(0)
    raw = torch.randn(2, 3, 4, 5)
    target = torch.nn.functional.normalize(torch.randn(2, 3, 4, 5), dim=1)
    target[0, :, 1, 2] = 0.0  # invalid
    mask = (target.sum(dim=1, keepdim=True) != 0).float()
    unit = raw / raw.norm(dim=1, keepdim=True)
    expected = 1 - ((unit * target) * mask).sum() / mask.sum()
    assert losses.normals_loss(raw, target, distance="cosine").item() == pytest.approx(expected.item(), abs=1e-6)
