"""Δm: hand-worked values for both conventions, baselines files, and single-task runs writing them."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest
import yaml

from mtl_vision.cli.train import train
from mtl_vision.metrics.delta_m import DeltaM, delta_m, load_baselines, update_baselines

BASE = {
    "semseg": {"mIoU": 50.0, "pixel_acc": 80.0},
    "depth": {"rmse": 0.60, "abs_rel": 0.20, "log_rmse": 0.25, "delta1": 70.0},
    "edge": {"odsF": 70.0, "odsF_approx": 80.0},
}


def test_mtinet_convention_by_hand():
    results = {"val/semseg/mIoU": 40.0, "val/semseg/pixel_acc": 99.0, "val/depth/rmse": 0.50, "val/semseg/loss": 1.0}
    # semseg: (40-50)/50 = -20 %; depth (lower is better): -(0.5-0.6)/0.6 = +16.67 %
    expected = (-20.0 + 100.0 / 6.0) / 2
    assert delta_m(results, BASE, ["semseg", "depth"]) == pytest.approx(expected)


def test_libmtl_convention_averages_each_tasks_metrics_first():
    results = {
        "val/semseg/mIoU": 40.0,
        "val/semseg/pixel_acc": 88.0,
        "val/semseg/IoU/wall": 1.0,  # per-class entries are not metrics of their own
        "val/depth/rmse": 0.54,
        "val/depth/abs_rel": 0.25,
        "val/depth/log_rmse": 0.25,
        "val/depth/delta1": 77.0,
    }
    semseg = (-20.0 + 10.0) / 2
    depth = (10.0 - 25.0 + 0.0 + 10.0) / 4
    got = delta_m(results, BASE, ["semseg", "depth"], convention="libmtl")
    assert got == pytest.approx((semseg + depth) / 2)


def test_edge_uses_the_exact_odsf_when_both_sides_have_it_else_the_proxy_on_both():
    exact = {"val/edge/odsF": 77.0, "val/edge/odsF_approx": 80.0}
    assert delta_m(exact, BASE, ["edge"]) == pytest.approx(10.0)
    assert delta_m(exact, BASE, ["edge"], convention="libmtl") == pytest.approx(10.0)  # counted once
    approx_only = {"val/edge/odsF_approx": 88.0}
    assert delta_m(approx_only, BASE, ["edge"]) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no metric both"):
        delta_m(exact, {"edge": {"maxF": 1.0}}, ["edge"])


def test_missing_baseline_raises_and_deltam_object_skips(tmp_path):
    with pytest.raises(ValueError, match="'normals'"):
        delta_m({"val/normals/mean": 20.0}, BASE, ["normals"])
    with pytest.raises(ValueError, match="convention"):
        delta_m({}, BASE, ["semseg"], convention="mean")
    dm = DeltaM(tmp_path / "none.yaml")
    assert not dm.covers(["semseg"]) and dm({"val/semseg/mIoU": 1.0}, ["semseg"]) is None


def test_update_baselines_merges_and_keeps_other_metrics(tmp_path):
    path = tmp_path / "b" / "resnet18.yaml"
    update_baselines(path, "edge", {"odsF_approx": 80.0}, dataset="nyud", backbone="resnet18", run="run1")
    update_baselines(path, "edge", {"odsF": 70.0, "oisF": 72.0}, dataset="nyud", backbone="resnet18")
    update_baselines(path, "depth", {"rmse": 0.6}, dataset="nyud", backbone="resnet18")
    assert load_baselines(path) == {"edge": {"odsF_approx": 80.0, "odsF": 70.0, "oisF": 72.0}, "depth": {"rmse": 0.6}}
    data = yaml.safe_load(path.read_text())
    assert data["dataset"] == "nyud" and data["tasks"]["edge"]["run"] == "run1"
    with pytest.raises(ValueError, match="backbone 'resnet18', not 'resnet50'"):
        update_baselines(path, "depth", {"rmse": 0.5}, backbone="resnet50")
    assert load_baselines(path)["depth"] == {"rmse": 0.6}, "a refused update leaves the file as it was"


def test_baselines_record_their_protocol_and_delta_m_uses_only_its_own(tmp_path):
    path = tmp_path / "b.yaml"
    update_baselines(path, "semseg", {"mIoU": 50.0})
    update_baselines(path, "normals", {"mean": 20.0}, protocol="mtinet")  # scored on uint8 normals
    assert yaml.safe_load(path.read_text())["tasks"]["normals"]["protocol"] == "mtinet"
    # the normals' keys mean something else under another protocol: never merged into one entry
    with pytest.raises(ValueError, match="eval.protocol=mtinet, these metrics with atrc"):
        update_baselines(path, "normals", {"mean": 19.0})
    assert load_baselines(path)["normals"] == {"mean": 20.0}
    assert load_baselines(path, "atrc") == {"semseg": {"mIoU": 50.0}}
    assert load_baselines(path, "mtinet") == {"normals": {"mean": 20.0}}
    results = {"val/semseg/mIoU": 55.0, "val/normals/mean": 18.0}
    assert not DeltaM(path, protocol="atrc").covers(["semseg", "normals"])
    assert DeltaM(path, protocol="mtinet")(results, ["normals"]) == pytest.approx(10.0)


def test_bad_baselines_file_names_the_file(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("tasks:\n  depth:\n    metrics: {rmse: fast}\n")
    with pytest.raises(ValueError, match=r"b\.yaml.*tasks\.depth\.metrics"):
        load_baselines(path)
    path.write_text("tasks: [depth")
    with pytest.raises(ValueError, match=r"b\.yaml: not valid YAML"):
        load_baselines(path)


def _write(args):
    path, task, value = args
    update_baselines(path, task, {"mIoU" if task in ("semseg", "human_parts") else "rmse": value})


def test_concurrent_writers_lose_nothing(tmp_path):
    """The jobs of a sweep over tasks write one file at the same time."""
    path = tmp_path / "b.yaml"
    jobs = [(path, task, float(i)) for i, task in enumerate(["semseg", "depth", "human_parts"] * 4)]
    with mp.get_context("fork").Pool(4) as pool:
        pool.map(_write, jobs)
    assert sorted(load_baselines(path)) == ["depth", "human_parts", "semseg"]


def test_single_task_runs_write_baselines_and_multitask_run_logs_delta_m(make_cfg, tmp_path):
    baselines = tmp_path / "baselines.yaml"
    common = ["trainer.max_steps=2", f"delta_m.baselines={baselines}"]
    for task in ("semseg", "depth"):
        cfg = make_cfg(["experiment=single_task", f"data.tasks=[{task}]", *common], run_dir=tmp_path / task)
        train(cfg)
        assert cfg.monitor == {"semseg": "val/semseg/mIoU", "depth": "val/depth/rmse"}[task]
        assert cfg.monitor_mode == {"semseg": "max", "depth": "min"}[task]
    stored = load_baselines(baselines)
    for task in ("semseg", "depth"):
        single = json.loads((tmp_path / task / "metrics.json").read_text())
        assert stored[task] == {k.split("/")[2]: v for k, v in single.items() if k.count("/") == 2 and "loss" not in k}
    assert yaml.safe_load(baselines.read_text())["dataset"] == "synthetic"

    cfg = make_cfg(["data.tasks=[semseg,depth]", "monitor=auto", *common], run_dir=tmp_path / "mtl")
    value = train(cfg)
    metrics = json.loads((tmp_path / "mtl" / "metrics.json").read_text())
    expected = delta_m(metrics, stored, ["semseg", "depth"])
    assert metrics["val/delta_m"] == pytest.approx(expected)
    assert cfg.monitor == "val/delta_m" and value == pytest.approx(expected)


def test_delta_m_monitor_without_baselines_is_refused(make_cfg, tmp_path):
    cfg = make_cfg(["monitor=val/delta_m", f"delta_m.baselines={tmp_path / 'missing.yaml'}", "trainer.max_steps=1"])
    with pytest.raises(ValueError, match="experiment=single_task"):
        train(cfg)


def test_single_task_experiment_refuses_several_tasks(make_cfg, tmp_path):
    cfg = make_cfg(["experiment=single_task", f"delta_m.baselines={tmp_path / 'b.yaml'}"])
    with pytest.raises(ValueError, match="trains one task"):
        train(cfg)


def test_baselines_without_a_comparable_metric_warn_once(tmp_path, caplog):
    path = tmp_path / "b.yaml"
    update_baselines(path, "edge", {"odsF": 70.0})  # exact only, while training logs odsF_approx
    dm = DeltaM(path)
    with caplog.at_level("WARNING"):
        assert dm({"val/edge/odsF_approx": 80.0}, ["edge"]) is None
        assert dm({"val/edge/odsF_approx": 81.0}, ["edge"]) is None
    warnings = [r for r in caplog.records if "no val/delta_m" in r.getMessage()]
    assert len(warnings) == 1 and "no metric both" in warnings[0].getMessage()
