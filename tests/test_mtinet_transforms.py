"""The data pipeline of MTI-Net's code base equals the authors' `data/custom_transforms.py`.

tests/fixtures/reference/mtinet_transforms.pt holds their pipeline (`get_transformations` of
SimonVandenhende/Multi-Task-Learning-PyTorch) run step by step on tiny samples with recorded draws
(scripts/fixtures/mtinet_transforms.py); each step of ours replays the same draws on their input
of that step, and the whole transform replays them on our sample.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from hydra.utils import instantiate
from replay import Replay, assert_planes_equal, assert_seeded_by_torch_alone, draws_of, sample_of

from mtl_vision.data.atrc_transforms import flip_planes
from mtl_vision.data.mtinet_transforms import (
    MTINetTrainTransform,
    MTINetValTransform,
    as_uint8,
    from_planes,
    resize_planes,
    rotate_scale_planes,
    to_planes,
)

FIXTURE = Path(__file__).parent / "fixtures" / "reference" / "mtinet_transforms.pt"
RECORD = torch.load(FIXTURE, map_location="cpu", weights_only=True)
TRAIN = {case["name"]: case for case in RECORD["train"]}
VAL = {case["name"]: case for case in RECORD["val"]}
MEAN = torch.tensor((0.485, 0.456, 0.406)).view(3, 1, 1)  # their tr.Normalize (utils/common_config.py)
STD = torch.tensor((0.229, 0.224, 0.225)).view(3, 1, 1)
NORMALS_DTYPE = {"nyud": "float32", "pascal": "float64"}
EXPERIMENTS = [f"{m}_{d}" for m in ("padnet", "mtinet") for d in ("nyud", "nyud_en", "pascal", "pascal_small")]
EXPERIMENTS += ["hps_nyud", "hps_pascal"]
LABELS = ("semseg", "human_parts", "edge", "saliency")


def _planes(stored: dict) -> dict[str, np.ndarray]:
    """Their arrays of one step as our planes (labels back to their float32)."""
    return {key: x.numpy().astype(np.float32) if key in LABELS else x.numpy() for key, x in stored.items()}


def _transform(case: dict, draws: list) -> MTINetTrainTransform:
    if case["data"] == "nyud":  # utils/common_config.py get_transformations
        kwargs = {"scales": [1.0, 1.2, 1.5], "rotations": [0]}
    else:
        kwargs = {"scale_range": [0.75, 1.25], "rotation_range": [-20, 20]}
    t = MTINetTrainTransform(crop_size=case["size"], normals_dtype=NORMALS_DTYPE[case["data"]], **kwargs)
    t.draws = Replay(draws, randint_excludes_hi=True)
    return t


def assert_matches_their_output(ours: dict, theirs: dict) -> None:
    """Ours against their ToTensor + Normalize output: their normalised image, float targets with
    255 for unlabelled normals and depth (their AddIgnoreRegions) where ours holds zeros."""
    assert set(theirs) <= set(ours)
    torch.testing.assert_close((ours["image"] - MEAN) / STD, theirs["image"], rtol=0, atol=1e-6)
    for key in ("semseg", "human_parts"):
        if key in theirs:
            assert ours[key].dtype == torch.int64 and torch.equal(ours[key], theirs[key][0].long()), key
    for key in ("edge", "saliency"):
        if key in theirs:
            assert ours[key].dtype == torch.float32 and torch.equal(ours[key], theirs[key].float()), key
    if "depth" in theirs:
        assert torch.equal(ours["depth"], torch.where(theirs["depth"] == 255, 0.0, theirs["depth"]))
    if "normals" in theirs:
        invalid = (theirs["normals"] == 255).all(dim=0)
        assert torch.equal(invalid, (ours["normals"] == 0).all(dim=0)), "the same invalid normals"
        assert torch.equal(ours["normals"], torch.where(invalid, 0.0, theirs["normals"])), "normals bit for bit"


# --- each step on their input of that step -------------------------------------------------


@pytest.mark.parametrize("name", TRAIN)
def test_flip_of_our_sample_equals_theirs(name):
    case = TRAIN[name]
    (draw,) = draws_of(case, "flipped")
    planes = to_planes(sample_of(case["input"]), NORMALS_DTYPE[case["data"]])
    assert_planes_equal(flip_planes(planes) if draw[3] < 0.5 else planes, _planes(case["after"]["flipped"]), check_dtype=True)


@pytest.mark.parametrize("name", TRAIN)
def test_zoom_and_rotation_equal_theirs(name):
    case = TRAIN[name]
    t = _transform(case, draws_of(case, "rotated"))
    angle, scale = t.draw_rotation_scale()
    assert t.draws.done(), "the same number of draws"
    ours = rotate_scale_planes(_planes(case["after"]["flipped"]), angle, scale)
    assert_planes_equal(ours, _planes(case["after"]["rotated"]), check_dtype=True)


@pytest.mark.parametrize("name", TRAIN)
def test_resize_equals_theirs(name):
    case = TRAIN[name]
    ours = resize_planes(_planes(case["after"]["rotated"]), tuple(case["size"]))
    assert_planes_equal(ours, _planes(case["after"]["resized"]), check_dtype=True)


@pytest.mark.parametrize("name", TRAIN)
def test_ignore_regions_and_tensors_equal_theirs(name):
    case = TRAIN[name]
    ours = from_planes(sample_of(case["input"]), _planes(case["after"]["resized"]))
    assert_matches_their_output(ours, case["after"]["out"])


# --- the whole transforms -------------------------------------------------------------------


@pytest.mark.parametrize("name", TRAIN)
def test_train_transform_equals_theirs_on_the_same_draws(name):
    case = TRAIN[name]
    t = _transform(case, case["draws"])
    ours = t(sample_of(case["input"]))
    assert t.draws.done(), "every one of their draws, in their order"
    assert_matches_their_output(ours, case["after"]["out"])
    assert set(ours) == set(case["after"]["out"])


@pytest.mark.parametrize("name", VAL)
def test_val_transform_equals_theirs(name):
    case = VAL[name]
    t = MTINetValTransform(size=case["size"], normals_dtype=NORMALS_DTYPE[case["data"]])
    assert_matches_their_output(t(sample_of(case["input"])), case["out"])  # NYUD: TASKS semseg, depth only


def test_the_fixture_covers_every_branch():
    flips = {name: draws_of(case, "flipped")[0][3] < 0.5 for name, case in TRAIN.items()}
    assert any(flips.values()) and not all(flips.values())
    zooms = {tuple(d[2:]) for case in TRAIN.values() for d in draws_of(case, "rotated") if d[2] == (0, 3)}
    assert {value for _, value in zooms} == {0, 1, 2}, "each NYUD zoom"
    resized = [case["after"]["resized"]["image"] for case in TRAIN.values()]
    assert any(((x < -1) | (x >= 256)).any() for x in resized), "bicubic overshoot their uint8 cast wraps"
    assert (TRAIN["pascal_parts_rotated_away"]["input"]["human_parts"] != 0).any()
    for name in ("pascal_parts_rotated_away", "pascal_no_parts"):
        assert (TRAIN[name]["after"]["out"]["human_parts"] == 255).all(), name
    zoomed_out = TRAIN["pascal_flip_left_20_zoom_out"]["after"]["rotated"]  # corners outside: zero
    assert (zoomed_out["image"][0, 0] == 0).all() and zoomed_out["semseg"][0, 0] == 0
    assert RECORD["commit"].startswith("ed3d9ac")


# --- hand-checked behaviour -----------------------------------------------------------------


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="their cast is x86-64 numpy's")
def test_uint8_cast_is_numpys_on_x86():
    x = np.array([-300.5, -3.7, -1.0, -0.99, 0.2, 127.5, 255.4, 255.99, 256.2, 300.7, 600.1], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = x.astype(np.uint8)
    np.testing.assert_array_equal(as_uint8(x), expected)
    assert as_uint8(x).tolist() == [212, 253, 255, 0, 0, 127, 255, 255, 0, 44, 88]


def test_rotation_turns_normals_by_the_angle():
    """A 90 degree turn (OpenCV: counter-clockwise on screen) maps the normal (x, y) = (1, 0) to
    (0, -1) with their arctan2(x, y) angle: rightwards becomes upwards if y points down."""
    h = w = 6
    planes = {"image": np.zeros((h, w, 3), np.float32), "normals": np.zeros((h, w, 3), np.float32)}
    planes["normals"][..., 0] = 1.0
    out = rotate_scale_planes(planes, 90.0, 1.0)
    centre = out["normals"][2:4, 2:4]
    np.testing.assert_allclose(centre[..., 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(centre[..., 1], -1.0, atol=1e-6)


def test_same_seed_same_sample_and_only_torch_randomness():
    assert_seeded_by_torch_alone(MTINetTrainTransform(crop_size=[12, 12], scale_range=[0.75, 1.25], rotation_range=[-20, 20]), sample_of(TRAIN["pascal_seeded"]["input"]))


def test_outputs_have_our_types():
    sample = sample_of(TRAIN["nyud_seeded"]["input"])
    torch.manual_seed(3)
    out = MTINetTrainTransform(crop_size=[16, 20], scales=[1.0, 1.2, 1.5], rotations=[0])(sample)
    assert out["image"].shape == (3, 16, 20) and out["image"].dtype == torch.float32
    assert torch.isclose(out["image"] * 255, (out["image"] * 255).round(), atol=1e-4).all(), "8-bit values"
    assert out["semseg"].shape == (16, 20) and out["semseg"].dtype == torch.int64
    assert out["depth"].shape == (1, 16, 20) and out["normals"].shape == (3, 16, 20)
    assert out["edge"].shape == (1, 16, 20) and out["edge"].dtype == torch.float32
    # theirs: n / (|n| + eps), so shorter than 1 where bicubic mixing left |n| near eps
    assert (out["normals"].norm(dim=0) <= 1 + 1e-6).all()


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="crop_size"):
        MTINetTrainTransform(crop_size=[32], scales=[1.0], rotations=[0])
    with pytest.raises(ValueError, match="either scales and rotations"):
        MTINetTrainTransform(crop_size=[8, 8], scales=[1.0], rotation_range=[-20, 20])
    with pytest.raises(ValueError, match="centred on 1"):
        MTINetTrainTransform(crop_size=[8, 8], scale_range=[0.5, 2.0], rotation_range=[-20, 20])
    with pytest.raises(ValueError, match="rotations"):
        MTINetTrainTransform(crop_size=[8, 8], scales=[1.0], rotations=[])
    with pytest.raises(ValueError, match="normals_dtype"):
        MTINetValTransform(size=[8, 8], normals_dtype="float16")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_experiments_use_the_authors_pipeline(experiment, make_cfg):
    cfg = make_cfg([f"experiment={experiment}"], tiny=False)
    train, val = instantiate(cfg.data.train_transform), instantiate(cfg.data.val_transform)
    crop = tuple(cfg.data.crop_size)
    assert isinstance(train, MTINetTrainTransform) and isinstance(val, MTINetValTransform)
    assert train.crop_size == crop and val.size == crop  # TRAIN.SCALE = TEST.SCALE
    assert train.flip_prob == 0.5
    # our model normalises with the backbone's statistics: theirs (tr.Normalize) for HRNet's timm weights
    assert cfg.backbone.get("mean") is None and cfg.backbone.get("std") is None
    timm_cfg = timm.get_pretrained_cfg(cfg.backbone.name).to_dict()
    assert timm_cfg["mean"] == (0.485, 0.456, 0.406) and timm_cfg["std"] == (0.229, 0.224, 0.225)
    if "nyud" in experiment:
        assert (train.scales, train.rotations, train.normals_dtype) == ((1.0, 1.2, 1.5), (0.0,), "float32")
        assert crop == (480, 640)
    else:
        assert (train.scale_range, train.rotation_range, train.normals_dtype) == ((0.75, 1.25), (-20, 20), "float64")
        assert val.normals_dtype == "float64" and crop == (512, 512)
