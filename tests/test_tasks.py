"""The task registry is consistent: every task's metric yields its primary key, every colour map
gives RGB pictures, and activations produce predictions in target units."""

from __future__ import annotations

import pytest
import torch

from mtl_vision.tasks import TASKS, get_task

N, H, W = 2, 8, 10


def _target(task: str, classes: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if TASKS[task].is_classification:
        return torch.randint(0, classes, (N, H, W), generator=g)
    if task == "depth":
        return torch.rand(N, 1, H, W, generator=g) * 5 + 0.5
    if task == "normals":
        return torch.nn.functional.normalize(torch.randn(N, 3, H, W, generator=g), dim=1)
    return (torch.rand(N, 1, H, W, generator=g) > 0.7).float()


@pytest.mark.parametrize("task", sorted(TASKS))
def test_task_spec_end_to_end(task):
    spec = get_task(task)
    channels = spec.out_channels(4)
    raw = torch.randn(N, channels, H, W, requires_grad=True)
    target = _target(task)
    loss = spec.loss(raw, target)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert raw.grad.abs().sum() > 0

    pred = spec.activate(raw.detach())
    metric = spec.metric(num_classes=channels, class_names=None, edge_tolerance=0.011)
    metric.update(pred, target)
    values = metric.compute()
    assert spec.selection_key in values and torch.isfinite(values[spec.selection_key])

    for picture in (spec.colorize(pred), spec.colorize(target)):
        assert picture.shape == (N, 3, H, W)
        assert 0.0 <= picture.min() and picture.max() <= 1.0


def test_perfect_predictions_score_best():
    seg = _target("semseg")
    metric = TASKS["semseg"].metric(num_classes=4, class_names=None, edge_tolerance=0.011)
    metric.update(seg, seg)
    assert metric.compute()["mIoU"] == pytest.approx(100.0)
    depth = _target("depth")
    metric = TASKS["depth"].metric(num_classes=1, edge_tolerance=0.011)
    metric.update(depth, depth)
    assert metric.compute()["rmse"] == pytest.approx(0.0, abs=1e-6)


def test_unknown_task_and_missing_class_count():
    with pytest.raises(ValueError, match="known tasks"):
        get_task("segmentation")
    with pytest.raises(ValueError, match="number of classes"):
        TASKS["semseg"].out_channels(None)
