"""decoder=ctal against the authors' EMA-Net (fixtures of scripts/fixtures/ctal.py): their checkpoint
goes through mtl-import's conversion into the model our config builds, and the final and initial
predictions, the HRNet branches, the fused map, every task's affinity matrix, the fused cross-task
affinity and the propagated features equal theirs to 1e-5."""

from __future__ import annotations

import pytest
import torch
from reference import (
    FIXTURES,
    assert_activated_equal_to_reference,
    assert_equal_to_reference,
    image_of,
    load_reference,
)

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing import convert, load_exactly, read_state
from mtl_vision.importing.ctal import to_ours

DATASETS = ["nyud", "cityscapes"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _forward(model: torch.nn.Module, record: dict) -> tuple[dict, list[torch.Tensor], dict]:
    """(outputs at the image size, backbone levels, the decoder's intermediates) of the fixture image."""
    model.decoder.record_intermediates = True
    image = image_of(record)
    with torch.no_grad():
        out = model(image)
        levels = model.encode(image)
    return out, levels, model.decoder.last_intermediates


def _compare(out: dict, levels: list, seen: dict, record: dict, what: str) -> None:
    assert set(out) - {"aux"} == set(record["outputs"]) and set(out["aux"]) == set(record["aux"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{what} {task}")
    for name, maps in record["aux"].items():
        for task, theirs in maps.items():
            assert_equal_to_reference(out["aux"][name][task], theirs, f"{what} {name} {task}")
    theirs = record["intermediates"]
    for i, (ours, branch) in enumerate(zip(levels, theirs["branches"], strict=True)):
        assert_equal_to_reference(ours, branch, f"{what} HRNet branch {i}")
    assert_equal_to_reference(seen["shared"], theirs["shared"], f"{what} fused map")
    assert_equal_to_reference(seen["fused_affinity"], theirs["fused_affinity"], f"{what} fused affinity")
    for key in ("affinities", "propagated"):
        for task, value in theirs[key].items():
            assert_equal_to_reference(seen[key][task], value, f"{what} {key} {task}")


@pytest.mark.parametrize("dataset", DATASETS)
def test_outputs_and_intermediates_equal_the_authors(dataset, make_cfg):
    record, model = load_reference(f"ctal_{dataset}", make_cfg)
    assert model.backbone.mean.flatten().tolist() == record["mean"]  # their images go in as they are
    assert model.backbone.std.flatten().tolist() == record["std"]
    assert model.decoder.affinity.gamma == pytest.approx(record["gamma"])
    _compare(*_forward(model, record), record, dataset)


@pytest.mark.parametrize("dataset", DATASETS)
def test_activated_predictions_equal_the_authors(dataset, make_cfg):
    record, model = load_reference(f"ctal_{dataset}", make_cfg)
    with torch.no_grad():
        out = model(image_of(record))
    assert_activated_equal_to_reference(out, record, dataset)


def test_our_task_order_permutes_the_fusion_channels(make_cfg):
    # the fusion interleaves the tasks in our order; the import reorders its input channels
    record = torch.load(FIXTURES / "ctal_nyud.pt", map_location="cpu", weights_only=True)
    tasks = ["normals", "semseg", "depth"]
    cfg = make_cfg([*record["overrides"], f"data.tasks=[{','.join(tasks)}]", "backbone.pretrained=false"], tiny=False)
    channels = {t: record["task_channels"][t] for t in tasks}
    facts = TaskFacts(tasks=tasks, task_channels=channels, class_names={}, edge_tolerance=0.011)
    model = build_module(cfg, facts).model.eval()
    path = FIXTURES / "ctal_nyud.pth"
    load_exactly(model, convert("ctal", read_state(path), tasks=tasks), path=path, source="ctal")
    assert model.decoder.tasks == tasks
    _compare(*_forward(model, record), record, "nyud in our order")


def test_import_is_strict_and_drops_only_the_loss_weights():
    state = read_state(FIXTURES / "ctal_cityscapes.pth")
    assert all(k.startswith("model.") for k in state)  # MTR_Net.state_dict(), no wrapper dict
    ours = to_ours(dict(state), tasks=["semseg", "depth"])
    # their Uncertainty loss weighting keeps log-variances beside the network: no weights of ours
    with_loss = {**state, "criterion.loss_weighting.weights.semseg": torch.zeros(())}
    assert set(to_ours(with_loss, tasks=["semseg", "depth"])) == set(ours)
    assert "decoder.fuse.fuse.0.weight" in ours and "decoder.affinity.fusion.conv.weight" in ours
    assert any(k.startswith("backbone.model.stage4.") for k in ours)
    with pytest.raises(ValueError, match="model.something_new"):
        to_ours({**state, "model.something_new.weight": torch.zeros(1)}, tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match="trained on tasks"):
        to_ours(dict(state), tasks=["semseg", "depth", "normals"])


def test_mtl_import_writes_a_checkpoint_of_their_weights(make_cfg, tmp_path):
    from mtl_vision.cli.build import load_run
    from mtl_vision.data.nyud_fixture import write_nyud_fixture
    from mtl_vision.importing import import_checkpoint

    record = torch.load(FIXTURES / "ctal_nyud.pt", map_location="cpu", weights_only=True)
    root = write_nyud_fixture(tmp_path / "nyuv2", layout="mtan", n=1, height=32, width=64)
    cfg = make_cfg([*record["overrides"], f"data.root={root}", "data.num_workers=0"], tiny=False)
    path = FIXTURES / "ctal_nyud.pth"
    out = import_checkpoint(cfg, source="ctal", file=path, out=tmp_path / "run" / "checkpoints" / "ctal.ckpt")
    _, facts, state = load_run(out)
    assert facts.tasks == record["tasks"] and facts.task_channels == record["task_channels"]
    theirs = read_state(path)
    for ours, key in (
        ("model.decoder.affinity.fusion.conv.weight", "model.affinity_learning_module.spatial_att.fusion.weight"),
        (
            "model.backbone.model.stage4.0.branches.3.1.conv2.weight",
            "model.backbone.0.stage4.0.branches.3.1.conv2.weight",
        ),
    ):
        assert state[ours].dtype == torch.float32  # their float16 tensors, cast to our parameters' dtype
        torch.testing.assert_close(state[ours], theirs[key].float(), rtol=0, atol=0)


@pytest.mark.parametrize("dataset", DATASETS)
def test_losses_equal_the_authors(dataset, make_cfg):
    # their EMANetLoss + Scalarization: sum_t w_t (L_initial_t + L_final_t), the initial predictions
    # upsampled to the image first; ours: loss.aux_weight 1 adds the initial loss to its task's,
    # the balancer weighs the tasks (experiment=ctal_nyud: ew; their Cityscapes 1 / 10: fixed);
    # normals: their 1 - mean cosine is loss.task_kwargs.normals.distance=cosine (ctal_nyud's)
    from mtl_vision.balancing import FixedWeighting
    from mtl_vision.losses import MultiTaskLoss

    record, model = load_reference(f"ctal_{dataset}", make_cfg)
    theirs = record["loss"]
    with torch.no_grad():
        out = model(image_of(record))
    kwargs = {"normals": {"distance": "cosine"}}
    loss = MultiTaskLoss(tasks=record["tasks"], task_kwargs=kwargs, aux_weight=1.0)
    ours = loss(out, theirs["targets"])
    balancer = FixedWeighting(tasks=record["tasks"], weights=theirs["weights"])
    for task in record["tasks"]:
        assert_equal_to_reference(
            loss.last_aux[f"{task}/initial"], theirs["initial"][task], f"{dataset} initial {task}"
        )
        assert_equal_to_reference(ours[task], theirs["initial"][task] + theirs["final"][task], f"{dataset} {task}")
    assert_equal_to_reference(balancer(ours), theirs["total"], f"{dataset} total")
