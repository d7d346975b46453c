"""peft=mtlora + decoder=mtlora against the authors' MTLoRA (fixtures of scripts/fixtures/mtlora.py):
their checkpoint goes through mtl-import's conversion into the model our experiment config builds,
and the final outputs, the heads' outputs and every per-task stage feature equal theirs to 1e-5,
from one backbone pass. The trainable-parameter counts of every shipped config equal theirs."""

from __future__ import annotations

import json

import pytest
import torch
from reference import FIXTURES, assert_equal_to_reference, image_of, load_reference

from mtl_vision.cli.build import TaskFacts, build_module
from mtl_vision.importing.mtlora import to_ours

VARIANTS = ["pascal", "pascal_plus", "pascal_pertask_plus"]  # MTLoRA r4/t2, MTLoRA+ r3, MTLoRA+ r4/t2
PASCAL = {"semseg": 21, "human_parts": 7, "saliency": 1, "normals": 3, "edge": 1}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("variant", VARIANTS)
def test_outputs_and_stage_features_equal_the_authors(variant, make_cfg):
    record, model = load_reference(f"mtlora_{variant}", make_cfg)
    image = image_of(record)
    calls = []
    model.backbone.register_forward_hook(lambda module, inputs, output: calls.append(1))
    with torch.no_grad():
        features = model.encode(image)
        out = model(image)
        heads = model.decoder(features)
    assert len(calls) == 2, "one backbone pass per forward"
    assert set(features) == set(record["task_stages"])
    for task, maps in record["task_stages"].items():
        assert len(features[task]) == len(maps)
        for i, theirs in enumerate(maps):
            assert_equal_to_reference(features[task][i], theirs, f"{variant} {task} stage {i}")
    for task, theirs in record["heads"].items():
        assert_equal_to_reference(heads[task], theirs, f"{variant} {task} head")
    for task, theirs in record["outputs"].items():
        assert_equal_to_reference(out[task], theirs, f"{variant} {task}")


def test_shared_path_equals_the_authors(make_cfg):
    """The task-agnostic stage outputs (what feeds the next stage) equal theirs too."""
    from mtl_vision.models.peft import _run_blocks

    record, model = load_reference("mtlora_pascal", make_cfg)
    backbone = model.backbone
    x = (image_of(record) - backbone.mean) / backbone.std
    shared = []
    stages = list(backbone.model.children())
    with torch.no_grad():
        x = stages[0](x)
        for i, stage in enumerate(stages[1:]):
            x, _ = _run_blocks(stage.blocks, stage.downsample(x), backbone.tasks)
            merged = stages[i + 2].downsample(x) if i + 2 < len(stages) else x
            shared.append(merged.permute(0, 3, 1, 2))
    for i, theirs in enumerate(record["shared_stages"]):
        assert_equal_to_reference(shared[i], theirs, f"shared stage {i}")


def test_trainable_count_equals_their_fixture_model(make_cfg):
    for variant in VARIANTS:
        record, model = load_reference(f"mtlora_{variant}", make_cfg)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == record["trainable"], variant


COUNTS = (
    json.loads((FIXTURES / "mtlora_trainable.json").read_text())
    if (FIXTURES / "mtlora_trainable.json").exists()
    else {}
)


def _ours(shipped: str) -> list[str]:
    """Our overrides of one of their configs/mtlora/tiny_448 files."""
    rank = shipped.split("_r")[1].split("_")[0]
    plus = shipped.startswith("mtlora_plus")
    pertask = shipped.endswith("_pertask")
    experiment = "mtlora_plus_pertask_pascal" if plus and pertask else "mtlora_plus_pascal" if plus else "mtlora_pascal"
    return [
        f"experiment={experiment}",
        f"peft.rank_shared={rank}",
        "data.tasks=[semseg,human_parts,saliency,normals,edge]",
    ]


@pytest.mark.parametrize("shipped", sorted(COUNTS))
def test_trainable_counts_of_the_shipped_configs(shipped, make_cfg):
    """Their main.py's 'Number of trainable params' (decoder included) at full size: Swin-T 448, PASCAL's 5 tasks."""
    cfg = make_cfg([*_ours(shipped), "backbone.pretrained=false"], tiny=False)
    facts = TaskFacts(tasks=list(PASCAL), task_channels=PASCAL, class_names={}, edge_tolerance=0.0075)
    model = build_module(cfg, facts).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    decoder = sum(p.numel() for p in model.decoder.parameters())
    assert (trainable, decoder) == (COUNTS[shipped]["trainable"], COUNTS[shipped]["decoder"])


def test_import_renames_and_drops_only_recomputed_buffers():
    state = {
        "backbone.layers.0.blocks.1.attn_mask": torch.zeros(1),
        "backbone.layers.0.blocks.1.attn.relative_position_index": torch.zeros(1),
        "backbone.layers.0.blocks.1.attn.proj.lora_tasks_A.sal": torch.zeros(1),
        "backbone.layers.1.downsample.reduction.linear.weight": torch.zeros(1),
        "backbone.layers.1.downsample.reduction.weight": torch.zeros(1),
        "decoders.decoders.sal.last_layer.3.bias": torch.zeros(1),
        "downsampler.sal.downsample_2.weight": torch.zeros(1),
    }
    assert set(to_ours(state, tasks=["saliency"])) == {
        "backbone.model.layers_0.blocks.1.attn.proj.task_A.saliency",
        "backbone.model.layers_2.downsample.reduction.base.weight",
        "backbone.model.layers_2.downsample.reduction.weight",
        "decoder.heads.saliency.1.bias",
        "decoder.project.saliency.2.weight",
    }
    # a trainable scale (TRAINABLE_SCALE_SHARED, not in the shipped configs) is passed on for the strict load to name
    scale = "backbone.layers.0.blocks.0.attn.qkv.lora_shared_scale"
    assert "backbone.model.layers_0.blocks.0.attn.qkv.lora_shared_scale" in to_ours(
        {**state, scale: torch.zeros(1)}, tasks=["saliency"]
    )
    with pytest.raises(ValueError, match="keys of no MTLoRA module.*backbone.head.weight"):
        to_ours({**state, "backbone.head.weight": torch.zeros(1)}, tasks=["saliency"])
    with pytest.raises(ValueError, match="trained on tasks"):
        to_ours(state, tasks=["semseg"])
