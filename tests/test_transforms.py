"""Joint transforms: one geometry for all maps, flips negate normals' x, padding never counts."""

from __future__ import annotations

import pytest
import torch

from mtl_vision.data.synthetic import SyntheticScenes
from mtl_vision.data.transforms import TrainTransform, ValTransform, flip_sample, resize_sample
from mtl_vision.metrics import DepthMetrics, NormalMetrics, SegmentationMetrics
from mtl_vision.tasks import TASKS

ALL = ["semseg", "depth", "normals", "edge", "saliency", "human_parts"]


def _sample(index: int = 0, h: int = 48, w: int = 64) -> dict:
    return SyntheticScenes(split="val", tasks=ALL, height=h, width=w, num_samples=8, invalid_prob=1.0)[index]


def test_flip_twice_is_identity_and_negates_normals_x():
    s = _sample()
    once, twice = flip_sample(s), flip_sample(flip_sample(s))
    for key in ["image", *ALL]:
        assert torch.equal(twice[key], s[key]), key
    assert torch.equal(once["normals"][0], -s["normals"][0].flip(-1))
    assert torch.equal(once["normals"][1:], s["normals"][1:].flip(-1))
    assert torch.equal(once["semseg"], s["semseg"].flip(-1))


def test_geometry_resize_never_mixes_valid_and_invalid():
    s = _sample()
    s["depth"] = torch.where(s["depth"] > 0, torch.full_like(s["depth"], 3.0), s["depth"])  # constant where valid
    assert (s["depth"] == 0).any()
    for size in [(24, 32), (96, 128), (61, 77)]:
        r = resize_sample(s, size)
        valid = r["depth"] > 0
        assert torch.allclose(r["depth"][valid], torch.tensor(3.0)), "a valid pixel mixed in an invalid (zero) value"
        n_valid = r["normals"].abs().sum(0) > 0
        assert torch.allclose(r["normals"].norm(dim=0)[n_valid], torch.tensor(1.0), atol=1e-5)
        assert set(r["semseg"].unique().tolist()) <= set(s["semseg"].unique().tolist()), "class maps must use nearest"
        assert r["semseg"].dtype == torch.int64 and r["semseg"].shape == size


def test_train_transform_crops_pads_and_keeps_targets_aligned():
    torch.manual_seed(0)
    t = TrainTransform(crop_size=[40, 56], scale_range=[0.5, 0.6], flip_prob=1.0)
    s = t(_sample())  # scaled to about 26x35: must be padded up to the crop
    assert s["image"].shape == (3, 40, 56)
    for key in ALL:
        assert s[key].shape[-2:] == (40, 56), key
    # Padded pixels carry the ignore / invalid value in every target, and black in the image.
    pad = (s["image"].sum(0) == 0) & (s["semseg"] == 255)
    assert pad.any()
    assert (s["human_parts"][pad] == 255).all() and (s["edge"][0][pad] == 255).all() and (s["saliency"][0][pad] == 255).all()
    assert (s["depth"][0][pad] == 0).all() and (s["normals"][:, pad] == 0).all()
    assert (s["semseg"] == 255).sum() == pad.sum(), "the synthetic scene has no 255 labels of its own"
    assert 0 <= s["image"].min() and s["image"].max() <= 1


def test_train_transform_is_random_but_seedable():
    t = TrainTransform(crop_size=[32, 32])
    torch.manual_seed(1)
    a = t(_sample())
    torch.manual_seed(1)
    b = t(_sample())
    torch.manual_seed(2)
    c = t(_sample())
    assert torch.equal(a["image"], b["image"]) and not torch.equal(a["image"], c["image"])


def test_validation_padding_leaves_metrics_of_the_original_region_unchanged():
    s = _sample(h=40, w=50)
    p = ValTransform(size=[48, 64])(s)
    assert p["image"].shape == (3, 48, 64)
    gen = torch.Generator().manual_seed(0)
    checks = [
        ("semseg", SegmentationMetrics(num_classes=6), lambda h, w: torch.randint(0, 6, (1, h, w), generator=gen)),
        ("depth", DepthMetrics(), lambda h, w: torch.rand(1, 1, h, w, generator=gen) * 5),
        ("normals", NormalMetrics(), lambda h, w: torch.randn(1, 3, h, w, generator=gen)),
    ]
    for task, metric, make in checks:
        pred_padded = make(48, 64)
        pred = pred_padded[..., :40, :50]
        metric.update(TASKS[task].activate(pred.float()) if task == "normals" else pred, s[task][None])
        original = metric.compute()
        metric.reset()
        metric.update(TASKS[task].activate(pred_padded.float()) if task == "normals" else pred_padded, p[task][None])
        padded = metric.compute()
        for key in original:
            assert torch.allclose(original[key], padded[key], equal_nan=True), (task, key)


def test_argument_and_size_errors():
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransform(crop_size=[32])
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(crop_size=[32, 32], scale_range=[2.0, 1.0])
    big = _sample()
    assert ValTransform(size=[32, 32])(big)["image"].shape == (3, 48, 64), "never crops or resizes"
    assert ValTransform(size=[32, 80])(big)["semseg"].shape == (48, 80)
