"""Metric classes: uneven batching == functional on the whole split; reset; state merging (DDP stand-in)."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torchmetrics import Metric

from mtl_vision.metrics import (
    DepthMetrics,
    EdgeApproxMetrics,
    NormalMetrics,
    SaliencyMetrics,
    SegmentationMetrics,
    functional,
)

BATCH_SIZES = (1, 4, 2, 3)  # uneven on purpose: per-batch averaging would be visibly wrong
N = sum(BATCH_SIZES)


def _split(x: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.split(x, list(BATCH_SIZES)))


def _seg_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randint(0, 5, (N, 12, 14), generator=g)
    # images differ a lot in quality, so batch-mean IoU != split IoU
    labels = torch.where(torch.rand(target.shape, generator=g) < torch.linspace(0.1, 0.9, N)[:, None, None],
                         target, torch.randint(0, 5, target.shape, generator=g))
    target[torch.rand(target.shape, generator=g) < 0.1] = 255
    return labels, target


def _depth_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.rand(N, 1, 12, 14, generator=g) * 8
    target[torch.rand(target.shape, generator=g) < 0.3] = 0
    pred = (target + torch.randn(target.shape, generator=g) * torch.linspace(0.1, 2, N)[:, None, None, None]).abs()
    return pred, target


def _normal_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = torch.randn(N, 3, 12, 14, generator=g)
    pred = target + 0.8 * torch.randn(target.shape, generator=g)
    target[:, :, :2] = 0  # invalid pixels
    return pred, target


def _sal_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = (torch.rand(N, 12, 14, generator=g) < 0.3).long()
    prob = (0.4 * target + 0.7 * torch.rand(target.shape, generator=g)).clamp(0, 1)
    target[torch.rand(target.shape, generator=g) < 0.05] = 255
    return prob, target


def _edge_data(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    target = (torch.rand(N, 1, 20, 24, generator=g) < 0.05).long()
    prob = torch.rand(target.shape, generator=g) ** 3
    return prob, target


CASES: list[tuple[str, Callable[[], Metric], Callable, Callable[[torch.Tensor, torch.Tensor], dict]]] = [
    ("seg", lambda: SegmentationMetrics(6, class_names=list("abcdef")), _seg_data,
     lambda p, t: functional.miou(p, t, 6, class_names=list("abcdef"))),
    ("depth", DepthMetrics, _depth_data, functional.depth_errors),
    ("normals", NormalMetrics, _normal_data, functional.normal_errors),
    ("saliency", SaliencyMetrics, _sal_data, functional.max_f),
    ("edge", lambda: EdgeApproxMetrics(tolerance=0.05), _edge_data,
     lambda p, t: functional.ods_f_approx(p, t, 0.05)),
]
IDS = [c[0] for c in CASES]


def _assert_matches(computed: dict[str, torch.Tensor], expected: dict[str, float], name: str) -> None:
    assert set(computed) == set(expected)
    for k, v in expected.items():
        got = computed[k]
        assert isinstance(got, torch.Tensor) and got.ndim == 0, k
        if name == "normals" and k == "median":
            assert float(got) == pytest.approx(v, abs=0.01), k  # histogram resolution (0.01 deg bins)
        else:
            assert float(got) == pytest.approx(v, rel=1e-9, abs=1e-9), k


@pytest.mark.parametrize(("name", "make", "data", "fn"), CASES, ids=IDS)
def test_batched_equals_functional_on_split(name, make, data, fn):
    pred, target = data(torch.Generator().manual_seed(10))
    expected = fn(pred, target)
    metric = make()
    for p, t in zip(_split(pred), _split(target)):
        metric.update(p, t)
    _assert_matches(metric.compute(), expected, name)
    # the split value is NOT the mean of per-batch values (so accumulating really matters)
    main_key = next(iter(expected))
    per_batch = [fn(p, t)[main_key] for p, t in zip(_split(pred), _split(target))]
    assert sum(per_batch) / len(per_batch) != pytest.approx(expected[main_key], rel=1e-6)


@pytest.mark.parametrize(("name", "make", "data", "fn"), CASES, ids=IDS)
def test_reset(name, make, data, fn):
    g = torch.Generator().manual_seed(11)
    pred, target = data(g)
    other_pred, other_target = data(g)
    metric = make()
    metric.update(other_pred, other_target)
    metric.compute()
    metric.reset()
    for p, t in zip(_split(pred), _split(target)):
        metric.update(p, t)
    _assert_matches(metric.compute(), fn(pred, target), name)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # `summed` gets its states without update()
@pytest.mark.parametrize(("name", "make", "data", "fn"), CASES, ids=IDS)
def test_merge_state_equals_whole(name, make, data, fn):
    pred, target = data(torch.Generator().manual_seed(12))
    expected = fn(pred, target)
    cut = 3  # uneven halves, like two DDP ranks with different numbers of images
    first, second = make(), make()
    first.update(pred[:cut], target[:cut])
    second.update(pred[cut:], target[cut:])

    # summing raw states, which is exactly what the DDP "sum" reduction does
    summed = make()
    for state in summed._defaults:
        setattr(summed, state, getattr(first, state) + getattr(second, state))
    _assert_matches(summed.compute(), expected, name)

    first.merge_state(second)
    _assert_matches(first.compute(), expected, name)


@pytest.mark.parametrize(("name", "make", "data", "fn"), CASES, ids=IDS)
def test_forward_returns_batch_value_and_accumulates(name, make, data, fn):
    pred, target = data(torch.Generator().manual_seed(13))
    metric = make()
    batches = list(zip(_split(pred), _split(target)))
    for p, t in batches:
        _assert_matches(metric(p, t), fn(p, t), name)
    _assert_matches(metric.compute(), fn(pred, target), name)


def test_states_are_summable_high_precision_types():
    for metric in (SegmentationMetrics(3), DepthMetrics(), NormalMetrics(), SaliencyMetrics(), EdgeApproxMetrics(0.01)):
        assert not metric.full_state_update
        for name, reduce_fx in metric._reductions.items():
            assert reduce_fx is not None, name  # "sum"
            assert getattr(metric, name).dtype in (torch.int64, torch.float64), name


def test_low_precision_predictions():
    g = torch.Generator().manual_seed(14)
    pred, target = _depth_data(g)
    m = DepthMetrics()
    m.update(pred.half(), target)
    expected = functional.depth_errors(pred.half().float(), target)
    _assert_matches(m.compute(), expected, "depth")

    pred, target = _normal_data(g)
    m = NormalMetrics()
    m.update(pred.bfloat16(), target.bfloat16())
    expected = functional.normal_errors(pred.bfloat16().double(), target.bfloat16().double())
    _assert_matches(m.compute(), expected, "normals")

    prob, target = _sal_data(g)
    m = SaliencyMetrics()
    m.update(prob.half(), target)
    assert float(m.compute()["maxF"]) == pytest.approx(functional.max_f(prob.half(), target)["maxF"])

    prob, target = _edge_data(g)
    m = EdgeApproxMetrics(0.05)
    m.update(prob.bfloat16(), target)
    assert float(m.compute()["odsF_approx"]) == pytest.approx(
        functional.ods_f_approx(prob.bfloat16(), target, 0.05)["odsF_approx"]
    )


def test_normal_histogram_median_resolution():
    # angles chosen with a large gap between the two middle values: the median must not snap to a bin edge
    pred, target = _normal_data(torch.Generator().manual_seed(15))
    for width in (0.01, 0.5, 3.0):
        m = NormalMetrics(bin_width_deg=width)
        for p, t in zip(_split(pred), _split(target)):
            m.update(p, t)
        exact = functional.normal_errors(pred, target)["median"]
        assert abs(float(m.compute()["median"]) - exact) < width
    # two samples, 0 and 90 deg: exact median 45
    pred2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]).T.reshape(1, 3, 1, 2)
    target2 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 2)
    m = NormalMetrics()
    m.update(pred2, target2)
    assert float(m.compute()["median"]) == pytest.approx(45.0, abs=0.01)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_empty_metric_compute_is_nan_not_crash():
    out = NormalMetrics().compute()
    assert all(math.isnan(float(v)) for v in out.values())
    assert math.isnan(float(DepthMetrics().compute()["rmse"]))
    assert float(SaliencyMetrics().compute()["maxF"]) == 0.0


def test_constructor_argument_errors():
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationMetrics(0)
    with pytest.raises(ValueError, match="class_names"):
        SegmentationMetrics(3, class_names=["a", "b"])
    with pytest.raises(ValueError, match="bin_width_deg"):
        NormalMetrics(bin_width_deg=0)
    with pytest.raises(ValueError, match="tolerance"):
        EdgeApproxMetrics(tolerance=-0.1)
