"""Parameters and GFLOPs of a published model, ours and the authors', counted the same way.

    python scripts/model_sizes.py ours invpt_nyud               # our model of experiment=invpt_nyud
    python scripts/model_sizes.py theirs invpt_nyud --repo /src/Multi-Task-Transformer/InvPT
    python scripts/model_sizes.py theirs mtinet_nyud_en --repo /src/Multi-Task-Learning-PyTorch

Both count every parameter of the model object and the forward FLOPs of one image at the crop size
of the experiment (`data.crop_size` of conf/experiment/<experiment>.yaml) with the startup summary's counter (mtl_vision/models/summary.py: torch's, 2 FLOPs per
multiply-add, fused attention counted on the CPU too). `theirs` builds the authors' full-size model with
random weights from the folder given (its dependencies must be importable) and needs no
mtl_vision install; `ours` composes our config.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT.parent))  # mtl_vision.models.summary needs only torch

from omegaconf import OmegaConf

from mtl_vision.models.summary import flop_counter

EXPERIMENTS = ROOT.parent / "conf" / "experiment"
# output channels of each task before `data.head_channels`: NYUD's 40 classes (the MTAN NYUv2
# layout: 13), PASCAL-Context's 21 classes and 7 human parts
CHANNELS = {"depth": 1, "normals": 3, "edge": 1, "human_parts": 7, "saliency": 1}
CLASSES = {"nyud": 40, "mtan": 13, "pascal": 21}


def crop_of(experiment: str) -> tuple[int, int]:
    """`data.crop_size` of the experiment's file (no Hydra, no mtl_vision import)."""
    path = EXPERIMENTS / f"{experiment}.yaml"
    if not path.is_file():
        raise SystemExit(f"no experiment file {path}")
    crop = OmegaConf.load(path).get("data", {}).get("crop_size")
    if crop is None:
        raise SystemExit(f"{path} sets no data.crop_size")
    return int(crop[0]), int(crop[1])


def count(model: torch.nn.Module, size: tuple[int, int]) -> dict[str, float]:
    model.eval()
    params = sum(p.numel() for p in model.parameters())
    counter = flop_counter()
    # with autograd on: the counter's module tracker fails on the authors' TaskPrompter under no_grad
    with counter:
        model(torch.rand(1, 3, *size))
    return {"params_M": params / 1e6, "gflops": counter.get_total_flops() / 1e9}


def ours(experiment: str) -> torch.nn.Module:
    from hydra import compose, initialize_config_dir

    from mtl_vision.cli import CONFIG_DIR
    from mtl_vision.cli.build import TaskFacts, build_module

    dataset = experiment.split("_")[1]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "backbone.pretrained=false"])
    classes = CLASSES["mtan" if cfg.data.get("layout") == "mtan" else dataset]
    heads = dict(cfg.data.get("head_channels") or {})
    channels = {t: heads.get(t, classes if t == "semseg" else CHANNELS[t]) for t in cfg.data.tasks}
    facts = TaskFacts(tasks=list(channels), task_channels=channels, class_names={}, edge_tolerance=0.011)
    return build_module(cfg, facts).model


def theirs(experiment: str, repo: Path) -> torch.nn.Module:
    model, dataset = experiment.split("_", 1)
    builder = __import__(f"fixtures.{model}", fromlist=["full_size"])
    return builder.full_size(repo, dataset)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("side", choices=["ours", "theirs"])
    parser.add_argument("experiment", help="<model>_<dataset>[_<variant>], e.g. invpt_nyud, taskprompter_pascal_vitb")
    parser.add_argument("--repo", type=Path, help="the authors' folder (for `theirs`)")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = crop_of(args.experiment)
    model = ours(args.experiment) if args.side == "ours" else theirs(args.experiment, args.repo)
    result = count(model, size)
    print(f"{args.side} {args.experiment} at {size[0]}x{size[1]}: {result['params_M']:.3f} M params, "
          f"{result['gflops']:.2f} GFLOPs")


if __name__ == "__main__":
    main()
