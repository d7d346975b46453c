"""Our published models against their authors' code (fixtures of scripts/reference_fixtures.py):
each fixture's checkpoint, in the authors' format, goes through mtl-import's conversion into the
model our config builds, and every output, final and intermediate, equals theirs to 1e-5."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing import convert, load_exactly, read_state
from mtl_vision.tasks import get_task

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
RECORDS = sorted(FIXTURES.glob("invpt_*.pt"))

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_equal_to_reference(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to 1e-5 relative to the reference's largest magnitude (float32)."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, authors {tuple(theirs.shape)}"
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def reference_model(record: dict, make_cfg):
    cfg = make_cfg([*record["overrides"], "backbone.pretrained=false"], tiny=False)
    facts = TaskFacts(
        tasks=list(record["tasks"]),
        task_channels=dict(record["task_channels"]),
        class_names={},
        edge_tolerance=0.011,
    )
    model = build_module(cfg, facts).model
    checkpoint = Path(str(record["path"]).replace(".pt", ".pth"))
    state = read_state(checkpoint)
    load_exactly(model, convert(record["source"], state, tasks=facts.tasks), path=checkpoint, source=record["source"])
    return model.eval()


def load_record(path: Path) -> dict:
    record = torch.load(path, map_location="cpu", weights_only=True)
    record["path"] = str(path)
    return record


def image_of(record: dict) -> torch.Tensor:
    image = record["image"]
    return image.float() / 255 if image.dtype == torch.uint8 else image


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_outputs_equal_the_authors(path, make_cfg):
    record = load_record(path)
    model = reference_model(record, make_cfg)
    with torch.no_grad():
        out = model.decoder(model.encode(image_of(record)))
    assert set(out) - {"aux"} == set(record["outputs"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{path.stem} {task}")
    for name, maps in record["aux"].items():
        for task, theirs in maps.items():
            assert_equal_to_reference(out["aux"][name][task], theirs, f"{path.stem} {name} {task}")


# the authors' stored encodings of an activated prediction (their utils.get_output), from ours
AUTHORS_ENCODING = {
    "semseg": lambda p: p,
    "human_parts": lambda p: p,
    "depth": lambda p: p.clamp(min=0).permute(0, 2, 3, 1),
    "normals": lambda p: ((p + 1) * 255 / 2).permute(0, 2, 3, 1),
    "edge": lambda p: (255 * p).squeeze(),
    "saliency": lambda p: 255 * p[:, 0],
}


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_activated_predictions_equal_the_authors(path, make_cfg):
    record = load_record(path)
    model = reference_model(record, make_cfg)
    with torch.no_grad():
        out = model.decoder(model.encode(image_of(record)))
    for task, theirs in record["activated"].items():
        ours = AUTHORS_ENCODING[task](get_task(task).activate(out[task]))
        if theirs.dtype.is_floating_point:
            assert_equal_to_reference(ours, theirs, f"{path.stem} activated {task}")
        else:
            assert torch.equal(ours, theirs), f"{path.stem} {task}: labels differ at {(ours != theirs).sum()} pixels"


@pytest.mark.parametrize("path", RECORDS[:1], ids=[p.stem for p in RECORDS[:1]])
def test_the_checkpoint_fills_the_model_exactly(path, make_cfg, tmp_path):
    record = load_record(path)
    model = reference_model(record, make_cfg)
    state = read_state(Path(str(path).replace(".pt", ".pth")))
    converted = convert(record["source"], state, tasks=record["tasks"])
    assert set(converted) == set(model.state_dict())
    # a missing and a mis-shaped tensor are both named, and the model keeps its weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = dict(converted)
    dropped = sorted(broken)[0]
    broken.pop(dropped)
    reshaped = next(k for k, v in broken.items() if v.ndim == 4)
    broken[reshaped] = broken[reshaped][:, :1]
    with pytest.raises(ValueError, match="of another shape") as err:
        load_exactly(model, broken, path="their.pth", source=record["source"])
    assert dropped in str(err.value) and reshaped in str(err.value) and "their.pth" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
