"""`init_from=<ckpt>`: fine-tuning starts from another run's model weights only, with the keys it
could not use reported and mismatched shapes refused before anything is written."""

from __future__ import annotations

import pytest
import torch

from mtl_vision.cli.build import build_datamodule, build_module
from mtl_vision.cli.train import train
from mtl_vision.engine.weights import load_model_weights, model_state_from_file

SHORT = ["trainer.max_steps=1", "~callbacks.pictures", "data.tasks=[semseg,depth]"]


@pytest.fixture
def source(make_cfg, tmp_path):
    """A finished two-task run's last.ckpt."""
    train(make_cfg(SHORT, run_dir=tmp_path / "source"))
    return tmp_path / "source" / "checkpoints" / "last.ckpt"


def test_a_new_task_and_balancer_start_from_the_weights_of_another_run(make_cfg, source):
    cfg = make_cfg([*SHORT, "data.tasks=[semseg,depth,normals]", "balancer=uncertainty", f"init_from={source}"])
    module = build_module(cfg, build_datamodule(cfg))
    fresh = {k: v.clone() for k, v in module.model.state_dict().items()}
    report = load_model_weights(module.model, source)
    weights = model_state_from_file(source)
    state = module.model.state_dict()
    for key in report.loaded:
        assert torch.equal(state[key], weights[key]), key
    assert report.missing and all(".normals" in k or "normals" in k for k in report.missing), report.missing
    for key in report.missing:
        assert torch.equal(state[key], fresh[key]), f"{key} should keep its initialisation"
    assert not report.unexpected and not report.mismatched
    assert any(k.startswith("backbone.") for k in report.loaded)
    assert "kept the initialisation of" in report.summary(source) and "normals" in report.summary(source)


def test_init_from_trains_and_logs_what_it_loaded(make_cfg, source, tmp_path, caplog):
    cfg = make_cfg([*SHORT, "data.tasks=[semseg,depth,normals]", "balancer=uncertainty", f"init_from={source}"],
                   run_dir=tmp_path / "finetune")  # fmt: skip
    with caplog.at_level("INFO"):
        train(cfg)
    assert any("init_from=" in r.getMessage() and "loaded" in r.getMessage() for r in caplog.records)
    ckpt = torch.load(tmp_path / "finetune" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1, "weights only: the step count starts afresh"


def test_a_mismatched_shape_is_refused_before_anything_is_written(make_cfg, source, tmp_path):
    run = tmp_path / "wider"
    cfg = make_cfg([*SHORT, "decoder.channels=32", f"init_from={source}"], run_dir=run)
    with pytest.raises(ValueError, match=r"another shape in the file than in this model: decoder\..*file \(16, .*model \(32,"):
        train(cfg)
    assert not run.exists()
    skip = make_cfg([*SHORT, "decoder.channels=32", f"init_from={source}", "init_from_skip_mismatched=true"],
                    run_dir=run)  # fmt: skip
    module = build_module(skip, build_datamodule(skip))
    report = load_model_weights(module.model, source, skip_mismatched=True)
    assert report.mismatched and report.loaded


def test_init_from_errors_name_the_file(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="nothing.ckpt"):
        load_model_weights(model, tmp_path / "nothing.ckpt")
    foreign = tmp_path / "foreign.pth"
    torch.save({"model": {"weight": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(ValueError, match="foreign.pth.*holds no 'state_dict'"):
        load_model_weights(model, foreign)
