"""Evaluation protocols (eval.protocol = atrc | invpt | mtinet): hand-worked cases, the numbers of
the authors' own evaluation code on fixed inputs (tests/fixtures/protocols, written by
scripts/protocol_fixtures.py), and the config plumbing from mtl-train / mtl-eval to the metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf, open_dict

from mtl_vision.metrics import DepthMetrics, NormalMetrics, SaliencyMetrics
from mtl_vision.metrics import functional as FM
from mtl_vision.metrics.delta_m import DeltaM, delta_m
from mtl_vision.metrics.protocols import PROTOCOLS, check_protocol, protocol_primary
from mtl_vision.tasks import TASKS

FIXTURES = Path(__file__).parent / "fixtures" / "protocols"


# --------------------------------------------------------------------------- #
# Protocol names
# --------------------------------------------------------------------------- #
def test_protocol_names_and_errors():
    assert PROTOCOLS == ("atrc", "invpt", "mtinet", "mtlora", "mtan")
    assert check_protocol(None) == "atrc"
    with pytest.raises(ValueError, match=r"eval.protocol='mtnet'.*did you mean 'mtinet'.*known: atrc, invpt, mtinet, mtlora, mtan"):
        check_protocol("mtnet")
    for cls in (SaliencyMetrics, DepthMetrics, NormalMetrics):
        with pytest.raises(ValueError, match="protocol='foo'.*known: atrc, invpt, mtinet, mtlora, mtan"):
            cls(protocol="foo")
    with pytest.raises(ValueError, match="known: atrc"):
        FM.max_f(torch.rand(1, 2, 2), torch.ones(1, 2, 2), protocol="ASTMT")


@pytest.mark.parametrize(
    ("protocol", "saliency", "depth"),
    [
        ("atrc", {"maxF"}, {"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"}),
        ("invpt", {"maxF", "maxF_sigmoid_prob"}, {"rmse", "abs_err", "abs_rel", "log_rmse", "delta1", "sq_rel"}),
        ("mtinet", {"maxF", "maxF1_per_image", "max_mIoU_per_image"}, {"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"}),
        (
            "mtlora",
            {"maxF", "maxF_sigmoid_prob", "maxF1_per_image", "max_mIoU_per_image"},
            {"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"},
        ),
        ("mtan", {"maxF"}, {"rmse", "abs_err", "abs_rel", "log_rmse", "delta1"}),
    ],
)
def test_keys_of_each_protocol(protocol, saliency, depth):
    g = torch.Generator().manual_seed(0)
    prob, target = torch.rand(2, 5, 6, generator=g), (torch.rand(2, 5, 6, generator=g) > 0.5).long()
    assert set(FM.max_f(prob, target, protocol=protocol)) == saliency
    assert set(FM.depth_errors(prob + 0.1, prob + 0.2, protocol=protocol)) == depth
    spec = TASKS["saliency"]
    metric = spec.metric(num_classes=1, edge_tolerance=0.011, protocol=protocol)
    metric.update(prob, target)
    assert set(metric.compute()) == saliency
    depth_metric = TASKS["depth"].metric(num_classes=1, edge_tolerance=0.011, protocol=protocol)
    depth_metric.update(prob + 0.1, prob + 0.2)
    assert set(depth_metric.compute()) == depth
    # the saliency primary under each protocol is one of its keys; lower-is-better keys are declared
    assert (protocol_primary("saliency", protocol) or spec.primary) in saliency
    assert "sq_rel" in TASKS["depth"].lower_is_better_keys


# --------------------------------------------------------------------------- #
# Hand-worked cases
# --------------------------------------------------------------------------- #
def test_invpt_saliency_thresholds_the_sigmoid_of_the_probability():
    prob = torch.tensor([[[0.5, 0.45, 0.05]]])
    target = torch.tensor([[[1, 0, 0]]])
    # ATRC: t in (0.45, 0.5] keeps only the salient pixel -> P = R = 1
    # InvPT: sigmoid(p) = 0.6225, 0.6106, 0.5125. t <= 0.5: all three, P 1/3 R 1 -> F 0.3939;
    #   t = 0.55, 0.60: the first two, P 1/2 R 1 -> F = 1.3 * 0.5 / (0.15 + 1) = 0.5652; t >= 0.65: none
    out = FM.max_f(prob, target, protocol="invpt")
    assert out["maxF"] == pytest.approx(100.0)
    assert out["maxF_sigmoid_prob"] == pytest.approx(100 * 1.3 * 0.5 / (0.3 * 0.5 + 1))
    # any probability keeps sigmoid(p) >= 0.5: the lowest ten thresholds mark everything salient
    low = FM.max_f(torch.full((1, 1, 4), 1e-6), torch.tensor([[[1, 0, 0, 0]]]), protocol="invpt")
    assert low["maxF_sigmoid_prob"] == pytest.approx(100 * 1.3 * 0.25 / (0.3 * 0.25 + 1))
    assert low["maxF"] == 0.0


def test_mtinet_saliency_per_image_hand_worked():
    prob = torch.tensor([[[0.9, 0.5, 0.3, 0.1]], [[0.6, 0.2, 0.1, 0.0]]])
    target = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
    # stored uint8 floor(255 p): A = 229, 127, 76, 25 -> q/255 = 0.898, 0.498, 0.298, 0.098;
    # B = 153, 51, 25, 0 -> 0.6 and 0.2 equal thresholds and are not above them (strict >).
    assert FM.quantise_saliency_uint8(prob).flatten().tolist() == [229, 127, 76, 25, 153, 51, 25, 0]
    # thresholds t_k = 0.2 + 0.05 k. Image A: k 0-1 pred {0.898, 0.498, 0.298}: P 2/3 R 1 IoU 2/3;
    # k 2-5 {0.898, 0.498}: P 1 R 1 IoU 1; k 6-13 {0.898}: P 1 R 1/2 IoU 1/2; k 14 (0.9) none: 0, 0, 0.
    # Image B (no salient pixel): k 0-7 pred {0.6}: P 0 R 0 IoU 0; k >= 8 nothing: IoU 1 (both empty).
    # Means: k 0-1 IoU 1/3 F(1/3, 1/2) = 0.4; k 2-5 IoU 1/2 F(1/2, 1/2) = 0.5;
    #        k 6-7 IoU 1/4 F(1/2, 1/4) = 1/3; k 8-13 IoU 3/4 F = 1/3; k 14 IoU 1/2 F 0.
    out = FM.max_f(prob, target, protocol="mtinet")
    assert out["max_mIoU_per_image"] == pytest.approx(75.0)
    assert out["maxF1_per_image"] == pytest.approx(50.0)
    iou_sum, precision_sum, recall_sum, n = FM._saliency_per_image_update(prob, target)
    assert int(n) == 2
    expected_iou = [2 / 3] * 2 + [1.0] * 4 + [0.5] * 2 + [1.5] * 6 + [1.0]
    assert iou_sum.tolist() == pytest.approx(expected_iou)
    assert precision_sum.tolist() == pytest.approx([2 / 3] * 2 + [1.0] * 12 + [0.0])
    assert recall_sum.tolist() == pytest.approx([1.0] * 6 + [0.5] * 8 + [0.0])


def test_mtinet_threshold_table_and_ignored_pixels():
    passes = FM._mtinet_passes(torch.device("cpu"))
    # 15 thresholds np.linspace(0.2, 0.9, 15); q/255 equal to 0.2, 0.4, 0.6, 0.8 does not pass them
    assert FM.MTINET_SALIENCY_THRESHOLDS == tuple(np.linspace(0.2, 0.9, 15).tolist())
    assert passes[[0, 51, 52, 102, 103, 153, 154, 204, 205, 229, 230, 255]].tolist() == [
        0, 0, 1, 4, 5, 8, 9, 12, 13, 14, 15, 15
    ]  # fmt: skip
    # 255 pixels are left out of every mask; an image with nothing else is not counted
    prob = torch.tensor([[[0.9, 0.9]], [[0.9, 0.1]]])
    target = torch.tensor([[[255, 255]], [[1, 255]]])
    out = FM.max_f(prob, target, protocol="mtinet")
    assert out["max_mIoU_per_image"] == pytest.approx(100.0) and out["maxF1_per_image"] == pytest.approx(100.0)
    assert int(FM._saliency_per_image_update(prob, target)[3]) == 1


def test_invpt_depth_sq_rel_and_the_positive_prediction_rule():
    pred = torch.tensor([[[1.0, 2.0], [4.0, 7.0]]])
    target = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # last pixel has no depth
    # squared errors 0, 1, 4 over depths 1, 1, 2 -> sq_rel = (0 + 1 + 2) / 3
    out = FM.depth_errors(pred, target, protocol="invpt")
    assert out["sq_rel"] == pytest.approx(1.0)
    assert out["rmse"] == pytest.approx(math.sqrt(5 / 3))
    # pred <= 0 becomes 1e-9, a positive prediction below it is kept (their `pred[pred <= 0] = 1e-9`)
    tiny = FM.depth_errors(
        torch.tensor([[[0.0, 1e-12]]], dtype=torch.float64), torch.ones(1, 1, 2, dtype=torch.float64)
    )
    assert tiny["log_rmse"] == pytest.approx(math.sqrt((math.log(1e-9) ** 2 + math.log(1e-12) ** 2) / 2))
    nan = FM.depth_errors(torch.tensor([[[float("nan")]]]), torch.ones(1, 1, 1))
    assert math.isnan(nan["rmse"])


def test_mtinet_normals_are_scored_after_the_uint8_round_trip():
    # +z and +x predicted exactly: stored as (127, 127, 255) and (255, 127, 127), read back as
    # (-1/255, -1/255, 1) and (1, -1/255, -1/255): an error of atan(sqrt(2) / 255) = 0.3178 degrees
    pred = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]).view(1, 3, 1, 2)
    target = pred.clone()
    stored = FM.quantise_normals_uint8(pred)
    assert stored.dtype == torch.uint8 and stored.flatten().tolist() == [127, 255, 127, 127, 255, 127]
    expected = math.degrees(math.atan(math.sqrt(2) / 255))
    out = FM.normal_errors(pred, target, protocol="mtinet")
    assert out["mean"] == pytest.approx(expected, rel=1e-6) and out["median"] == pytest.approx(expected, rel=1e-6)
    assert out["within_11_25"] == 100.0
    assert FM.normal_errors(pred, target)["mean"] == pytest.approx(0.0, abs=1e-6)
    assert FM.normal_errors(pred, target, protocol="invpt")["mean"] == pytest.approx(0.0, abs=1e-6)
    metric = NormalMetrics(protocol="mtinet")
    metric.update(pred * 3.0, target)  # the prediction is normalised before it is stored
    assert float(metric.compute()["mean"]) == pytest.approx(expected, rel=1e-6)


# mtan averages depth and normals per batch, which whole-split functionals cannot see: its twin is
# metrics/mtan.py per batch, checked against the authors' trainer loop in test_reference_mtan.py
@pytest.mark.parametrize("protocol", [p for p in PROTOCOLS if p != "mtan"])
def test_metric_classes_over_batches_equal_the_functional(protocol):
    g = torch.Generator().manual_seed(1)
    sal_t = (torch.rand(5, 9, 11, generator=g) < 0.4).long()
    sal_t[1, :3] = 255
    sal_p = (0.4 * sal_t.clamp(max=1) + 0.6 * torch.rand(5, 9, 11, generator=g)).clamp(0, 1)
    depth_t = torch.rand(5, 9, 11, generator=g) * 5
    depth_t[depth_t < 0.5] = 0
    depth_p = depth_t + torch.randn(5, 9, 11, generator=g)
    normal_t = F.normalize(torch.randn(5, 3, 9, 11, generator=g), dim=1)
    normal_p = normal_t + 0.3 * torch.randn(5, 3, 9, 11, generator=g)
    cases = [
        (SaliencyMetrics(protocol=protocol), FM.max_f, sal_p, sal_t),
        (DepthMetrics(protocol=protocol), FM.depth_errors, depth_p, depth_t),
        (NormalMetrics(protocol=protocol), FM.normal_errors, normal_p, normal_t),
    ]
    for metric, functional, pred, target in cases:
        for chunk in ((0, 2), (2, 3), (3, 5)):
            metric.update(pred[slice(*chunk)], target[slice(*chunk)])
        got = {k: float(v) for k, v in metric.compute().items()}
        want = functional(pred, target, protocol=protocol)
        assert set(got) == set(want)
        for key in want:
            tol = 0.01 if key == "median" else 1e-9  # the class reads the median from a 0.01-degree histogram
            assert got[key] == pytest.approx(want[key], rel=1e-9, abs=tol), (type(metric).__name__, key)


# --------------------------------------------------------------------------- #
# The authors' code on fixed inputs (scripts/protocol_fixtures.py)
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def fixture() -> tuple[dict[str, torch.Tensor], dict]:
    inputs = {k: torch.from_numpy(v) for k, v in np.load(FIXTURES / "inputs.npz").items()}
    return inputs, json.loads((FIXTURES / "reference.json").read_text())


def test_atrc_equals_brdav_atrc(fixture):
    x, ref = fixture
    ref = ref["atrc"]  # fractions; float32 sums on their side
    assert FM.max_f(x["sal_prob"], x["sal_target_ignore"])["maxF"] == pytest.approx(
        100 * ref["saliency"]["maxF"], rel=1e-6
    )
    assert FM.depth_errors(x["depth_pred"], x["depth_target"])["rmse"] == pytest.approx(ref["depth"]["rmse"], rel=1e-6)
    mean = FM.normal_errors(x["normals_pred"], x["normals_target"])["mean"]
    assert mean == pytest.approx(ref["normals"]["mean"], rel=1e-6)


def test_atrc_equals_emanet_evaluation(fixture):
    """EMA-Net / CTAL's meters (experiment=ctal_nyud, memanet_nyud score with `atrc`): depth pooled
    over pixels with their `abs` = our abs_err, `rel` = abs_rel; normals in fractions."""
    x, ref = fixture
    ref = ref["emanet"]
    depth = FM.depth_errors(x["depth_pred"], x["depth_target"])
    for ours, theirs in (("rmse", "rmse"), ("abs_err", "abs"), ("abs_rel", "rel"), ("log_rmse", "log_rmse")):
        assert depth[ours] == pytest.approx(ref["depth"][theirs], rel=1e-6), ours
    normals = FM.normal_errors(x["normals_pred"], x["normals_target"])
    # theirs: the float32 arccos of a float32 dot product (5e-6 relative off the float64 angle)
    assert normals["mean"] == pytest.approx(ref["normals"]["mean"], rel=1e-5)
    for ours, theirs in (("within_11_25", "11.25"), ("within_22_5", "22.5"), ("within_30", "30")):
        assert normals[ours] == pytest.approx(100 * ref["normals"][theirs], rel=1e-6), ours


@pytest.mark.parametrize(("codebase", "percent"), [("invpt", False), ("taskprompter", True), ("mlore", True)])
def test_invpt_equals_the_invpt_taskprompter_mlore_pipelines(fixture, codebase, percent):
    x, ref = fixture
    ref = ref[codebase]
    sal = FM.max_f(x["sal_invpt_prob"], x["sal_target_ignore"], protocol="invpt")
    assert sal["maxF_sigmoid_prob"] == pytest.approx(ref["saliency"]["maxF"] * (1 if percent else 100), rel=1e-6)
    assert sal["maxF"] != pytest.approx(sal["maxF_sigmoid_prob"], rel=1e-3)  # not the same number
    depth = FM.depth_errors(x["depth_pred"], x["depth_target"], protocol="invpt")
    for key in ("rmse", "log_rmse", "abs_rel", "sq_rel"):
        assert depth[key] == pytest.approx(ref["depth"][key], rel=1e-6), key
    mean = FM.normal_errors(x["normals_pred"], x["normals_target"], protocol="invpt")["mean"]
    assert mean == pytest.approx(ref["normals"]["mean"], rel=1e-6)


def test_mtinet_equals_its_stored_prediction_evaluation(fixture):
    x, ref = fixture
    ref = ref["mtinet"]
    # the uint8 maps we score are bit for bit those MTI-Net writes
    assert torch.equal(FM.quantise_saliency_uint8(x["sal_prob"]), x["mtinet_sal_uint8"])
    assert torch.equal(FM.quantise_normals_uint8(x["normals_pred"]), x["mtinet_normals_uint8"])
    for q in (51, 102, 153, 204):  # values on a threshold are in the fixture
        assert (x["mtinet_sal_uint8"] == q).any()

    sal = FM.max_f(x["sal_prob"], x["sal_target"], protocol="mtinet")
    assert sal["max_mIoU_per_image"] == pytest.approx(100 * ref["saliency"]["mIoU"], rel=1e-12)
    assert sal["maxF1_per_image"] == pytest.approx(100 * ref["saliency"]["maxF"], rel=1e-12)
    iou_sum, precision_sum, recall_sum, n = FM._saliency_per_image_update(x["sal_prob"], x["sal_target"])
    assert (iou_sum / n).tolist() == pytest.approx(ref["saliency"]["mIoUs"], rel=1e-12)
    assert (precision_sum / n).tolist() == pytest.approx(ref["saliency"]["mPrec"], rel=1e-12)
    assert (recall_sum / n).tolist() == pytest.approx(ref["saliency"]["mRec"], rel=1e-12)

    # their angle is the float32 arccos of the dot product, ours float64 atan2: rounding apart
    normals = FM.normal_errors(x["normals_pred"], x["normals_target"], protocol="mtinet")
    theirs = ref["normals"]
    for ours_key, key in (("mean", "mean"), ("median", "median"), ("rmse", "rmse")):
        assert normals[ours_key] == pytest.approx(theirs[key], abs=1e-4), ours_key
    for ours_key, key in (("within_11_25", "11.25"), ("within_22_5", "22.5"), ("within_30", "30")):
        assert normals[ours_key] == pytest.approx(theirs[key], rel=1e-12), ours_key
    # the uint8 round trip is what makes this differ from scoring the prediction itself
    assert FM.normal_errors(x["normals_pred"], x["normals_target"])["mean"] != pytest.approx(theirs["mean"], abs=1e-3)


# --------------------------------------------------------------------------- #
# Δm and the config plumbing
# --------------------------------------------------------------------------- #
def test_delta_m_uses_the_protocol_primary():
    results = {"val/saliency/maxF": 80.0, "val/saliency/max_mIoU_per_image": 66.0, "val/saliency/maxF1_per_image": 70.0}
    baselines = {"saliency": {"maxF": 100.0, "max_mIoU_per_image": 60.0, "maxF1_per_image": 70.0}}
    assert delta_m(results, baselines, ["saliency"]) == pytest.approx(-20.0)
    assert delta_m(results, baselines, ["saliency"], protocol="mtinet") == pytest.approx(10.0)
    with pytest.raises(ValueError, match="maxF_sigmoid_prob"):
        delta_m(results, baselines, ["saliency"], protocol="invpt")
    # libmtl averages every common metric whatever the protocol
    assert delta_m(results, baselines, ["saliency"], convention="libmtl", protocol="mtinet") == pytest.approx(
        (-20.0 + 10.0 + 0.0) / 3
    )
    with pytest.raises(ValueError, match="known: atrc"):
        DeltaM(None, protocol="foo")


def test_train_config_has_the_protocol_and_build_module_uses_it(make_cfg):
    from mtl_vision.cli.build import TaskFacts, build_delta_m, build_module

    cfg = make_cfg()
    assert cfg.eval.protocol == "atrc"
    facts = TaskFacts(
        tasks=["depth", "normals", "saliency"],
        task_channels={"depth": 1, "normals": 3, "saliency": 1},
        class_names={},
        edge_tolerance=0.011,
    )
    cfg = make_cfg(["eval.protocol=mtinet", "data.tasks=[depth,normals,saliency]"])
    module = build_module(cfg, facts)
    assert {t: module.metrics[t].protocol for t in facts.tasks} == dict.fromkeys(facts.tasks, "mtinet")
    assert build_delta_m(cfg).protocol == "mtinet"
    old = make_cfg()
    with open_dict(old):
        del old["eval"]  # a checkpoint written before the key existed
    assert build_delta_m(old).protocol == "atrc"
    bad = make_cfg(["eval.protocol=foo"])
    with pytest.raises(ValueError, match="eval.protocol='foo'"):
        build_module(bad, facts)


def test_overrides_accept_known_protocols_and_refuse_others():
    from mtl_vision.cli.overrides import problems

    assert problems("train", ["eval.protocol=invpt"]) == []
    assert problems("eval", ["ckpt=some/best.ckpt", "eval.protocol=mtinet"]) == []
    assert problems("eval", ["ckpt=some/best.ckpt", "eval.protocol=null"]) == []
    found = problems("train", ["eval.protocol=foo"])
    assert found == ["eval.protocol='foo': unknown evaluation protocol (known: atrc, invpt, mtinet, mtlora, mtan)"]
    assert "did you mean 'invpt'" in problems("eval", ["ckpt=x.ckpt", "eval.protocol=inpvt"])[0]


def test_mtl_eval_protocol_override_replaces_the_checkpoints(monkeypatch):
    import mtl_vision.cli.eval as eval_cli

    saved = OmegaConf.create(
        {"data": {"name": "synthetic"}, "delta_m": {"convention": "mtinet"}, "eval": {"protocol": "invpt"}}
    )
    monkeypatch.setattr(eval_cli, "load_run", lambda ckpt: (saved.copy(), None, {}))

    def run_cfg(protocol):
        cfg = OmegaConf.create(
            {"ckpt": "x.ckpt", "split": "val", "data": {}, "delta_m": {}, "eval": {"protocol": protocol}}
        )
        return eval_cli.evaluation_config(cfg)[0]

    assert run_cfg(None).eval.protocol == "invpt"  # null keeps the checkpoint's
    assert run_cfg("mtinet").eval.protocol == "mtinet"
    old = OmegaConf.create({"data": {"name": "synthetic"}, "delta_m": {}})  # saved before eval.protocol existed
    monkeypatch.setattr(eval_cli, "load_run", lambda ckpt: (old.copy(), None, {}))
    assert "eval" not in run_cfg(None)
    assert run_cfg("atrc").eval.protocol == "atrc"
    with pytest.raises(ValueError, match="known: atrc, invpt, mtinet"):
        run_cfg("foo")


def test_reports_lead_with_the_protocols_primary_metric():
    from mtl_vision.engine.report import markdown_report, primary_key

    metrics = {"val/saliency/maxF": 80.0, "val/saliency/max_mIoU_per_image": 66.0, "val/semseg/mIoU": 50.0}
    values = {"maxF": 80.0, "max_mIoU_per_image": 66.0}
    assert primary_key("saliency", values, "mtinet") == "max_mIoU_per_image"
    assert primary_key("saliency", values, "atrc") == "maxF"
    assert primary_key("saliency", {"maxF": 80.0}, "invpt") == "maxF"  # not computed: the task's own
    report = markdown_report(metrics, ["semseg", "saliency"], name="run", protocol="mtinet")
    assert "saliency max_mIoU_per_image ↑" in report.splitlines()[0]
    assert "Evaluation protocol: `mtinet`" in report


@pytest.mark.parametrize(
    ("protocol", "monitor"),
    [("atrc", "val/saliency/maxF"), ("mtinet", "val/saliency/max_mIoU_per_image"),
     ("invpt", "val/saliency/maxF_sigmoid_prob")],
)
def test_monitor_auto_follows_the_protocols_primary(make_cfg, protocol, monitor):
    from mtl_vision.cli.build import resolve_monitor

    cfg = make_cfg(["monitor=auto", f"eval.protocol={protocol}", "data.tasks=[saliency,semseg]"])
    resolve_monitor(cfg, ["saliency", "semseg"], None)
    assert (cfg.monitor, cfg.monitor_mode) == (monitor, "max")


def test_mtlora_equals_their_evaluation():
    """scale-lab/MTLoRA's get_output + SaliencyMeter / NormalsMeter / SemsegMeter on small random
    inputs (tests/fixtures/reference/mtlora_protocol.json, scripts/fixtures/mtlora.py --protocol):
    their saliency "mIoU" and "maxF" are MTI-Net's per-image scores of the float probability,
    their "Beta maxF" InvPT's sigmoid-of-probability maxF; normals' "mean" (and "rmse", which
    holds the mean too) is the pooled mean angle; semseg the split's mIoU over all 21 classes."""
    ref = json.loads((Path(__file__).parent / "fixtures" / "reference" / "mtlora_protocol.json").read_text())
    x = {k: torch.tensor(v) for k, v in ref["inputs"].items()}
    sal = FM.max_f(torch.sigmoid(x["sal_logit"]), x["sal_target"].long(), protocol="mtlora")
    assert sal["max_mIoU_per_image"] == pytest.approx(100 * ref["saliency"]["mIoU"], rel=1e-9)
    assert sal["maxF1_per_image"] == pytest.approx(100 * ref["saliency"]["maxF"], rel=1e-9)
    assert sal["maxF_sigmoid_prob"] == pytest.approx(100 * ref["saliency"]["Beta maxF"], rel=1e-6)
    target = torch.where(x["normals_target"] == 255, 0.0, x["normals_target"])  # ours: zero vector = invalid
    mean = FM.normal_errors(x["normals_raw"], target, protocol="mtlora")["mean"]
    assert mean == pytest.approx(ref["normals"]["mean"], rel=1e-6)  # their acos in float32, ours atan2
    labels = x["semseg_logit"].argmax(1)
    assert FM.miou(labels, x["semseg_target"][:, 0], 21)["mIoU"] == pytest.approx(100 * ref["semseg"]["mIoU"], rel=1e-9)
    assert protocol_primary("saliency", "mtlora") == "max_mIoU_per_image"
