"""FairGrad as OptMN-Lab/fairgrad runs it on NYUv2 and Cityscapes: `FairGrad.backward`
(methods/weight_methods.py) with alpha 2.0 (experiments/{nyuv2,cityscapes}/run.sh) and max_norm 1.0
(the `--max_norm` default of experiments/utils.py), once with alpha 1.0 (the `--alpha` default) and
once without clipping (max_norm 0, to see the x T of their `overwrite_grad` unclipped); and as
LibMTL runs it (LibMTL/weighting/FairGrad.py `FairGrad.backward`, from the --libmtl
checkout) with alpha 1.0 (its default) and 2.0.

Each case's losses have exactly the fixture's gradients on one shared parameter and one head per
task (`common.linear_losses`, float32). Writes fairgrad.pt: per step and variant the shared
gradient their code leaves (after their clip_grad_norm_), the heads' gradients, their weights and
their Gramian."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from balancer_fixtures.common import cases, head_grads, libmtl_checkout, linear_losses, write
from balancer_fixtures.libmtl import _weighting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

VARIANTS = {"default": {"alpha": 2.0, "max_norm": 1.0}, "alpha1": {"alpha": 1.0, "max_norm": 1.0},
            "noclip": {"alpha": 2.0, "max_norm": 0.0}}  # fmt: skip
LIBMTL_VARIANTS = {"libmtl": {"FairGrad_alpha": 1.0}, "libmtl_alpha2": {"FairGrad_alpha": 2.0}}


def _parameters(dim: int, tasks: int, head_dim: int) -> tuple[torch.nn.Parameter, list[torch.nn.Parameter]]:
    shared = torch.nn.Parameter(torch.zeros(dim))
    return shared, [torch.nn.Parameter(torch.zeros(head_dim)) for _ in range(tasks)]


def _authors(fairgrad: type, grads, values, heads, kwargs: dict) -> dict[str, torch.Tensor]:
    steps, t, dim = grads.shape
    method = fairgrad(n_tasks=t, device=torch.device("cpu"), **kwargs)
    rows: dict[str, list] = {"update": [], "weights": [], "heads": [], "gramian": []}
    for s in range(steps):
        shared, own = _parameters(dim, t, heads.shape[-1])
        losses = linear_losses(grads[s], values[s], shared, [(own[k], heads[s, k]) for k in range(t)])
        _, extra = method.backward(torch.stack(losses), shared_parameters=[shared], task_specific_parameters=own)
        rows["update"].append(shared.grad.clone())
        rows["weights"].append(torch.as_tensor(np.asarray(extra["weights"], dtype=np.float64)))
        rows["heads"].append(torch.stack([p.grad.clone() for p in own]))
        rows["gramian"].append(torch.as_tensor(extra["GTG"]))
    return {k: torch.stack(v) for k, v in rows.items()}


def _libmtl(cls: type, grads, values, heads, kwargs: dict) -> dict[str, torch.Tensor]:
    """LibMTL's backward on a harness that is its model for the weighting: one shared vector,
    its own heads, the two hooks FairGrad calls; the trainer's zero_grad(set_to_none=False) first."""
    steps, t, dim = grads.shape

    class Harness(cls):
        def __init__(self) -> None:
            super().__init__()
            self.x, own = _parameters(dim, t, heads.shape[-1])
            self.own = torch.nn.ParameterList(own)
            self.task_num, self.device, self.rep_grad = t, torch.device("cpu"), False

        def get_share_params(self):
            return [self.x]

        def zero_grad_share_params(self) -> None:
            self.x.grad = None if self.x.grad is None else torch.zeros_like(self.x)

    model = Harness()
    rows: dict[str, list] = {"update": [], "weights": [], "heads": []}
    for s in range(steps):
        model.zero_grad(set_to_none=False)
        losses = linear_losses(grads[s], values[s], model.x, [(model.own[k], heads[s, k]) for k in range(t)])
        w = model.backward(torch.stack(losses), **kwargs)
        rows["update"].append(model.x.grad.clone())
        rows["weights"].append(torch.as_tensor(np.asarray(w, dtype=np.float64)))
        rows["heads"].append(torch.stack([p.grad.clone() for p in model.own]))
    return {k: torch.stack(v) for k, v in rows.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    from methods.weight_methods import FairGrad

    libmtl_commit = use_repository(libmtl_checkout())
    sys.path.remove(str(libmtl_checkout().resolve()))  # only its weighting module is loaded, by file
    libmtl = _weighting(libmtl_checkout(), "FairGrad")
    record = {
        "commit": commit,
        "libmtl_commit": libmtl_commit,
        "source": "methods/weight_methods.py FairGrad.backward; LibMTL/weighting/FairGrad.py FairGrad.backward",
        "variants": VARIANTS,
        "libmtl_variants": LIBMTL_VARIANTS,
        "cases": {},
    }
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        entry = {"grads": grads, "losses": values, "heads": heads}
        for variant, kwargs in VARIANTS.items():
            entry[variant] = _authors(FairGrad, grads, values, heads, kwargs)
        for variant, kwargs in LIBMTL_VARIANTS.items():
            entry[variant] = _libmtl(libmtl, grads, values, heads, kwargs)
        record["cases"][name] = entry
    write(out, "fairgrad", record)
