"""SDMGrad as OptMN-Lab/sdmgrad runs it on NYUv2 and Cityscapes: `SDMGrad.backward`
(methods/weight_methods.py) on the 3T losses their trainer stacks (experiments/nyuv2/trainer.py:
the step's batch, then two batches of a second loader), with lamda 0.3 and niter 20
(experiments/{nyuv2,cityscapes}/run.sh) and max_norm 1.0 (the `--max_norm` default of
experiments/utils.py), and once without clipping (max_norm 0); and as LibMTL runs it
(LibMTL/weighting/SDMGrad.py `SDMGrad.backward` on the [3, T] losses of its trainer, from
the --libmtl checkout; SDMGrad_lamda 0.3, SDMGrad_niter 20).

The losses of each batch have exactly the given gradients on one shared parameter and one head per
task (`common.linear_losses`, float32). One SDMGrad object per case and variant, over the steps
(their task weights carry from step to step). Batches:

- `same`: the case's gradients for all three batches (what one batch per step can be compared to);
- `distinct` (authors' default only): two other gradient sets (`_other_batches`) first and the case's
  gradients third. Their `[tensor] * 3` makes the three gradient buffers one, so their update
  depends on the third batch alone; the record shows it.

Their code calls `np.alltrue`, gone in numpy 2: bound to `np.all` here. Writes sdmgrad.pt: per
step the shared gradient their code leaves (after clip_grad_norm_), the heads' gradients, their
task weights `w` after the step and their normalised matrix."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from balancer_fixtures.common import cases, head_grads, libmtl_checkout, linear_losses, write
from balancer_fixtures.libmtl import _weighting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

VARIANTS = {
    "default": {"lamda": 0.3, "niter": 20, "max_norm": 1.0},
    "noclip": {"lamda": 0.3, "niter": 20, "max_norm": 0.0},
}
LIBMTL_ARGS = {"SDMGrad_lamda": 0.3, "SDMGrad_niter": 20}


def _other_batches(grads: torch.Tensor, heads: torch.Tensor, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two further (gradients, head gradients) sets shaped as the case's, for the `distinct` run."""
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(grads.shape, generator=g) * grads.std(), torch.randn(heads.shape, generator=g)) for _ in range(2)
    ]


def _parameters(dim: int, tasks: int, head_dim: int) -> tuple[torch.nn.Parameter, list[torch.nn.Parameter]]:
    shared = torch.nn.Parameter(torch.zeros(dim))
    return shared, [torch.nn.Parameter(torch.zeros(head_dim)) for _ in range(tasks)]


def _batch_losses(batches, values, s: int, shared, own) -> list[torch.Tensor]:
    """The losses of the three batches of step s, batch after batch (T each)."""
    t = len(own)
    out = []
    for grads, heads in batches:
        out += linear_losses(grads[s], values[s], shared, [(own[k], heads[s, k]) for k in range(t)])
    return out


def _authors(sdmgrad: type, batches, values, kwargs: dict) -> dict[str, torch.Tensor]:
    steps, t, dim = batches[-1][0].shape
    method = sdmgrad(n_tasks=t, device=torch.device("cpu"), **kwargs)
    rows: dict[str, list] = {"update": [], "w": [], "heads": [], "matrix": []}
    for s in range(steps):
        shared, own = _parameters(dim, t, batches[-1][1].shape[-1])
        losses = _batch_losses(batches, values, s, shared, own)
        _, extra = method.backward(torch.stack(losses), shared_parameters=[shared], task_specific_parameters=own)
        rows["update"].append(shared.grad.clone())
        rows["w"].append(method.w.detach().clone())
        rows["heads"].append(torch.stack([p.grad.clone() for p in own]))
        rows["matrix"].append(torch.as_tensor(extra["GTG"]))
    return {k: torch.stack(v) for k, v in rows.items()}


def _libmtl(cls: type, batches, values, kwargs: dict) -> dict[str, torch.Tensor]:
    """LibMTL's backward on a harness that is its model for the weighting (one shared vector, its
    own heads, the hooks SDMGrad calls), after the trainer's zero_grad(set_to_none=False)."""
    steps, t, dim = batches[-1][0].shape
    head_dim = batches[-1][1].shape[-1]

    class Harness(cls):
        def __init__(self) -> None:
            super().__init__()
            self.x, own = _parameters(dim, t, head_dim)
            self.own = torch.nn.ParameterList(own)
            self.task_num, self.device, self.rep_grad = t, torch.device("cpu"), False
            self.init_param()

        def get_share_params(self):
            return [self.x]

        def zero_grad_share_params(self) -> None:
            self.x.grad = None if self.x.grad is None else torch.zeros_like(self.x)

    model = Harness()
    rows: dict[str, list] = {"update": [], "w": [], "heads": []}
    for s in range(steps):
        model.zero_grad(set_to_none=False)
        losses = _batch_losses(batches, values, s, model.x, list(model.own))
        model.backward(torch.stack(losses).view(3, t), **kwargs)
        rows["update"].append(model.x.grad.clone())
        rows["w"].append(model.w.detach().clone())
        rows["heads"].append(torch.stack([p.grad.clone() for p in model.own]))
    return {k: torch.stack(v) for k, v in rows.items()}


def build(repo: Path, out: Path) -> None:
    np.alltrue = np.all  # numpy 2 removed it; their projection onto the simplex calls it
    commit = use_repository(repo)
    from methods.weight_methods import SDMGrad

    libmtl_commit = use_repository(libmtl_checkout())
    sys.path.remove(str(libmtl_checkout().resolve()))  # only its weighting module is loaded, by file
    libmtl = _weighting(libmtl_checkout(), "SDMGrad")
    record = {
        "commit": commit,
        "libmtl_commit": libmtl_commit,
        "source": "methods/weight_methods.py SDMGrad.backward (experiments/nyuv2/trainer.py's 3T losses); "
        "LibMTL/weighting/SDMGrad.py SDMGrad.backward",
        "variants": VARIANTS,
        "libmtl_args": LIBMTL_ARGS,
        "cases": {},
    }
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        same = [(grads, heads)] * 3
        distinct = [*_other_batches(grads, heads), (grads, heads)]
        entry = {"grads": grads, "losses": values, "heads": heads}
        for variant, kwargs in VARIANTS.items():
            entry[variant] = _authors(SDMGrad, same, values, kwargs)
        entry["distinct"] = _authors(SDMGrad, distinct, values, VARIANTS["default"])
        entry["distinct"]["other_heads"] = torch.stack([h for _, h in distinct[:2]])
        entry["libmtl"] = _libmtl(libmtl, same, values, LIBMTL_ARGS)
        record["cases"][name] = entry
    write(out, "sdmgrad", record)
