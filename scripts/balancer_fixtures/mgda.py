"""MGDA as isl-org/MultiObjectiveOptimization runs it (multi_task/train_multi_task.py, the
`mgda` branch without the approximation): per task, the gradient list of the shared parameters;
`gradient_normalizers` with each normalisation type; `MinNormSolver.find_min_norm_element`; then
the backward of sum_t scale_t L_t, which gives the shared update and the heads' gradients.
Inputs in float32 (their dtype). Writes mgda.pt."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from balancer_fixtures.common import cases, head_grads, linear_losses, write


class _Sum:
    def __init__(self, value: float) -> None:
        self.data = self
        self.value = value

    def cpu(self) -> float:
        return self.value


class _Product:
    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor

    def sum(self) -> _Sum:
        return _Sum(self.tensor.sum().item())


class _TorchShim:
    """torch as their code was written for (0.3/0.4: Variable, loss.data[0]), where the inner
    products `torch.mul(a, b).sum().data.cpu()` were Python floats (a float32 sum, then float64
    numpy); under torch 2 they are 0-d float32 tensors that numpy 2 cannot reduce."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mul(a: torch.Tensor, b: torch.Tensor) -> _Product:
        return _Product(torch.mul(a, b))


class _NumpyShim:
    """np.sum of a list of 0-d torch tensors (the l2 normaliser): old numpy made an array of them."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def sum(x, *args, **kwargs):
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            x = np.asarray([v.numpy() for v in x])
        return np.sum(x, *args, **kwargs)


def build(repo: Path, out: Path) -> None:
    sys.path.insert(0, str(repo / "multi_task"))
    import min_norm_solvers
    from min_norm_solvers import MinNormSolver, gradient_normalizers

    min_norm_solvers.np = _NumpyShim()
    min_norm_solvers.torch = _TorchShim()

    record = {"commit": subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip(),
              "source": "multi_task/min_norm_solvers.py, multi_task/train_multi_task.py (mgda branch)",
              "cases": {}}  # fmt: skip
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        steps, t, dim = grads.shape
        record["cases"][name] = {"grads": grads, "losses": values, "heads": heads}
        for norm in ("l2", "loss", "loss+", "none"):
            rows = {"update": [], "weights": [], "heads": []}
            for s in range(steps):
                shared = torch.nn.Parameter(torch.zeros(dim))
                own = [torch.nn.Parameter(torch.zeros(heads.shape[-1])) for _ in range(t)]
                losses = linear_losses(grads[s], values[s], shared, [(own[k], heads[s, k]) for k in range(t)])
                per_task, loss_data = {}, {}
                for k in range(t):  # their loop: one backward per task, the shared gradients kept
                    shared.grad = None
                    losses[k].backward(retain_graph=True)
                    per_task[k] = [shared.grad.data.clone()]
                    loss_data[k] = float(losses[k].data)
                gn = gradient_normalizers(per_task, loss_data, norm)
                for k in range(t):
                    per_task[k] = [g / gn[k] for g in per_task[k]]
                sol, _ = MinNormSolver.find_min_norm_element([per_task[k] for k in range(t)])
                shared.grad = None
                for p in own:
                    p.grad = None
                losses = linear_losses(grads[s], values[s], shared, [(own[k], heads[s, k]) for k in range(t)])
                sum(float(sol[k]) * losses[k] for k in range(t)).backward()
                rows["update"].append(shared.grad.clone())
                rows["weights"].append(torch.tensor([float(x) for x in sol]))
                rows["heads"].append(torch.stack([p.grad.clone() for p in own]))
            record["cases"][name][norm] = {k: torch.stack(v) for k, v in rows.items()}
    write(out, "mgda", record)
