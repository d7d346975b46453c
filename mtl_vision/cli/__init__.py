"""Thin Hydra entry points. `instantiate` is called here and nowhere else."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

ROOT_DIR = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT_DIR / "conf"

# `${mtl_root:}` in conf/paths: the project checkout, so runs and data default to paths inside it
# wherever the command is launched from.
if not OmegaConf.has_resolver("mtl_root"):
    OmegaConf.register_new_resolver("mtl_root", lambda: str(ROOT_DIR))


def check_config_dir() -> Path:
    if not (CONFIG_DIR / "train.yaml").is_file():
        raise FileNotFoundError(
            f"config tree not found at {CONFIG_DIR}; install the project from its checkout with `pip install -e .`"
        )
    return CONFIG_DIR
