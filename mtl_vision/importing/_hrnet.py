"""The segmentation HRNet of MTI-Net's code base (SimonVandenhende/Multi-Task-Learning-PyTorch,
models/seg_hrnet.py `HighResolutionNet`; Armanfard-Lab/EMA-Net's models/hrnet.py is the same file)
in the keys of our timm `Backbone`.

Their HRNet and timm's `HighResolutionNetFeatures` (feature_location='') register the same modules
under the same names: the stem (`conv1`, `bn1`, `conv2`, `bn2`), `layer1`, `transition1..3` and
`stage2..4` (their `None` fuse and transition entries are timm's parameter-free `nn.Identity`, so
every index agrees). Only the place differs: our `Backbone` holds the timm model as `.model`. Their
HRNet has no classification head (no `incre_modules`, `downsamp_modules`, `final_layer`,
`classifier`); those keys are listed in `UNUSED` for checkpoints that were started from HRNet's
ImageNet file, whose forward never uses them.

Computing the same maps also needs `backbone.upsample_mode=bilinear` (their fuse layers upsample
bilinearly, timm's with nearest neighbours) and, for training, `backbone.bn_momentum=0.01`.
"""

from __future__ import annotations

import re

from mtl_vision.importing._authors import Rule

__all__ = ["HRNET_MODULES", "hrnet_rules", "hrnet_unused"]

# top-level modules of their HighResolutionNet (and of timm's, with the same names)
HRNET_MODULES = ("conv1", "bn1", "conv2", "bn2", "layer1", "transition1", "transition2", "transition3",
                 "stage2", "stage3", "stage4")
# HRNet-Image-Classification's head, absent from the segmentation HRNet's forward
_HEAD = ("incre_modules", "downsamp_modules", "final_layer", "classifier")


def hrnet_rules(theirs: str = "backbone.", ours: str = "backbone.model.") -> list[Rule]:
    """Rules for `_authors.rename_keys`: `<theirs><module>.<rest>` -> `<ours><module>.<rest>` for
    every HRNet module (`theirs` is where their model holds the HRNet, `backbone.` in MTI-Net's
    and PAD-Net's models; `ours` where our MultiTaskModel holds the timm model)."""
    names = "|".join(HRNET_MODULES)
    pattern = re.compile(rf"{re.escape(theirs)}((?:{names})\..*)")
    return [(pattern, lambda m: f"{ours}{m[1]}")]


def hrnet_unused(theirs: str = "backbone.") -> list[re.Pattern]:
    """Patterns (for `rename_keys(unused=...)`) of the classification-head weights under `theirs`."""
    return [re.compile(rf"{re.escape(theirs)}(?:{'|'.join(_HEAD)})\.")]
