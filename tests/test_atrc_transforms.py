"""The ATRC data pipeline (InvPT, TaskPrompter, MLoRE) equals the authors' `data/transforms.py`.

tests/fixtures/reference/atrc_transforms.pt holds their pipeline run step by step on tiny samples
with recorded draws (scripts/fixtures/atrc_transforms.py); each step of ours replays the same
draws on their input of that step, and the whole transform replays them on our sample.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from replay import Replay, assert_planes_equal, assert_seeded_by_torch_alone, draws_of, sample_of

from mtl_vision.data.atrc_transforms import (
    IMAGENET_MEAN,
    ATRCTrainTransform,
    ATRCValTransform,
    crop_planes,
    flip_planes,
    from_planes,
    ignore_unannotated_parts,
    is_balanced,
    pad_centred,
    scale_planes,
    to_planes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "atrc_transforms.pt"
RECORD = torch.load(FIXTURE, map_location="cpu", weights_only=True)
TRAIN = {case["name"]: case for case in RECORD["train"]}
VAL = {case["name"]: case for case in RECORD["val"]}
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
EXPERIMENTS = [f"{m}_{d}" for m in ("invpt", "taskprompter", "mlore") for d in ("nyud", "pascal")]
SAME_OPENCV = cv2.__version__ == RECORD["cv2"]


def _planes(stored: dict) -> dict[str, np.ndarray]:
    """Their HxWxC arrays of one step, as our planes."""
    return {key: x.numpy().astype(np.float32) for key, x in stored.items()}


def _transform(case: dict, draws: list) -> ATRCTrainTransform:
    t = ATRCTrainTransform(crop_size=case["crop"])
    t.draws = Replay(draws)
    return t


def assert_matches_their_output(ours: dict, theirs: dict) -> None:
    """Ours against their ToTensor output: their normalised image, float targets with 255 for
    unlabelled normals and depth (InvPT's AddIgnoreRegions) where ours holds zeros."""
    assert set(ours) == set(theirs)
    image = theirs["image"]
    torch.testing.assert_close((ours["image"] - MEAN) / STD, image, rtol=0, atol=1e-6)
    padded = image == 0  # never a pixel's value: the mean times 255 is not an integer
    assert torch.equal(ours["image"][padded], MEAN.expand_as(image)[padded]), "image padding is the mean colour"
    for key in ("semseg", "human_parts"):
        if key in theirs:
            assert ours[key].dtype == torch.int64 and torch.equal(ours[key], theirs[key][0].long()), key
    for key in ("edge", "saliency"):
        if key in theirs:
            assert torch.equal(ours[key], theirs[key].float()), key
    if "depth" in theirs:
        depth = torch.where(theirs["depth"] == 255, 0.0, theirs["depth"])
        torch.testing.assert_close(ours["depth"], depth, rtol=0, atol=1e-6)
    if "normals" in theirs:
        invalid = (theirs["normals"] == 255).all(dim=0)
        assert torch.equal(invalid, (ours["normals"] == 0).all(dim=0)), "the same invalid normals"
        torch.testing.assert_close(ours["normals"], torch.where(invalid, 0.0, theirs["normals"]), rtol=0, atol=1e-6)


# --- each step on their input of that step -------------------------------------------------


@pytest.mark.parametrize("name", TRAIN)
def test_scaling_equals_theirs(name):
    case = TRAIN[name]
    (draw,) = draws_of(case, "scaled")
    ours = scale_planes(to_planes(sample_of(case["input"])), draw[3])
    theirs = _planes(case["after"]["scaled"])
    assert ours.keys() == theirs.keys()
    for key in theirs:
        if key == "image" and not SAME_OPENCV:  # OpenCV's float bilinear moves by ~1e-5 between versions
            np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-4)
        else:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("name", TRAIN)
def test_crop_equals_theirs_with_the_same_retries(name):
    case = TRAIN[name]
    t = _transform(case, draws_of(case, "cropped"))
    scaled = _planes(case["after"]["scaled"])
    origin = t.crop_origin(scaled)
    assert t.draws.done(), "the same number of crop draws"
    assert_planes_equal(crop_planes(scaled, origin, t.crop_size), _planes(case["after"]["cropped"]))


@pytest.mark.parametrize("name", TRAIN)
def test_flip_equals_theirs(name):
    case = TRAIN[name]
    (draw,) = draws_of(case, "flipped")
    cropped = _planes(case["after"]["cropped"])
    ours = flip_planes(cropped) if draw[3] < 0.5 else cropped
    assert_planes_equal(ours, _planes(case["after"]["flipped"]))


@pytest.mark.parametrize("name", TRAIN)
def test_photometric_distortion_equals_theirs_to_the_last_uint8(name):
    case = TRAIN[name]
    t = _transform(case, draws_of(case, "distorted"))
    ours = t.photometric(_planes(case["after"]["flipped"])["image"])
    assert t.draws.done()
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, case["after"]["distorted"]["image"].numpy())


@pytest.mark.parametrize("name", TRAIN)
def test_padding_and_ignore_regions_equal_theirs(name):
    case = TRAIN[name]
    planes = _planes(case["after"]["flipped"])
    planes["image"] = case["after"]["distorted"]["image"].numpy()
    ours = from_planes(sample_of(case["input"]), planes)
    ours = ignore_unannotated_parts(pad_centred(ours, case["crop"], IMAGENET_MEAN))
    assert_matches_their_output(ours, case["after"]["out"])


# --- the whole transforms -------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAIN)
def test_train_transform_equals_theirs_on_the_same_draws(name):
    case = TRAIN[name]
    t = _transform(case, case["draws"])
    ours = t(sample_of(case["input"]))
    assert t.draws.done(), "every one of their draws, in their order"
    assert_matches_their_output(ours, case["after"]["out"])


@pytest.mark.parametrize("name", VAL)
def test_val_transform_equals_theirs(name):
    case = VAL[name]
    assert_matches_their_output(ATRCValTransform(size=case["size"])(sample_of(case["input"])), case["out"])


def test_the_fixture_covers_every_branch():
    draws = {name: case["draws"] for name, case in TRAIN.items()}
    crops = {name: sum(d[0] == "cropped" for d in ds) // 2 for name, ds in draws.items()}
    assert crops["pascal_crop_retries"] > 1 and crops["pascal_crop_retries_exhausted"] == 11
    assert crops["nyud_unscaled_uncropped"] == 0
    assert (TRAIN["pascal_parts_cropped_away"]["after"]["out"]["human_parts"] == 255).all()
    assert (TRAIN["nyud_down_padded_contrast_last"]["after"]["out"]["image"] == 0).any()
    assert [c["commit"] for c in RECORD["also"]], "TaskPrompter's and MLoRE's copies were checked too"


# --- hand-checked behaviour -----------------------------------------------------------------


def _constant_sample(h: int, w: int) -> dict:
    return {
        "image": torch.full((3, h, w), 0.2),
        "semseg": torch.ones(h, w, dtype=torch.int64),
        "human_parts": torch.full((h, w), 3, dtype=torch.int64),
        "depth": torch.full((1, h, w), 2.0),
        "normals": torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1).repeat(1, h, w),
        "edge": torch.ones(1, h, w),
        "saliency": torch.zeros(1, h, w),
        "meta": {"name": "x"},
    }


def test_padding_is_centred_with_the_mean_colour_and_the_ignore_values():
    out = ATRCValTransform(size=[6, 8])(_constant_sample(3, 5))
    inside = (slice(1, 4), slice(1, 6))  # top (6-3)//2 = 1, left (8-5)//2 = 1: the odd pixel after
    pad = torch.ones(6, 8, dtype=torch.bool)
    pad[inside] = False
    assert out["image"].shape == (3, 6, 8)
    assert (out["image"][(slice(None), *inside)] == 0.2).all()
    assert torch.equal(out["image"][:, pad], MEAN.view(3, 1).expand(3, int(pad.sum())))
    for key, fill in (("semseg", 255), ("human_parts", 255), ("edge", 255), ("saliency", 255)):
        target = out[key] if out[key].dim() == 2 else out[key][0]
        assert (target[pad] == fill).all() and (target[inside] != fill).all(), key
    assert (out["depth"][0][pad] == 0).all() and (out["normals"][:, pad] == 0).all()
    assert out["meta"] == {"name": "x"}
    wide = ATRCValTransform(size=[2, 9])(_constant_sample(3, 5))
    assert wide["image"].shape == (3, 3, 9) and (wide["semseg"][:, 2:7] == 1).all(), "a larger side stays"
    same = _constant_sample(7, 9)
    assert ATRCValTransform(size=[7, 9])(same) is same


def test_crop_retry_refuses_a_crop_dominated_by_one_class():
    semseg = np.ones((10, 20, 1), dtype=np.float32)  # left half: class 1 only
    semseg[5:, 10:] = 2  # right half: classes 1 and 2, half each
    planes = {"image": np.zeros((10, 20, 3), dtype=np.float32), "semseg": semseg}
    t = ATRCTrainTransform(crop_size=[10, 10])
    t.draws = Replay(
        [
            ("", "randint", (0, 0), 0),
            ("", "randint", (0, 10), 0),
            ("", "randint", (0, 0), 0),
            ("", "randint", (0, 10), 10),
        ]
    )
    assert t.crop_origin(planes) == (0, 10) and t.draws.done()
    # the first crop is kept when it is mixed enough
    t.draws = Replay([("", "randint", (0, 0), 0), ("", "randint", (0, 10), 8)])
    assert t.crop_origin(planes) == (0, 8) and t.draws.done()
    # a single class is refused whatever the share of 255; ties with the ratio are refused
    assert not is_balanced(np.array([1] * 4 + [255] * 6), 0.75)
    assert is_balanced(np.array([1] * 7 + [2] * 3 + [255] * 90), 0.75)
    assert not is_balanced(np.array([1] * 3 + [2]), 0.75)
    # after 10 refusals the 11th crop is taken unchecked
    planes["semseg"] = np.ones_like(semseg)
    t.draws = Replay([("", "randint", (0, lim), v) for _ in range(11) for lim, v in ((0, 0), (10, 3))])
    assert t.crop_origin(planes) == (0, 3) and t.draws.done()


def test_without_semseg_the_first_crop_is_taken():
    planes = {"image": np.zeros((10, 20, 3), dtype=np.float32), "depth": np.ones((10, 20, 1), dtype=np.float32)}
    t = ATRCTrainTransform(crop_size=[10, 10])
    t.draws = Replay([("", "randint", (0, 0), 0), ("", "randint", (0, 10), 4)])
    assert t.crop_origin(planes) == (0, 4) and t.draws.done()  # MLoRE's copy; InvPT's needs semseg


def test_same_seed_same_sample_and_only_torch_randomness():
    assert_seeded_by_torch_alone(ATRCTrainTransform(crop_size=[10, 12]), sample_of(TRAIN["pascal_seeded"]["input"]))


def test_outputs_have_our_types():
    sample = sample_of(TRAIN["nyud_seeded"]["input"])
    torch.manual_seed(3)
    out = ATRCTrainTransform(crop_size=[16, 20])(sample)
    assert out["image"].shape == (3, 16, 20) and out["image"].dtype == torch.float32
    on_grid = torch.isclose(out["image"] * 255, (out["image"] * 255).round(), atol=1e-4)
    assert (on_grid | (out["image"] == MEAN)).all(), "8-bit values or the padding colour"
    assert out["semseg"].shape == (16, 20) and out["semseg"].dtype == torch.int64
    assert out["depth"].shape == (1, 16, 20) and out["normals"].shape == (3, 16, 20)
    assert out["edge"].dtype == torch.float32


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="crop_size"):
        ATRCTrainTransform(crop_size=[32])
    with pytest.raises(ValueError, match="scale_range"):
        ATRCTrainTransform(crop_size=[8, 8], scale_range=[2.0, 1.0])
    with pytest.raises(ValueError, match="cat_max_ratio"):
        ATRCTrainTransform(crop_size=[8, 8], cat_max_ratio=0)
    with pytest.raises(ValueError, match="hue_delta"):
        ATRCTrainTransform(crop_size=[8, 8], hue_delta=0)
    with pytest.raises(ValueError, match="image_fill"):
        ATRCValTransform(size=[8, 8], image_fill=[124, 116, 104])


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiments_use_the_authors_pipeline(experiment, make_cfg):
    cfg = make_cfg([f"experiment={experiment}"], tiny=False)
    train, val = instantiate(cfg.data.train_transform), instantiate(cfg.data.val_transform)
    crop = tuple(cfg.data.crop_size)
    assert isinstance(train, ATRCTrainTransform) and isinstance(val, ATRCValTransform)
    assert train.crop_size == crop and val.size == crop  # TRAIN.SCALE = TEST.SCALE
    assert (train.scale_range, train.cat_max_ratio, train.flip_prob) == ((0.5, 2.0), 0.75, 0.5)
    assert (train.brightness_delta, train.contrast_range, train.saturation_range, train.hue_delta) == (
        32,
        (0.5, 1.5),
        (0.5, 1.5),
        18,
    )
    assert train.image_fill == val.image_fill == tuple(cfg.backbone.mean), "padding = 0 after the normalisation"
