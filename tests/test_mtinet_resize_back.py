"""MTI-Net's final evaluation at each image's own size: their `save_model_predictions` (encode at
the input size, cv2 back to the image's size, uint8) and evaluators, run by
scripts/fixtures/mtinet_resize_back.py on fake outputs at 16x16 with labels of 13x17, 11x15 and
19x14 (tests/fixtures/protocols/mtinet_resize_back.*), against our validation path
(`MTINetValTransform(targets="original")`, the padding collate, `MultiTaskModule.validation_step`);
then `mtl-eval` of an MTI-Net experiment on a PASCAL fixture whose images have other sizes."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mtl_vision.constants import ORIGINAL_SIZE_KEY
from mtl_vision.data.datamodule import collate_padded_targets
from mtl_vision.data.mtinet_transforms import MTINetValTransform
from mtl_vision.engine.module import MultiTaskModule, raw_at_original_size
from mtl_vision.metrics import functional as FM
from mtl_vision.metrics.functional import stored_at_original_size
from mtl_vision.tasks import TASKS

FIXTURES = Path(__file__).parent / "fixtures"
ORDER = ("semseg", "human_parts", "saliency", "normals", "edge", "depth")
CLASSES = {"semseg": 21, "human_parts": 7}


@pytest.fixture(scope="module")
def fixture() -> dict:
    arrays = np.load(FIXTURES / "protocols" / "mtinet_resize_back.npz")
    record = json.loads((FIXTURES / "protocols" / "mtinet_resize_back.json").read_text())
    sizes = [tuple(s) for s in record["sizes"]]
    raw = {t: torch.from_numpy(arrays[f"raw_{t}"]).float() for t in ORDER}
    samples = [
        {"image": torch.zeros(3, *record["pred_size"]), ORIGINAL_SIZE_KEY: torch.tensor(size),
         **{t: torch.from_numpy(arrays[f"target_{t}_{i}"]) for t in ORDER}}
        for i, size in enumerate(sizes)
    ]  # fmt: skip
    stored = {k: arrays[k] for k in arrays if k.startswith("stored_")}
    return {"raw": raw, "batch": collate_padded_targets(samples), "sizes": sizes, "stored": stored, "record": record}


def _metric(task: str, protocol: str = "mtinet"):
    return TASKS[task].metric(num_classes=CLASSES.get(task, 1), edge_tolerance=0.0075, protocol=protocol)


def test_the_batch_is_padded_with_ignored_values_and_keeps_each_size(fixture):
    batch, sizes = fixture["batch"], fixture["sizes"]
    assert batch["semseg"].shape == (3, 19, 17) and batch["normals"].shape == (3, 3, 19, 17)
    assert batch[ORIGINAL_SIZE_KEY].tolist() == [list(s) for s in sizes]
    (h, w) = sizes[1]
    assert (batch["semseg"][1, h:] == 255).all() and (batch["saliency"][1, :, :, w:] == 255).all()
    assert (batch["depth"][1, :, h:] == 0).all() and (batch["normals"][1, :, :, w:] == 0).all()
    assert (batch["edge"][1, :, h:] == 255).all() and (batch["human_parts"][0, sizes[0][0] :] == 255).all()


def test_the_maps_we_score_are_those_their_code_stores(fixture):
    raw, batch, sizes, stored = fixture["raw"], fixture["batch"], fixture["sizes"], fixture["stored"]
    padded = tuple(batch["semseg"].shape[-2:])
    compared = 0
    for task in ORDER:
        ours = stored_at_original_size(task, raw[task], sizes, padded)
        for i, (h, w) in enumerate(sizes):
            theirs = stored.get(f"stored_{task}_{i}")
            if theirs is None:  # they write no file where the label is all 255 (parts of image 1, normals of 2)
                assert (task, i) in (("human_parts", 1), ("normals", 2))
                continue
            mine = ours[i, ..., :h, :w]
            if task == "normals":
                theirs = theirs.transpose(2, 0, 1)
            elif task != "semseg" and task != "human_parts":
                theirs = theirs[None]
            assert mine.dtype == {"semseg": torch.int64, "human_parts": torch.int64, "depth": torch.float32}.get(
                task, torch.uint8
            )
            assert np.array_equal(mine.numpy().astype(theirs.dtype), theirs), (task, i)  # bitwise
            compared += 1
    assert compared == 16


def _check_against_theirs(results: dict[str, dict[str, float]], theirs: dict, *, median_tol: float) -> None:
    for task in ("semseg", "human_parts"):
        assert results[task]["mIoU"] == pytest.approx(100 * theirs[task]["mIoU"], rel=1e-12), task
        for c, iou in enumerate(theirs[task]["jaccards_all_categs"]):
            assert results[task][f"IoU/{c}"] == pytest.approx(100 * iou, rel=1e-12, abs=1e-12), (task, c)
    sal = results["saliency"]
    assert sal["max_mIoU_per_image"] == pytest.approx(100 * theirs["saliency"]["mIoU"], rel=1e-12)
    assert sal["maxF1_per_image"] == pytest.approx(100 * theirs["saliency"]["maxF"], rel=1e-12)
    # their angle: float64 arccos of the dot product, ours float64 2 atan2 (the tolerance of
    # tests/test_eval_protocols.py for MTI-Net); the within-X counts are exact
    normals = results["normals"]
    for key in ("mean", "rmse"):
        assert normals[key] == pytest.approx(theirs["normals"][key], abs=1e-4), key
    assert normals["median"] == pytest.approx(theirs["normals"]["median"], abs=median_tol)
    for ours_key, key in (("within_11_25", "11.25"), ("within_22_5", "22.5"), ("within_30", "30")):
        assert normals[ours_key] == pytest.approx(theirs["normals"][key], rel=1e-12), ours_key
    # their squared errors are float32 sums
    for key in ("rmse", "log_rmse"):
        assert results["depth"][key] == pytest.approx(theirs["depth"][key], rel=1e-6), key


def test_the_scores_equal_their_evaluators(fixture):
    raw, batch, sizes = fixture["raw"], fixture["batch"], fixture["sizes"]
    padded = tuple(batch["semseg"].shape[-2:])
    stored = {t: stored_at_original_size(t, raw[t], sizes, padded) for t in ORDER}
    results = {
        "semseg": FM.miou(stored["semseg"], batch["semseg"], 21),
        "human_parts": FM.miou(stored["human_parts"], batch["human_parts"], 7),
        "saliency": FM.max_f(stored["saliency"], batch["saliency"], protocol="mtinet"),
        "normals": FM.normal_errors(stored["normals"], batch["normals"], protocol="mtinet"),
        "depth": FM.depth_errors(stored["depth"], batch["depth"], protocol="mtinet"),
    }
    _check_against_theirs(results, fixture["record"]["theirs"], median_tol=1e-4)
    # the stored maps are not quantised again: the same numbers under every protocol's reading
    assert FM.normal_errors(stored["normals"], batch["normals"])["mean"] == results["normals"]["mean"]
    mtlora = FM.max_f(stored["saliency"], batch["saliency"], protocol="mtlora")
    assert mtlora["max_mIoU_per_image"] == results["saliency"]["max_mIoU_per_image"]


class _Outputs(nn.Module):
    """A "model" that returns the fixture's raw outputs (for validation_step)."""

    def __init__(self, raw: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.raw = raw
        self.decoder = nn.Identity()
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: x + self.weight for t, x in self.raw.items()}


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_validation_step_scores_as_their_evaluators_over_batches(fixture):
    """The module's validation path, one image per batch and all three padded in one batch."""
    from mtl_vision.balancing import EqualWeighting
    from mtl_vision.losses import MultiTaskLoss

    raw, batch = fixture["raw"], fixture["batch"]
    for split in ([slice(0, 3)], [slice(0, 1), slice(1, 2), slice(2, 3)]):
        module = MultiTaskModule(
            model=_Outputs(raw), loss=MultiTaskLoss(tasks=list(ORDER)), balancer=EqualWeighting(tasks=list(ORDER)),
            metrics={t: _metric(t) for t in ORDER}, optimizer=torch.optim.SGD,
        )  # fmt: skip
        for part in split:
            sub = {k: v[part] for k, v in batch.items()}
            sizes = sub[ORIGINAL_SIZE_KEY].tolist()
            h, w = max(s[0] for s in sizes), max(s[1] for s in sizes)
            sub = {k: (v[..., :h, :w] if k in ORDER else v) for k, v in sub.items()}
            module.model.raw = {t: x[part] for t, x in raw.items()}
            module.validation_step(sub, 0)
        results = {t: {k: float(v) for k, v in module.metrics[t].compute().items()} for t in ORDER}
        _check_against_theirs(results, fixture["record"]["theirs"], median_tol=0.01)  # median from a 0.01° histogram


def test_the_validation_loss_is_that_of_the_outputs_resized_to_each_image(fixture):
    import torch.nn.functional as F

    from mtl_vision.losses import cross_entropy

    raw, batch, sizes = fixture["raw"], fixture["batch"], fixture["sizes"]
    padded = tuple(batch["semseg"].shape[-2:])
    resized = raw_at_original_size({"semseg": raw["semseg"], "aux": {"x": {"semseg": raw["semseg"]}}}, sizes, padded)
    assert resized["semseg"].shape == (3, 21, *padded) and torch.equal(resized["aux"]["x"]["semseg"], resized["semseg"])
    per_pixel = []
    for i, (h, w) in enumerate(sizes):
        logits = F.interpolate(raw["semseg"][i : i + 1], size=(h, w), mode="bilinear", align_corners=False)
        target = batch["semseg"][i : i + 1, :h, :w]
        per_pixel.append(F.cross_entropy(logits, target, ignore_index=255, reduction="none")[target != 255])
    assert float(cross_entropy(resized["semseg"], batch["semseg"])) == pytest.approx(float(torch.cat(per_pixel).mean()), rel=1e-6)


def test_the_transform_keeps_the_targets_and_records_their_size():
    g = torch.Generator().manual_seed(0)
    sample = {
        "image": torch.randint(0, 256, (3, 11, 15), generator=g).float() / 255,
        "semseg": torch.randint(0, 21, (11, 15), generator=g),
        "human_parts": torch.full((11, 15), 255),
        "normals": torch.nn.functional.normalize(torch.randn(3, 11, 15, generator=g), dim=0),
        "saliency": (torch.rand(1, 11, 15, generator=g) > 0.5).float(),
    }
    resized = MTINetValTransform(size=[16, 16], normals_dtype="float64")(sample)
    out = MTINetValTransform(size=[16, 16], normals_dtype="float64", targets="original")(sample)
    assert torch.equal(out["image"], resized["image"]) and out["image"].shape == (3, 16, 16)
    for key in ("semseg", "human_parts", "normals", "saliency"):
        assert torch.equal(out[key], sample[key]), key
    assert out[ORIGINAL_SIZE_KEY].tolist() == [11, 15] and ORIGINAL_SIZE_KEY not in resized
    with pytest.raises(ValueError, match=r"data.val_transform.targets\) must be one of .*'resized', 'original'.*got 'orig'"):
        MTINetValTransform(size=[16, 16], targets="orig")


def test_mtl_eval_of_an_mtinet_experiment_scores_at_each_images_own_size(make_cfg, tmp_path):
    """mtl-eval of the imported MTI-Net PASCAL fixture on val images of 40x56 and 48x36 (the
    network runs at its 32x64): equal to each image scored alone through the proven maps."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import load_run
    from mtl_vision.cli.eval import evaluate
    from mtl_vision.data.pascal_fixture import write_pascal_fixture
    from mtl_vision.importing import import_checkpoint

    reference = FIXTURES / "reference"
    record = torch.load(reference / "mtinet_pascal.pt", map_location="cpu", weights_only=True)
    root = write_pascal_fixture(tmp_path / "PASCAL_MT", n=2, height=40, width=56)
    other = write_pascal_fixture(tmp_path / "other", n=2, height=48, width=36)
    for path in other.rglob("2008_000003.*"):  # the second val image at another size
        shutil.copy(path, root / path.relative_to(other))
    overrides = [*record["overrides"], f"data.root={root}", "data.num_workers=0", "data.val_batch_size=2"]
    cfg = make_cfg(overrides, tiny=False)
    assert cfg.data.val_transform.targets == "original"
    ckpt = import_checkpoint(cfg, source="mtinet", file=reference / "mtinet_pascal.pth", out=tmp_path / "run" / "checkpoints" / "x.ckpt")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        eval_cfg = compose(
            config_name="eval", overrides=[f"ckpt={ckpt}", "edge_exact=false", f"hydra.run.dir={tmp_path / 'eval'}"],
            return_hydra_config=True,
        )  # fmt: skip
    HydraConfig().set_config(eval_cfg)
    with open_dict(eval_cfg):
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
    metrics = evaluate(eval_cfg)
    assert all(math.isfinite(v) for v in metrics.values()), metrics

    # each val image alone: the model at 32x64, the maps their code stores at the image's size
    run_cfg, facts, state = load_run(ckpt)
    from mtl_vision.cli.build import build_module

    module = build_module(run_cfg, facts)
    module.load_state_dict(state)
    module.eval()
    dataset = instantiate(run_cfg.data).build_split("val", transform=instantiate(run_cfg.data.val_transform))
    assert [tuple(dataset[i]["semseg"].shape) for i in range(len(dataset))] == [(40, 56), (48, 36)]
    metrics_alone = {t: module.metrics[t] for t in ("semseg", "human_parts", "saliency", "normals")}  # fresh
    with torch.no_grad():
        for i in range(len(dataset)):
            sample = dataset[i]
            raw = module.model(sample["image"][None])
            size = [tuple(sample["semseg"].shape)]
            for task, metric in metrics_alone.items():
                target = sample[task][None]
                metric.update(stored_at_original_size(task, raw[task], size, size[0]), target)
    for task, metric in metrics_alone.items():
        for key, value in metric.compute().items():
            assert metrics[f"val/{task}/{key}"] == pytest.approx(float(value), rel=1e-9, abs=1e-9), (task, key)
    assert math.isfinite(metrics["val/edge/odsF_approx"])


@pytest.mark.parametrize(
    "experiment",
    ["hps_pascal", "padnet_pascal", "padnet_pascal_small", "mtinet_pascal", "mtinet_pascal_small", "mtinet_nyud",
     "mtlora_pascal"],
)  # fmt: skip
def test_the_pascal_experiments_of_mtinets_code_base_score_at_the_original_size(experiment, make_cfg):
    from hydra.utils import instantiate

    val = instantiate(make_cfg([f"experiment={experiment}"], tiny=False).data.val_transform)
    # NYUD's images are already 480x640; MTLoRA's evaluation scores the resized labels online
    expected = "original" if experiment.startswith(("hps_pascal", "padnet_pascal", "mtinet_pascal")) else "resized"
    assert isinstance(val, MTINetValTransform) and val.targets == expected
