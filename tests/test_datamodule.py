"""The datamodule built from the real data config: task channels, batches, errors."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException

from mtl_vision.cli.build import build_datamodule


def test_batches_are_task_dicts_with_the_design_shapes(make_cfg):
    dm = build_datamodule(make_cfg())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    n, h, w = 4, 64, 80
    assert batch["image"].shape == (n, 3, h, w) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["semseg"].shape == (n, h, w) and batch["semseg"].dtype == torch.int64
    assert batch["human_parts"].shape == (n, h, w) and batch["human_parts"].dtype == torch.int64
    assert batch["depth"].shape == (n, 1, h, w)
    assert batch["normals"].shape == (n, 3, h, w)
    assert batch["edge"].shape == (n, 1, h, w) and batch["saliency"].shape == (n, 1, h, w)
    assert len(batch["meta"]["name"]) == n


def test_task_channels_follow_the_dataset_classes(make_cfg):
    dm = build_datamodule(make_cfg(["data.dataset.classes=[floor,wall,box,person]"]))
    assert dm.task_channels == {"semseg": 4, "depth": 1, "normals": 3, "edge": 1, "saliency": 1, "human_parts": 7}
    assert dm.class_names["semseg"] == ["floor", "wall", "box", "person"]


def test_task_subset_reaches_the_dataset(make_cfg):
    dm = build_datamodule(make_cfg(["data.tasks=[depth,edge]"]))
    dm.setup("validate")
    sample = dm.val_set[0]
    assert set(sample) == {"image", "depth", "edge", "meta"}
    assert dm.task_channels == {"depth": 1, "edge": 1}


def test_bad_task_list_is_rejected(make_cfg):
    # Hydra wraps constructor errors; the message still names the key and the bad value.
    with pytest.raises(InstantiationException, match="unknown task 'segmentation'"):
        build_datamodule(make_cfg(["data.tasks=[semseg,segmentation]"]))
    with pytest.raises(InstantiationException, match="duplicated"):
        build_datamodule(make_cfg(["data.tasks=[depth,depth]"]))
