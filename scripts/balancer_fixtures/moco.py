"""MoCo (Fernando et al., ICLR 2023) on the shared inputs: the authors' code and LibMTL's.

    python scripts/balancer_fixtures.py moco --repo <heshandevaka/MoCo checkout>

The authors' `tracking` is a function nested in `multi_task_rg_trainer` of their CAGrad/utils.py
(the Cityscapes trainer; CAGrad/nyuv2/utils.py has an older copy that its trainer never calls). It
is taken from that function's code object as their file defines it and called as their trainer
loop calls it: per step every task loss is back-propagated in turn (each head keeps its gradient,
the shared gradient is read and zeroed), `tracking(grads (P, T), y, lambd, epoch, task_loss=...)`
gives the update, which is multiplied by the number of tasks (their `overwrite_grad`: x2 on
Cityscapes, x3 on NYUv2); y = 0 and lambd = 1/T are set at every step of epoch 0 (`if index == 0`).
Epochs are EPOCH_STEPS steps long. Variants: their NYUv2 run_moco.sh (beta 0.99, delta 0.1,
sigma2 = sigma3 = 0, raw_loss) and their Cityscapes run_moco.sh with the argparse defaults it leaves
(beta 0.05, delta 0.1, sigma2 = sigma3 = 0.5, no normalisation).

LibMTL's LibMTL/weighting/MoCo.py is driven as LibMTL's trainer drives it (balancer_fixtures/
libmtl_gradient.py's harness), from the --libmtl checkout: its config.py defaults, and rho = 0.1.

Writes `<out>/moco.pt`: {"commit", "libmtl_commit", "source", "epoch_steps", "variants": {name:
args}, "cases": {case: {"grads", "losses", "heads", <variant>: {"update", "heads", "weights", "y",
"lambd"}}}} (float32; "y" and "lambd" after the last step).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import torch
from fixtures.common import commit_of

from balancer_fixtures.common import cases, head_grads, libmtl_checkout, linear_losses, write
from balancer_fixtures.libmtl import _make, _weighting, harness_steps

EPOCH_STEPS = 2  # 6 steps = epochs 0, 0, 1, 1, 2, 2
AUTHORS = {
    "nyuv2": {"beta": 0.99, "delta": 0.1, "sigma2": 0.0, "sigma3": 0.0, "smgdc_method": "raw_loss"},
    "cityscapes": {"beta": 0.05, "delta": 0.1, "sigma2": 0.5, "sigma3": 0.5, "smgdc_method": "None"},
}
LIBMTL = {
    "libmtl": {"MoCo_beta": 0.5, "MoCo_beta_sigma": 0.5, "MoCo_gamma": 0.1, "MoCo_gamma_sigma": 0.5, "MoCo_rho": 0.0},
    "libmtl_rho": {
        "MoCo_beta": 0.5,
        "MoCo_beta_sigma": 0.5,
        "MoCo_gamma": 0.1,
        "MoCo_gamma_sigma": 0.5,
        "MoCo_rho": 0.1,
    },
}


def _tracking(repo: Path, normalize: str):
    """The authors' nested `tracking`, bound to `normalize` (their `opt.smgdc_method`)."""
    folder = repo / "CAGrad"
    sys.path.insert(0, str(folder))  # their utils.py imports min_norm_solvers by top-level name
    spec = importlib.util.spec_from_file_location("moco_cagrad_utils", folder / "utils.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outer = module.multi_task_rg_trainer.__code__
    code = next(c for c in outer.co_consts if isinstance(c, types.CodeType) and c.co_name == "tracking")
    cells = {"normalize": normalize}
    missing = [v for v in code.co_freevars if v not in cells]
    if missing:
        raise SystemExit(f"{folder / 'utils.py'}: tracking refers to {missing}, which this harness does not bind")
    closure = tuple(types.CellType(cells[v]) for v in code.co_freevars)
    return types.FunctionType(code, module.__dict__, "tracking", None, closure)


def _run_authors(repo: Path, args: dict, grads: torch.Tensor, values: torch.Tensor, heads: torch.Tensor) -> dict:
    tracking = _tracking(repo, args["smgdc_method"])
    steps, tasks, dim = grads.shape
    x = torch.nn.Parameter(torch.zeros(dim))
    h = [torch.nn.Parameter(torch.zeros(heads.shape[-1])) for _ in range(tasks)]
    rows: dict[str, list] = {"update": [], "heads": [], "weights": []}
    for s in range(steps):
        epoch = s // EPOCH_STEPS
        if epoch == 0:
            y = torch.zeros([dim, tasks], dtype=torch.float)
            lambd = torch.ones([tasks, 1], dtype=torch.float) / tasks
        for p in [x, *h]:
            p.grad = None
        losses = linear_losses(grads[s], values[s], x, [(h[k], heads[s, k]) for k in range(tasks)])
        stacked = torch.zeros(dim, tasks)
        for k in range(tasks):
            losses[k].backward(retain_graph=k < tasks - 1)
            stacked[:, k].copy_(x.grad.detach().view(-1))
            x.grad.zero_()
        task_loss = torch.tensor([float(v.detach()) for v in losses], dtype=torch.float)
        g, y, lambd = tracking(
            stacked.detach(),
            y,
            lambd,
            epoch,
            beta=args["beta"],
            delta=args["delta"],
            sigma2=args["sigma2"],
            sigma3=args["sigma3"],
            task_loss=task_loss,
        )
        rows["update"].append((g * tasks).view(-1).clone())
        rows["heads"].append(torch.stack([p.grad.detach().clone() for p in h]))
        rows["weights"].append(lambd.view(-1).clone())
    out = {k: torch.stack(v) for k, v in rows.items()}
    out["y"], out["lambd"] = y.t().contiguous(), lambd.view(-1).clone()
    return out


def _run_libmtl(args: dict, grads: torch.Tensor, values: torch.Tensor, heads: torch.Tensor) -> dict:
    _, tasks, dim = grads.shape
    model = _make(_weighting(libmtl_checkout(), "MoCo"), tasks, dim, heads.shape[-1])
    rows = harness_steps(model, grads, values, heads, args)
    out = {k: torch.stack(v) for k, v in rows.items()}
    out["y"], out["lambd"] = model.y.detach().clone(), model.lambd.detach().clone()
    return out


def build(repo: Path, out: Path) -> None:
    torch.set_default_dtype(torch.float32)
    if not (repo / "CAGrad" / "utils.py").is_file():
        raise SystemExit(f"--repo {repo}: no CAGrad/utils.py (expected a heshandevaka/MoCo checkout)")
    if not (libmtl_checkout() / "LibMTL" / "weighting" / "MoCo.py").is_file():
        raise SystemExit(f"--libmtl {libmtl_checkout()}: no LibMTL/weighting/MoCo.py (a LibMTL checkout)")
    record = {
        "commit": commit_of(repo),
        "libmtl_commit": commit_of(libmtl_checkout()),
        "source": "heshandevaka/MoCo CAGrad/utils.py (tracking in multi_task_rg_trainer), CAGrad/{,nyuv2/}run_moco.sh; "
        "median-research-group/LibMTL LibMTL/weighting/MoCo.py, config.py",
        "epoch_steps": EPOCH_STEPS,
        "variants": {**AUTHORS, **LIBMTL},
        "cases": {},
    }
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        entry = {"grads": grads, "losses": values, "heads": heads}
        for variant, args in AUTHORS.items():
            entry[variant] = _run_authors(repo, args, grads, values, heads)
        for variant, args in LIBMTL.items():
            entry[variant] = _run_libmtl(args, grads, values, heads)
        record["cases"][name] = entry
    write(out, "moco", record)
