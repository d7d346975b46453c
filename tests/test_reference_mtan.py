"""backbone=segnet decoder=mtan against the authors' SegNet-MTAN, and eval.protocol=mtan, the
MTAN losses, Δm and augmentation against their functions (fixtures of scripts/fixtures/mtan.py,
built from nash-mtl's experiments/nyuv2 and FAMO's experiments/cityscapes; lorenmt/mtan's model
and functions give the same numbers bit for bit, see the script).

The fixtures' model is theirs at widths [8, 16, 16, 32, 32] (theirs: 64..512, 88 MB in float16);
the full-width checkpoint's keys and shapes are checked against our full-width model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference import FIXTURES, assert_equal_to_reference, load_reference

from mtl_vision import losses
from mtl_vision.constants import IGNORE_INDEX
from mtl_vision.importing import load_exactly, read_state
from mtl_vision.importing.mtan import to_ours
from mtl_vision.metrics.delta_m import delta_m
from mtl_vision.metrics.depth import DepthMetrics
from mtl_vision.metrics.normals import NormalMetrics
from mtl_vision.metrics.segmentation import SegmentationMetrics

DATASETS = ["nyuv2", "cityscapes"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _theirs(task: str, pred: torch.Tensor) -> torch.Tensor:
    """Our raw output as their model returns it: log-probabilities for semseg."""
    return F.log_softmax(pred, dim=1) if task == "semseg" else pred


@pytest.mark.parametrize("dataset", DATASETS)
def test_outputs_features_and_attention_equal_the_authors(dataset, make_cfg):
    record, model = load_reference(f"mtan_{dataset}", make_cfg)
    image = record["image"]
    with torch.no_grad():
        features = model.encode(image)
        out = model(image)
        attended = {t: model.decoder.attend(features, t) for t in record["tasks"]}
    assert len(features) == len(record["features"]) == 20
    for i, (ours, theirs) in enumerate(zip(features, record["features"])):
        assert_equal_to_reference(ours, theirs, f"{dataset} shared map {i}")
    for task, theirs in record["attended"].items():
        assert_equal_to_reference(attended[task], theirs, f"{dataset} attended {task}")
    assert set(out) == set(record["outputs"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(_theirs(task, out[task]), theirs, f"{dataset} {task}")


@pytest.mark.parametrize("dataset", DATASETS)
def test_train_mode_outputs_and_batchnorm_statistics_equal_the_authors(dataset, make_cfg):
    record, model = load_reference(f"mtan_{dataset}", make_cfg)
    model.train()
    with torch.no_grad():
        out = model(record["image"])
    for task, theirs in record["train_outputs"].items():
        assert_equal_to_reference(_theirs(task, out[task]), theirs, f"{dataset} train-mode {task}")
    ours = model.state_dict()
    after = record["bn_after_train_forward"]
    state = read_state(FIXTURES / f"mtan_{dataset}.pth") | {k.removeprefix("segnet."): v for k, v in after.items()}
    converted = to_ours(state, tasks=record["tasks"])
    for key, theirs in converted.items():
        if "running" not in key and "num_batches" not in key:
            continue
        if theirs.is_floating_point():
            assert_equal_to_reference(ours[key], theirs, f"{dataset} {key} after one train-mode forward")
        else:
            assert torch.equal(ours[key], theirs), key


def _zeros_of(shapes: dict) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(s, dtype=torch.int64 if k.endswith("num_batches_tracked") else torch.float16) for k, s in shapes.items()}


def test_full_width_checkpoints_of_every_codebase_fill_our_full_width_model(make_cfg):
    """Their 64..512 SegNetMtan (nash-mtl/FAMO, `segnet.` keys) and lorenmt's SegNet (bare keys and
    `logsigma`) fill our default model exactly."""
    from mtl_vision.cli.build import TaskFacts, build_module

    record = torch.load(FIXTURES / "mtan_nyuv2.pt", map_location="cpu", weights_only=True)
    cfg = make_cfg(["experiment=mtan_nyuv2"], tiny=False)
    facts = TaskFacts(tasks=record["tasks"], task_channels=record["task_channels"], class_names={}, edge_tolerance=0.011)
    model = build_module(cfg, facts).model
    nash = _zeros_of(record["full_shapes"])
    lorenmt = {k.removeprefix("segnet."): v for k, v in nash.items()} | {"logsigma": torch.full((3,), -0.5)}
    for state in (nash, lorenmt):
        load_exactly(model, to_ours(state, tasks=record["tasks"]), path="full width", source="mtan")
    assert sum(p.numel() for p in model.parameters()) == 44_229_073  # MTAN's README: 44.2M


def test_import_names_what_does_not_fit():
    record = torch.load(FIXTURES / "mtan_cityscapes.pt", map_location="cpu", weights_only=True)
    state = _zeros_of(record["full_shapes"])
    with pytest.raises(ValueError, match="trained on tasks"):
        to_ours(state, tasks=["semseg", "depth", "normals"])
    with pytest.raises(ValueError, match="no SegNet-MTAN module"):
        to_ours(state | {"segnet.something.weight": torch.zeros(1)}, tasks=["semseg", "depth"])


# -- losses, protocol, Δm, augmentation ---------------------------------------------------------
@pytest.fixture(scope="module")
def protocol_record() -> dict:
    return torch.load(FIXTURES / "mtan_protocol_nyuv2.pt", map_location="cpu", weights_only=True)


def _labels(label: torch.Tensor) -> torch.Tensor:
    label = label.long()
    return torch.where(label < 0, IGNORE_INDEX, label)


def test_losses_equal_their_model_fit(protocol_record):
    for i, (batch, theirs) in enumerate(zip(protocol_record["batches"], protocol_record["losses"])):
        ours = torch.stack(
            [
                losses.cross_entropy(batch["logits"], _labels(batch["label"])),
                losses.depth_l1(batch["depth"], batch["depth_gt"]),
                losses.normals_loss(batch["normals"], batch["normals_gt"], distance="cosine"),
            ]
        )
        assert_equal_to_reference(ours, theirs, f"batch {i} semantic/depth/normal losses")


def test_protocol_metrics_equal_their_trainer_loop(protocol_record):
    """ConfMatrix over the split, depth_error and normal_error per batch averaged over the batches
    (the last batch holds one image, so per-batch and pooled means differ)."""
    seg = SegmentationMetrics(num_classes=13)
    depth, normals = DepthMetrics(protocol="mtan"), NormalMetrics(protocol="mtan")
    pooled = DepthMetrics()
    for b in protocol_record["batches"]:
        seg.update(b["logits"].argmax(1), _labels(b["label"]))
        depth.update(b["depth"], b["depth_gt"])
        pooled.update(b["depth"], b["depth_gt"])
        normals.update(b["normals"], b["normals_gt"])
    theirs = protocol_record["results"]
    ours = seg.compute() | depth.compute() | normals.compute()
    pairs = {
        "mIoU": ("miou", 100), "pixel_acc": ("pix_acc", 100), "abs_err": ("abs_err", 1), "abs_rel": ("rel_err", 1),
        "mean": ("mean", 1), "median": ("median", 1), "within_11_25": ("within_11_25", 100),
        "within_22_5": ("within_22_5", 100), "within_30": ("within_30", 100),
    }
    for key, (their_key, scale) in pairs.items():
        assert_equal_to_reference(ours[key].double(), torch.tensor(theirs[their_key] * scale, dtype=torch.float64), key)
    assert abs(float(pooled.compute()["abs_err"]) - theirs["abs_err"]) > 1e-4  # the protocol matters here


def test_pooled_delta_m_is_their_delta_fn_with_our_sign(protocol_record):
    base = protocol_record["delta_base"]
    r = protocol_record["results"]
    results = {
        "val/semseg/mIoU": 100 * r["miou"], "val/semseg/pixel_acc": 100 * r["pix_acc"],
        "val/depth/abs_err": r["abs_err"], "val/depth/abs_rel": r["rel_err"],
        "val/normals/mean": r["mean"], "val/normals/median": r["median"],
        "val/normals/within_11_25": 100 * r["within_11_25"], "val/normals/within_22_5": 100 * r["within_22_5"],
        "val/normals/within_30": 100 * r["within_30"],
    }
    baselines = {
        "semseg": {"mIoU": 100 * base[0], "pixel_acc": 100 * base[1]},
        "depth": {"abs_err": base[2], "abs_rel": base[3]},
        "normals": {"mean": base[4], "median": base[5], "within_11_25": 100 * base[6],
                    "within_22_5": 100 * base[7], "within_30": 100 * base[8]},
    }
    ours = delta_m(results, baselines, ["semseg", "depth", "normals"], convention="pooled", protocol="mtan")
    assert ours == pytest.approx(-protocol_record["delta_m"], rel=1e-5)


def test_augmentation_equals_their_random_scale_crop_and_flip(protocol_record):
    from mtl_vision.data.transforms import MTANTrainTransform

    for k, item in enumerate(protocol_record["augmentation"]):
        draws = list(item["draws"])
        transform = MTANTrainTransform()
        transform._randint = lambda lo, hi, d=draws: d.pop(0)
        transform._flip_draw = lambda f=item["flip_draw"]: f
        raw = item["raw"]
        sample = {
            "image": raw["image"].permute(2, 0, 1).float(),
            "semseg": _labels(raw["label"]),
            "depth": raw["depth"].permute(2, 0, 1).float(),
            "normals": raw["normal"].permute(2, 0, 1).float(),
        }
        out = transform(sample)
        theirs = item["out"]
        assert_equal_to_reference(out["image"], theirs["image"], f"item {k} image")
        assert torch.equal(out["semseg"], _labels(theirs["label"])), f"item {k} labels"
        assert_equal_to_reference(out["depth"], theirs["depth"], f"item {k} depth")
        assert_equal_to_reference(out["normals"], theirs["normal"], f"item {k} normals")


def test_the_experiment_trains_and_reports_the_mean_of_the_last_epochs(make_cfg, tmp_path):
    """experiment=mtan_nyuv2 on a tiny dataset in MTAN's layout (narrow SegNet, 3 epochs of one
    step): every epoch is scored under eval.protocol=mtan with their Δm, and metrics_last10.json
    holds the mean of those validations."""
    import json
    import math

    from mtl_vision.cli.train import train
    from mtl_vision.data.nyud_fixture import write_nyud_fixture

    root = write_nyud_fixture(tmp_path / "nyuv2", layout="mtan", n=2, height=32, width=64)
    cfg = make_cfg(
        ["experiment=mtan_nyuv2", f"data.root={root}", "data.num_workers=0", "backbone.widths=[8,16,16,32,32]",
         "trainer.max_epochs=3", "callbacks.pictures=null", "logger=csv"],
        tiny=False,
    )
    train(cfg)
    run = tmp_path / "run"
    last = json.loads((run / "metrics_last10.json").read_text())
    final = json.loads((run / "metrics.json").read_text())
    assert last["validations"] == 3
    keys = ["semseg/mIoU", "semseg/pixel_acc", "depth/abs_err", "depth/abs_rel", "normals/mean", "normals/median",
            "normals/within_11_25", "normals/within_22_5", "normals/within_30", "delta_m"]
    assert all(f"val/{k}" in last and f"val/{k}" in final for k in keys), sorted(last)
    assert math.isfinite(last["val/delta_m"]) and math.isfinite(final["val/delta_m"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3


def test_last_epochs_mean_keeps_the_last_validations_and_resumes():
    from mtl_vision.engine.last_epochs import LastEpochsMean

    callback = LastEpochsMean(epochs=2, path="unused.json")
    callback.history = [{"val/a": 1.0, "val/b": 5.0}, {"val/a": 2.0}, {"val/a": 4.0, "val/b": 1.0}][-2:]
    assert callback.mean() == {"val/a": 3.0, "validations": 2}
    resumed = LastEpochsMean(epochs=2, path="unused.json")
    resumed.load_state_dict(callback.state_dict())
    assert resumed.mean() == callback.mean()
    with pytest.raises(ValueError, match="last_epochs.epochs=0"):
        LastEpochsMean(epochs=0, path="x")


@pytest.mark.parametrize(
    "balancer",
    [["balancer=pcgrad", "balancer.mode=features"], ["balancer=nashmtl", "balancer.shared=[backbone,decoder]"]],
    ids=["features", "params"],
)
def test_gradient_balancers_train_mtan_in_both_modes(make_cfg, tmp_path, balancer):
    """features: the task gradients of SegNet's 20 maps; params: of the parameters under
    `balancer.shared` that two or more tasks use (SegNet and the attention path's shared blocks)."""
    from mtl_vision.cli.build import build_datamodule, build_module, build_trainer
    from mtl_vision.data.nyud_fixture import write_nyud_fixture

    root = write_nyud_fixture(tmp_path / "nyuv2", layout="mtan", n=2, height=32, width=64)
    cfg = make_cfg(
        ["experiment=mtan_nyuv2", f"data.root={root}", "data.num_workers=0", "backbone.widths=[8,16,16,32,32]",
         "trainer.max_epochs=1", "trainer.limit_val_batches=0", "callbacks.pictures=null", "logger=csv", *balancer],
        tiny=False,
    )
    datamodule = build_datamodule(cfg)
    module = build_module(cfg, datamodule)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    build_trainer(cfg, module).fit(module, datamodule=datamodule)
    moved = {n.split(".")[0] for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"backbone", "decoder"}


def test_step_schedule_is_torch_steplr_stepped_once_per_epoch():
    from mtl_vision.engine.schedulers import step

    def rates(make, steps_per_epoch=3, epochs=7):
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.Adam([p], lr=1e-4)
        sched, out = make(opt), []
        for e in range(epochs):
            for s in range(steps_per_epoch):
                out.append(opt.param_groups[0]["lr"])
                opt.step()
                if make is not torch_steplr:
                    sched.step()
            if make is torch_steplr:
                sched.step()
        return out

    def torch_steplr(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    ours = rates(lambda opt: step(opt, total_steps=21, steps_per_epoch=3, step_size=2, gamma=0.5))
    assert ours == pytest.approx(rates(torch_steplr), rel=1e-12)
