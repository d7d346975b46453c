"""decoder=taskprompter against the authors' TaskPrompter (fixtures of
`scripts/reference_fixtures.py taskprompter`): their checkpoint goes through mtl-import's
conversion into the model our config builds, and every output equals theirs to 1e-5."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from reference import (
    FIXTURES,
    assert_activated_equal_to_reference,
    assert_equal_to_reference,
    load_reference,
)

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing import read_state
from mtl_vision.importing.taskprompter import to_ours

DATASETS = ["nyud", "pascal"]

pytestmark = pytest.mark.usefixtures("one_thread")

def load(dataset: str, make_cfg):
    return load_reference(f"taskprompter_{dataset}", make_cfg)


def predict(model, image: torch.Tensor) -> dict:
    """Our forward: `MultiTaskModel.encode` runs the decoder's prompted encoder."""
    with torch.no_grad():
        return model(image)


@pytest.mark.parametrize("dataset", DATASETS)
def test_outputs_equal_the_authors(dataset, make_cfg):
    record, model = load(dataset, make_cfg)
    mean, std = (torch.tensor(record[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert torch.equal(model.backbone.mean, mean) and torch.equal(model.backbone.std, std)
    out = predict(model, record["image"])
    assert set(out) == set(record["outputs"]) and not record["aux"]
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{dataset} {task}")
    assert_activated_equal_to_reference(out, record, f"{dataset}")


def test_the_conversion_checks_tasks_and_keys():
    state = read_state(FIXTURES / "taskprompter_pascal.pth")
    converted = to_ours(state, tasks=["semseg", "human_parts", "saliency", "normals", "edge"])
    prompts = state["backbone.task_prompts"]
    assert torch.equal(converted["decoder.prompter.prompts.saliency"], prompts[2:3])  # their order, split per task
    with pytest.raises(ValueError, match=r"trained on tasks .*saliency"):
        to_ours(state, tasks=["semseg", "depth"])
    with pytest.raises(ValueError, match="backbone.extra"):
        to_ours({**state, "backbone.extra": prompts})


VIT_ON_SYNTHETIC = [
    "decoder=taskprompter",
    "backbone=test_vit",
    "++backbone.final_norm=true",
    "++backbone.out_indices=[1,3,4,5]",
    "++backbone.model_kwargs.img_size=[64,80]",
    "decoder.image_size=[64,80]",
    "decoder.depth=6",
    "decoder.num_heads=2",
    "decoder.fused_channels=12",
    "decoder.channel_windows=1",
    "data.tasks=[semseg,depth,saliency]",
]


def test_every_parameter_gets_a_gradient(make_cfg):
    """DDP (without find_unused_parameters) needs a gradient for every parameter: also for the
    last block's prompt update and timm's class token, which no output depends on (zeros)."""
    cfg = make_cfg(VIT_ON_SYNTHETIC)
    model = build_module(cfg, TaskFacts(["semseg", "depth", "saliency"], {"semseg": 6, "depth": 1, "saliency": 1},
                                        {}, 0.011)).model  # fmt: skip
    image = torch.rand(2, 3, 64, 80)
    features = model.decoder.encode(model.backbone, (image - model.backbone.mean) / model.backbone.std)
    out = model.decode(features, (64, 80))
    assert out["semseg"].shape == (2, 6, 64, 80) and model.decoder.aux_names == ()
    sum(o.square().mean() for o in out.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    assert not model.decoder.prompter.from_pixels[-1].weight.grad.any()
    assert model.decoder.prompter.from_pixels[0].weight.grad.any()


def test_it_refuses_inputs_and_backbones_it_was_not_built_for(make_cfg):
    cfg = make_cfg(VIT_ON_SYNTHETIC)
    model = build_module(cfg, TaskFacts(["semseg"], {"semseg": 6}, {}, 0.011)).model
    with pytest.raises(ValueError, match="built for 4x5 patches"):
        model.decoder.encode(model.backbone, torch.rand(1, 3, 64, 96))
    with pytest.raises(ValueError, match="encode"):
        model.decoder(model.backbone(torch.rand(1, 3, 64, 80)))
    cnn = make_cfg(["decoder=taskprompter", "decoder.image_size=[64,80]"])
    with pytest.raises(InstantiationException, match="blocks of a ViT"):  # hydra wraps the ValueError
        build_module(cnn, TaskFacts(["semseg"], {"semseg": 6}, {}, 0.011))
