"""Named evaluation protocols: which codebase's scoring the metrics follow (config ``eval.protocol``).

The multi-task papers score the same predictions differently. A protocol names the codebase
whose evaluation a run reproduces; tasks where the codebases agree score the same under all:

* ``atrc`` (default): ATRC (Brüggemann et al., ICCV 2021; brdav/atrc ``src/data/metrics.py``):
  saliency ``maxF`` from counts pooled over the split, ``>=`` thresholds 0.05..0.95, β² = 0.3.
* ``invpt``: InvPT / TaskPrompter / MLoRE (Ye & Xu, ECCV 2022 / ICLR 2023; Yang et al., CVPR
  2024; prismformore/Multi-Task-Transformer and YuqiYang213/MLoRE, ``evaluation/eval_sal.py``,
  ``eval_depth.py``, ``utils/utils.py``): their saliency pipeline applies a sigmoid to the
  probability before thresholding (``maxF_sigmoid_prob``); depth adds ``sq_rel``.
* ``mtinet``: MTI-Net / ASTMT (Vandenhende et al., ECCV 2020; SimonVandenhende/
  Multi-Task-Learning-PyTorch ``evaluation/eval_sal.py``, ``jaccard.py``, ``eval_normals.py``):
  predictions are scored as that code stores them, uint8 images; saliency precision, recall and
  IoU per image then averaged (``maxF1_per_image``, ``max_mIoU_per_image``); normals from the
  uint8-quantised prediction.
* ``mtlora``: MTLoRA (Agiza et al., CVPR 2024; scale-lab/MTLoRA ``evaluation/eval_sal.py``,
  ``eval_sal_no_beta.py``, ``eval_sal_beta.py``, ``eval_normals_v1.py``), scoring online: MTI-Net's
  per-image saliency IoU / F1 at ``linspace(0.2, 0.9, 15)`` on the float probability (no uint8
  file; ``max_mIoU_per_image`` is the saliency "mIoU" their tables and Δm use) and their "Beta maxF"
  (= InvPT's ``maxF_sigmoid_prob``); normals as ``atrc`` (their ``rmse`` key holds the mean angle).

* ``mtan``: MTAN and the balancing papers that train it (Liu et al., CVPR 2019; lorenmt/mtan
  ``im2im_pred/utils.py``, copied by AvivNavon/nash-mtl and Cranial-XIX/FAMO
  ``experiments/nyuv2/utils.py``): mIoU and pixel accuracy from the split's confusion matrix, but
  depth ``abs_err``/``abs_rel`` and normals ``mean``/``median``/``within_*`` per validation batch,
  averaged over the batches (``metrics/mtan.py``); depth's primary is ``abs_err``.

Every protocol also reports the ATRC ``maxF``, so runs stay comparable across protocols.
"""

from __future__ import annotations

from mtl_vision.errors import closest

__all__ = ["DEFAULT_PROTOCOL", "PROTOCOLS", "check_protocol", "protocol_primary"]

PROTOCOLS = ("atrc", "invpt", "mtinet", "mtlora", "mtan")
DEFAULT_PROTOCOL = "atrc"

# The primary metric of a task where a protocol's paper uses another one than the task's default
# (TaskSpec.primary): InvPT's tables print its pipeline's maxF; MTI-Net's print (and its Δm uses)
# the saliency mIoU.
_PRIMARY = {
    "saliency": {"invpt": "maxF_sigmoid_prob", "mtinet": "max_mIoU_per_image", "mtlora": "max_mIoU_per_image"},
    "depth": {"mtan": "abs_err"},  # MTAN reports abs and rel error, no rmse
}


def check_protocol(protocol: str | None, *, where: str = "eval.protocol") -> str:
    """``protocol`` itself when it is a known protocol (None means the default)."""
    if protocol is None:
        return DEFAULT_PROTOCOL
    if protocol not in PROTOCOLS:
        close = closest(str(protocol), PROTOCOLS, cutoff=0.5)
        hint = f"; did you mean {close!r}?" if close else ""
        raise ValueError(f"{where}={protocol!r}: unknown evaluation protocol{hint} (known: {', '.join(PROTOCOLS)})")
    return protocol


def protocol_primary(task: str, protocol: str) -> str | None:
    """The primary metric key of ``task`` under ``protocol`` when it is not the task's usual
    primary (``TaskSpec.primary``), else None."""
    return _PRIMARY.get(task, {}).get(check_protocol(protocol))
