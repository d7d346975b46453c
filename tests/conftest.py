"""Shared fixtures: compose the real config tree, as `mtl-train` does, with tiny settings."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from mtl_vision.cli import CONFIG_DIR

# Small, fast settings that keep the real code paths: tiny timm model, tiny images, few samples.
TINY_MODEL = [
    "backbone=test_resnet",
    "data.batch_size=4",
    "data.val_batch_size=4",
    "data.num_workers=0",
    "decoder.channels=16",
]
TINY_SYNTHETIC = ["data.dataset.height=64", "data.dataset.width=80", "data.dataset.num_samples={train:16,val:6}"]
TINY = TINY_MODEL + TINY_SYNTHETIC


def decoder_overrides(decoder: str, backbone: str, size: Sequence[int] = (64, 80)) -> list[str] | None:
    """Extra overrides that let `decoder` run on the tiny `backbone` at input `size`, or None when
    it cannot (a fixed affinity width is made small too): a decoder that reads the blocks of a plain ViT (`backbone_kind = "vit"`,
    TaskPrompter) runs on test_vit only, with the ViT read as the paper does (raw blocks, the last
    normalised) at a fixed grid."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    node = OmegaConf.load(CONFIG_DIR / "decoder" / f"{decoder}.yaml")
    target = node["_target_"]
    # a fixed affinity width (MEMANet's 128) does not shrink with TINY_MODEL's decoder.channels
    small = ["decoder.affinity_channels=8"] if isinstance(node.get("affinity_channels"), int) else []
    kind = getattr(get_class(target), "backbone_kind", "any")
    if kind == "segnet":  # MTAN's attention reads SegNet's maps: the CNN slot runs a narrow SegNet
        return ["backbone=segnet", "backbone.widths=[8,16,16,32,32]"] if backbone == "test_resnet" else None
    if kind != "vit":
        return small
    if backbone != "test_vit":
        return None
    h, w = size
    return [
        "++backbone.final_norm=true",
        "++backbone.out_indices=[1,3,4,5]",
        f"++backbone.model_kwargs.img_size=[{h},{w}]",
        "backbone.model_kwargs.dynamic_img_size=false",
        f"decoder.image_size=[{h},{w}]",
        "decoder.depth=6",
        "decoder.num_heads=2",
    ]


def config_groups() -> dict[str, list[str]]:
    """{group: [option, ...]} for every config group directory in conf/."""
    groups = {}
    for folder in sorted(p for p in CONFIG_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if options:
            groups[folder.name] = options
    return groups


def balancer_modes(name: str) -> tuple[str, ...]:
    """The modes conf/balancer/<name>.yaml declares (`cli.build.balancer_modes`); () for a loss weighting."""
    from omegaconf import OmegaConf

    from mtl_vision.cli.build import balancer_modes as modes_of

    return modes_of(OmegaConf.load(CONFIG_DIR / "balancer" / f"{name}.yaml"))


@pytest.fixture(autouse=True)
def _single_thread_and_clean_hydra():
    torch.set_num_threads(2)
    yield
    GlobalHydra.instance().clear()


def random_features(backbone: dict, size=(32, 64), batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    """Random backbone maps for decoder unit tests: `backbone` = {"in_channels": [...], "strides": [...]}."""
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, c, -(-size[0] // s), -(-size[1] // s), generator=gen)
        for c, s in zip(backbone["in_channels"], backbone["strides"])
    ]


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread is several times faster than two, whose synchronisation dominates."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """compose(overrides) -> resolved-able train config whose run directory is tmp_path/run."""

    def _make(overrides: Sequence[str] = (), *, tiny: bool = True, run_dir: Path | None = None) -> DictConfig:
        GlobalHydra.instance().clear()
        out = run_dir or tmp_path / "run"
        synthetic = not any(o.startswith("data=") and o != "data=synthetic" for o in overrides)
        tiny_overrides = (TINY if synthetic else TINY_MODEL) if tiny else []
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                config_name="train",
                overrides=[*tiny_overrides, *overrides, f"hydra.run.dir={out}", f"paths.log_dir={tmp_path / 'logs'}"],
                return_hydra_config=True,
            )
        HydraConfig().set_config(cfg)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
            cfg.paths.work_dir = str(tmp_path)
        return cfg

    return _make
