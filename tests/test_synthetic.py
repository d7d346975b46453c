"""The synthetic scene dataset: determinism, target formats and the consistency between tasks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from mtl_vision.data.synthetic import CLASS_CATALOGUE, IGNORE_INDEX, PART_NAMES, TASK_NAMES, SyntheticScenes

H, W = 64, 80
FLOOR, WALL, PERSON = (CLASS_CATALOGUE.index(name) for name in ("floor", "wall", "person"))


def make(**kwargs) -> SyntheticScenes:
    args = dict(split="train", tasks=TASK_NAMES, height=H, width=W, num_samples=64)
    return SyntheticScenes(**{**args, **kwargs})


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    ds = make(invalid_prob=0.5)
    return [ds[i] for i in range(24)]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "meta":
            assert a[key]["name"] == b[key]["name"] and a[key]["index"] == b[key]["index"]
            assert torch.equal(a[key]["size"], b[key]["size"])
        else:
            assert torch.equal(a[key], b[key]), key


def test_deterministic_across_instances_and_access_order():
    first, second = make(), make()
    forward = [first[i] for i in range(6)]
    backward = [second[i] for i in reversed(range(6))][::-1]
    for a, b in zip(forward, backward):
        assert_same(a, b)
    assert_same(first[-1], first[len(first) - 1])
    images = [s["image"] for s in forward]
    assert all(not torch.equal(images[0], other) for other in images[1:])
    assert not torch.equal(make(split="val")[0]["image"], forward[0]["image"])
    assert not torch.equal(make(seed=1)[0]["image"], forward[0]["image"])


def test_same_samples_through_dataloader_workers():
    ds = make(num_samples=8)
    batch = next(iter(DataLoader(ds, batch_size=8, num_workers=2)))
    for i in range(8):
        assert torch.equal(batch["image"][i], ds[i]["image"])
        assert torch.equal(batch["semseg"][i], ds[i]["semseg"])
    assert batch["meta"]["name"][3] == "train_000003"


def test_shapes_dtypes_and_ranges(samples):
    expected = {"image": ((3, H, W), torch.float32), "semseg": ((H, W), torch.int64), "depth": ((1, H, W), torch.float32),
                "normals": ((3, H, W), torch.float32), "edge": ((1, H, W), torch.float32),
                "saliency": ((1, H, W), torch.float32), "human_parts": ((H, W), torch.int64)}
    for i, s in enumerate(samples):
        assert set(s) == set(expected) | {"meta"}
        for key, (shape, dtype) in expected.items():
            assert s[key].shape == shape and s[key].dtype == dtype, key
        assert s["meta"]["index"] == i and s["meta"]["name"] == f"train_{i:06d}"
        assert s["meta"]["size"].tolist() == [H, W]
        assert 0 <= s["image"].min() and s["image"].max() <= 1 and s["image"].std() > 0.03
        assert 0 <= s["semseg"].min() and s["semseg"].max() < len(CLASS_CATALOGUE)
        assert set(s["edge"].unique().tolist()) <= {0.0, 1.0}
        assert set(s["saliency"].unique().tolist()) <= {0.0, 1.0}


def test_normals_unit_where_valid_and_zero_exactly_where_depth_invalid(samples):
    invalid_seen = 0
    for s in samples:
        depth, normals = s["depth"][0], s["normals"]
        valid = depth > 0
        assert torch.isfinite(depth).all() and (depth >= 0).all() and depth.max() < 15
        assert ((normals.norm(dim=0) - 1).abs()[valid] < 1e-4).all()
        assert (normals[:, ~valid] == 0).all()
        invalid_seen += int((~valid).sum())
    assert invalid_seen > 0


@pytest.mark.parametrize("invalid_prob", [0.0, 1.0])
def test_invalid_prob(invalid_prob):
    ds = make(invalid_prob=invalid_prob)
    invalid = [int((ds[i]["depth"] == 0).sum()) for i in range(6)]
    assert (sum(invalid) == 0) if invalid_prob == 0 else all(n > 0 for n in invalid)


def test_floor_normals_point_up_in_the_camera_frame(samples):
    for s in samples:
        floor = (s["semseg"] == FLOOR) & (s["depth"][0] > 0)
        assert floor.sum() > 50  # the camera looks down: the floor is always in view
        n = s["normals"][:, floor]
        assert (n - n[:, :1]).abs().max() < 1e-4  # one plane, one normal
        # y up, z towards the viewer: a camera pitched down sees the floor normal tilted towards it
        assert n[0, 0].abs() < 1e-4 and n[1, 0] > 0.9 and n[2, 0] > 0.05


def test_parts_saliency_and_semseg_agree(samples):
    with_figure = 0
    for s in samples:
        person = s["semseg"] == PERSON
        parts = s["human_parts"]
        assert torch.equal(s["saliency"][0].bool(), (s["semseg"] != FLOOR) & (s["semseg"] != WALL))
        if (parts == IGNORE_INDEX).all():
            assert not person.any()
            continue
        with_figure += 1
        assert torch.equal(parts != 0, person)
        assert ((parts[person] >= 1) & (parts[person] < len(PART_NAMES))).all()
    assert with_figure >= len(samples) // 2  # figure_prob 0.8


def test_figure_is_large_and_shows_all_parts():
    ds = make(figure_prob=1.0, invalid_prob=0.0, height=128, width=160)
    for i in range(8):
        s = ds[i]
        rows = (s["semseg"] == PERSON).any(dim=1).nonzero()
        assert len(rows) and 0.15 < (rows.max() - rows.min() + 1) / 128 < 0.8
        assert len(set(s["human_parts"].unique().tolist()) - {0}) >= 4  # some limbs may be hidden


def test_no_figure_means_no_part_supervision():
    ds = make(figure_prob=0.0)
    for i in range(6):
        s = ds[i]
        assert (s["human_parts"] == IGNORE_INDEX).all() and not (s["semseg"] == PERSON).any()


def test_class_changes_are_edges_and_density_is_sane(samples):
    for s in samples:
        sem, edge = s["semseg"], s["edge"][0].bool()
        right, down = sem[:, 1:] != sem[:, :-1], sem[1:, :] != sem[:-1, :]
        assert (edge[:, 1:] | edge[:, :-1])[right].all()
        assert (edge[1:, :] | edge[:-1, :])[down].all()
        assert 0.02 < edge.float().mean() < 0.3


def test_task_subset():
    ds = make(tasks=["depth", "saliency"])
    assert set(ds[0]) == {"image", "depth", "saliency", "meta"}
    assert ds.class_names == {}
    assert make(tasks=["human_parts"]).class_names == {"human_parts": list(PART_NAMES)}


def test_class_subset_and_order():
    classes = ["wall", "sphere", "floor", "person"]
    ds = make(classes=classes, tasks=["semseg", "human_parts"], figure_prob=1.0)
    assert ds.class_names["semseg"] == classes
    labels = torch.cat([ds[i]["semseg"].flatten() for i in range(6)]).unique().tolist()
    assert set(labels) <= {0, 1, 2, 3} and {0, 2, 3} <= set(labels)
    no_person = make(classes=["floor", "wall", "box"], tasks=["semseg", "human_parts"], figure_prob=1.0)
    for i in range(4):
        assert (no_person[i]["human_parts"] == IGNORE_INDEX).all() and no_person[i]["semseg"].max() <= 2
    # the class list only renames labels: the same scene in another label order
    reordered = make(classes=list(reversed(CLASS_CATALOGUE)), tasks=["semseg"])
    base = make(tasks=["semseg"])
    names = list(reversed(CLASS_CATALOGUE))
    for i in range(3):
        assert [CLASS_CATALOGUE[k] for k in base[i]["semseg"].flatten().tolist()] == \
               [names[k] for k in reordered[i]["semseg"].flatten().tolist()]


def test_num_samples_per_split_and_index_errors():
    assert len(make(num_samples={"train": 5, "val": 2})) == 5
    assert len(make(split="val", num_samples={"train": 5, "val": 2})) == 2
    with pytest.raises(IndexError):
        make(num_samples=3)[3]


@pytest.mark.parametrize("kwargs, match", [
    (dict(tasks=["semseg", "optical_flow"]), "optical_flow"),
    (dict(classes=["floor", "wall", "chair"]), "chair"),
    (dict(classes=["floor", "box"]), "wall"),
    (dict(split="test", num_samples={"train": 4, "val": 2}), "test"),
    (dict(figure_prob=1.5), "figure_prob"),
    (dict(height=8), "height"),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)
