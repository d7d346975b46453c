"""LibMTL (median-research-group/LibMTL) on the shared inputs: UW, GradNorm, DWA, RLW, GLS, FAMO.

    python scripts/balancer_fixtures.py libmtl --repo <LibMTL checkout>

Each LibMTL weighting is driven as LibMTL's trainer drives it (`Trainer.train_singlelevel`): a
`backward(losses, **weight_args)` per step, the model optimiser's step, FAMO's `update_w` with the
losses after the step, and `train_loss_buffer[:, epoch]` set to the epoch's mean training loss. The
shared parameter is one vector x (D,) and the task losses of step k are
`L_t = <x, g_kt> - <x, g_kt>.detach() + loss_kt`, so their values are the case's losses and their
gradients on x the case's gradients. Written to `<out>/libmtl.pt`:
{"commit", "source", "cases": common.cases(), "epoch_steps", "results": {method: {case: {...}}}}.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import numpy as np
import torch

from balancer_fixtures.common import STEPS, cases, linear_losses, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

EPOCH_STEPS = 2  # steps per epoch: STEPS = 6 gives three epochs (GradNorm, DWA look at epochs)
LR = 0.02  # SGD learning rate of the balancer's own parameters (UW, GradNorm)
DWA_T = 2.0
GRADNORM_ALPHA = 1.5
FAMO_ARGS = {"FAMO_w_lr": 0.025, "FAMO_w_gamma": 1e-3}  # LibMTL/config.py defaults


def _weighting(repo: Path, name: str) -> type:
    """LibMTL.weighting.<name>.<name> without running LibMTL/__init__.py (which imports every
    method's solver dependencies): namespace stubs for the two packages."""
    for package, folder in (("LibMTL", repo / "LibMTL"), ("LibMTL.weighting", repo / "LibMTL" / "weighting")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(folder)]
            sys.modules[package] = module
    return getattr(importlib.import_module(f"LibMTL.weighting.{name}"), name)


def _make(cls: type, tasks: int, dim: int, head_dim: int = 0) -> torch.nn.Module:
    """An instance as LibMTL's model (architecture + weighting mixin) sets it up; with `head_dim`,
    one head parameter h[t] (head_dim,) per task."""

    class Harness(cls):
        def __init__(self) -> None:
            super().__init__()
            self.x = torch.nn.Parameter(torch.zeros(dim))
            if head_dim:
                self.h = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(head_dim)) for _ in range(tasks)])
            self.task_num, self.device, self.rep_grad = tasks, torch.device("cpu"), False
            self.task_name = [f"t{i}" for i in range(tasks)]
            self.train_loss_buffer = np.zeros([tasks, STEPS // EPOCH_STEPS])
            self.epoch = 0
            self.init_param()

        def get_share_params(self):
            return [self.x]

        def zero_grad_share_params(self) -> None:
            self.x.grad = None if self.x.grad is None else torch.zeros_like(self.x)

    return Harness()


def harness_steps(
    model: torch.nn.Module, grads: torch.Tensor, values: torch.Tensor, heads: torch.Tensor, weight_args: dict,
    *, weights_dtype: type = np.float32, after_step=None,
) -> dict[str, list]:
    """The steps of LibMTL's trainer on a `_make(..., head_dim)` harness: per step the gradients are
    zeroed, `backward(losses, **weight_args)` runs on losses with exactly the case's values and
    gradients (shared x, head h[t]), and the shared update, the heads' gradients and the returned
    weights are recorded; `after_step()` (the optimiser's step, say) runs after each record."""
    rows: dict[str, list] = {"update": [], "heads": [], "weights": []}
    tasks = grads.shape[1]
    for s in range(grads.shape[0]):
        model.zero_grad(set_to_none=True)
        pairs = [(model.h[k], heads[s, k]) for k in range(tasks)]
        w = model.backward(torch.stack(linear_losses(grads[s], values[s], model.x, pairs)), **weight_args)
        rows["update"].append(model.x.grad.detach().clone())
        rows["heads"].append(torch.stack([p.grad.detach().clone() for p in model.h]))
        rows["weights"].append(torch.as_tensor(np.asarray(w, dtype=weights_dtype)))
        if after_step is not None:
            after_step(rows)
    return rows


def _losses(x: torch.Tensor, grads: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    lin = grads.float() @ x
    return lin - lin.detach() + values.float()


def _run(repo: Path, name: str, case: dict, weight_args: dict, torch_seed: int | None = None) -> dict:
    grads, values = case["grads"], case["losses"]
    tasks, dim = grads.shape[1], grads.shape[2]
    model = _make(_weighting(repo, name), tasks, dim)
    own = [p for n, p in model.named_parameters() if n != "x"]
    optimiser = torch.optim.SGD([{"params": [model.x], "lr": 0.0}, {"params": own, "lr": LR}])
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    record: dict[str, list] = {"weights": [], "loss_grad": [], "shared_grad": [], "own_params": [], "own_grad": []}
    epoch_losses = []
    for k in range(STEPS):
        model.epoch = k // EPOCH_STEPS
        losses = _losses(model.x, grads[k], values[k])
        losses.retain_grad()
        optimiser.zero_grad(set_to_none=False)
        w = model.backward(losses, **weight_args)
        record["weights"].append(torch.as_tensor(np.asarray(w, dtype=np.float64)) if w is not None else torch.zeros(0))
        record["loss_grad"].append(losses.grad.detach().double().clone())
        record["shared_grad"].append(model.x.grad.detach().double().clone())
        record["own_grad"].append(
            torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).detach().double().flatten() for p in own])
            if own
            else torch.zeros(0)
        )
        optimiser.step()
        if name == "FAMO":
            with torch.no_grad():
                model.update_w(values[k + 1].float())  # the same batch's losses after the step
        record["own_params"].append(
            torch.cat([p.detach().double().flatten() for p in own])
            if own
            else model.w.detach().double().clone()
            if name == "FAMO"
            else torch.zeros(0)
        )
        epoch_losses.append(values[k].float())
        if (k + 1) % EPOCH_STEPS == 0:
            model.train_loss_buffer[:, model.epoch] = torch.stack(epoch_losses).mean(0).numpy()
            epoch_losses = []
    return {key: torch.stack(v) for key, v in record.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    inputs = cases()
    torch.set_default_dtype(torch.float32)
    methods = {
        "UW": {},
        "GradNorm": {"alpha": GRADNORM_ALPHA},
        "DWA": {"T": DWA_T},
        "GLS": {},
        "RLW": {},
        "FAMO": FAMO_ARGS,
    }
    results = {
        name: {
            case: _run(repo, name, data, args, torch_seed=0 if name == "RLW" else None) for case, data in inputs.items()
        }
        for name, args in methods.items()
    }
    write(
        out,
        "libmtl",
        {
            "commit": commit,
            "source": "median-research-group/LibMTL LibMTL/weighting/{UW,GradNorm,DWA,GLS,RLW,FAMO}.py, LibMTL/trainer.py",
            "cases": inputs,
            "epoch_steps": EPOCH_STEPS,
            "lr": LR,
            "args": methods,
            "results": results,
        },
    )
