"""What the tests against the authors' code share: the fixtures of scripts/reference_fixtures.py,
our model filled from a fixture's checkpoint by mtl-import's conversion, and the comparison."""

from __future__ import annotations

from pathlib import Path

import torch

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing import convert, load_exactly, read_state

FIXTURES = Path(__file__).parent / "fixtures" / "reference"

# the authors' utils.get_output encoding of a prediction, from our activated one (their depth is
# clamped at 0 there; our activation leaves it, the protocol's business)
AUTHORS_ENCODING = {
    "semseg": lambda p: p,
    "human_parts": lambda p: p,
    "depth": lambda p: p.clamp(min=0).permute(0, 2, 3, 1),
    "normals": lambda p: ((p + 1) * 255 / 2).permute(0, 2, 3, 1),
    "edge": lambda p: torch.squeeze(255 * p),
    "saliency": lambda p: 255 * p[:, 0],
}

# MTI-Net's code base: utils/utils.py get_output of a raw map, from our activated prediction
# (batch of one)
MTL_PYTORCH_ENCODING = {
    "semseg": lambda p: p,
    "human_parts": lambda p: p,
    "depth": lambda p: p.permute(0, 2, 3, 1),
    "normals": lambda p: ((p + 1.0) * 255 / 2.0).permute(0, 2, 3, 1),
    "edge": lambda p: torch.squeeze(255 * p),
    "saliency": lambda p: torch.squeeze(255 * p),
}


def assert_equal_to_reference(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Equal to 1e-5 relative to the reference's largest magnitude (float32)."""
    assert ours.shape == theirs.shape, f"{what}: shape {tuple(ours.shape)}, authors {tuple(theirs.shape)}"
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def assert_activated_equal_to_reference(out: dict, record: dict, what: str, encoding: dict | None = None) -> None:
    """Our activation of each raw output, in the authors' `get_output` encoding (`encoding`, by
    default the InvPT family's `AUTHORS_ENCODING`), against theirs: class labels exactly, the
    rest to 1e-5."""
    from mtl_vision.tasks import get_task

    encoding = encoding or AUTHORS_ENCODING
    for task, theirs in record["activated"].items():
        ours = encoding[task](get_task(task).activate(out[task]))
        if theirs.dtype.is_floating_point:
            assert_equal_to_reference(ours, theirs, f"{what} activated {task}")
        else:
            assert torch.equal(ours, theirs), f"{what} {task}: labels differ at {(ours != theirs).sum()} pixels"


def load_reference(name: str, make_cfg) -> tuple[dict, torch.nn.Module]:
    """(the fixture's record, our model of its config filled from its checkpoint, in eval mode)."""
    record = torch.load(FIXTURES / f"{name}.pt", map_location="cpu", weights_only=True)
    cfg = make_cfg([*record["overrides"], "backbone.pretrained=false"], tiny=False)
    facts = TaskFacts(
        tasks=list(record["tasks"]), task_channels=dict(record["task_channels"]), class_names={}, edge_tolerance=0.011
    )
    model = build_module(cfg, facts).model
    checkpoint = FIXTURES / f"{name}.pth"
    source = record["source"]
    load_exactly(model, convert(source, read_state(checkpoint), tasks=facts.tasks), path=checkpoint, source=source)
    return record, model.eval()


def image_of(record: dict) -> torch.Tensor:
    """The fixture's input in [0, 1] (stored as uint8 pixels or as floats)."""
    image = record["image"]
    return image.float() / 255 if image.dtype == torch.uint8 else image
