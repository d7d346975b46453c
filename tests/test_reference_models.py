"""Our published models against their authors' code (fixtures of scripts/reference_fixtures.py):
each fixture's checkpoint, in the authors' format, goes through mtl-import's conversion into the
model our config builds, and every output, final and intermediate, equals theirs to 1e-5."""

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

from mtl_vision.importing import convert, load_exactly, read_state

RECORDS = sorted(FIXTURES.glob("invpt_*.pt"))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_outputs_equal_the_authors(path, make_cfg):
    record, model = load_reference(path.stem, make_cfg)
    with torch.no_grad():
        out = model.decoder(model.encode(image_of(record)))
    assert set(out) - {"aux"} == set(record["outputs"])
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{path.stem} {task}")
    for name, maps in record["aux"].items():
        for task, theirs in maps.items():
            assert_equal_to_reference(out["aux"][name][task], theirs, f"{path.stem} {name} {task}")


@pytest.mark.parametrize("path", RECORDS, ids=[p.stem for p in RECORDS])
def test_activated_predictions_equal_the_authors(path, make_cfg):
    record, model = load_reference(path.stem, make_cfg)
    with torch.no_grad():
        out = model.decoder(model.encode(image_of(record)))
    assert_activated_equal_to_reference(out, record, f"{path.stem}")


@pytest.mark.parametrize("path", RECORDS[:1], ids=[p.stem for p in RECORDS[:1]])
def test_the_checkpoint_fills_the_model_exactly(path, make_cfg, tmp_path):
    record, model = load_reference(path.stem, make_cfg)
    state = read_state(path.with_suffix(".pth"))
    converted = convert(record["source"], state, tasks=record["tasks"])
    assert set(converted) == set(model.state_dict())
    # a missing and a mis-shaped tensor are both named, and the model keeps its weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    broken = dict(converted)
    dropped = min(broken)
    broken.pop(dropped)
    reshaped = next(k for k, v in broken.items() if v.ndim == 4)
    broken[reshaped] = broken[reshaped][:, :1]
    with pytest.raises(ValueError, match="of another shape") as err:
        load_exactly(model, broken, path="their.pth", source=record["source"])
    assert dropped in str(err.value) and reshaped in str(err.value) and "their.pth" in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
