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


def _reference_train(t: TrainTransform, sample: dict) -> dict:
    """TrainTransform as composed from the public steps, all in torch: jitter on the whole image,
    crop, `resize_sample`, `pad_sample`, `flip_sample` (the definition the fast path must equal)."""
    import math

    from torchvision.transforms.v2 import functional as TF

    from mtl_vision.data.transforms import _rotate_hue, crop_sample, pad_sample

    image = sample["image"]
    for name, factor in t._jitter_draws():
        image = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
                 "saturation": TF.adjust_saturation, "hue": _rotate_hue}[name](image, factor)
    sample = dict(sample, image=image.clamp(0, 1))
    h, w = image.shape[-2:]
    (ch, cw), scale = t.crop_size, t._uniform(*t.scale_range)
    rh, rw = max(1, round(ch / scale)), max(1, round(cw / scale))
    top, left = t._randint(min(0, h - rh), max(0, h - rh)), t._randint(min(0, w - rw), max(0, w - rw))
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + rh, h), min(left + rw, w)
    sample = crop_sample(sample, y0, x0, (y1 - y0, x1 - x0))
    size = (min(ch, max(1, round((y1 - y0) * ch / rh))), min(cw, max(1, round((x1 - x0) * cw / rw))))
    if size != (y1 - y0, x1 - x0):
        sample = resize_sample(sample, size)
    if size != (ch, cw):
        sample = pad_sample(sample, (ch, cw), top=min(round((y0 - top) * ch / rh), ch - size[0]),
                            left=min(round((x0 - left) * cw / rw), cw - size[1]))
    assert not math.isnan(scale)
    return flip_sample(sample) if float(torch.rand(())) < t.flip_prob else sample


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fast_train_transform_equals_the_torch_composition_bit_for_bit(layout):
    """The compiled jitter, the jitter after contrast on the crop only and the fused resize + pad +
    flip (on one thread, large enough crops) give exactly the torch composition's tensors."""
    from mtl_vision.data import resample

    torch.set_num_threads(1)
    assert resample.available()
    t = TrainTransform(crop_size=[112, 144])
    scenes = SyntheticScenes(split="val", tasks=ALL, height=120, width=160, num_samples=4, invalid_prob=1.0)
    for seed in range(12):
        sample = scenes[seed % 4]
        if layout == "channels_last":  # as read_rgb lays out decoded images
            sample["image"] = sample["image"].permute(1, 2, 0).contiguous().permute(2, 0, 1)
        torch.manual_seed(seed)
        want = _reference_train(t, sample)
        torch.manual_seed(seed)
        got = t(sample)
        for key in ["image", *ALL]:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), (seed, key)
