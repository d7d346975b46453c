"""The official FAMO code (Cranial-XIX/FAMO) on the shared inputs.

    python scripts/balancer_fixtures.py famo --repo <FAMO checkout>

`methods.weight_methods.WeightMethods("famo", ...)` is driven as experiments/nyuv2/trainer.py
drives it: `optimizer.zero_grad()`, `weight_method.backward(losses, shared_parameters=...)` (with
its `max_norm` clip), `optimizer.step()`, then `weight_method.method.update(new_losses)` with the
same batch's losses after the step (row k + 1 of the case's losses). The shared parameter is one
vector x (D,), the losses of step k `L_t = <x, g_kt> - <x, g_kt>.detach() + loss_kt`. Per gamma
(0.001: their NYUv2/CelebA/QM9 run.sh; 0.01: Cityscapes) and case, per step: "loss_grad"
(d objective / d L, FAMO's weights), "shared_grad" (x.grad as the optimiser sees it, after their
clip call), "logits" (after the update). Written to `<out>/famo.pt`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from balancer_fixtures.common import STEPS, cases, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

GAMMAS = (0.001, 0.01)
W_LR = 0.025  # experiments/utils.py --method-params-lr default
MAX_NORM = 1.0  # experiments/utils.py --max_norm default


def _run(methods, case: dict, gamma: float) -> dict:
    grads, values = case["grads"], case["losses"]
    tasks, dim = grads.shape[1], grads.shape[2]
    x = torch.nn.Parameter(torch.zeros(dim))
    method = methods.WeightMethods(
        "famo", n_tasks=tasks, device=torch.device("cpu"), gamma=gamma, w_lr=W_LR, max_norm=MAX_NORM
    )
    optimiser = torch.optim.SGD([x], lr=0.0)  # the model step is not under test; x only carries gradients
    record: dict[str, list] = {"loss_grad": [], "shared_grad": [], "logits": []}
    for k in range(STEPS):
        optimiser.zero_grad()
        lin = grads[k].float() @ x
        losses = lin - lin.detach() + values[k].float()
        losses.retain_grad()
        method.backward(
            losses=losses,
            shared_parameters=[x],
            task_specific_parameters=[],
            last_shared_parameters=[x],
            representation=None,
        )
        record["loss_grad"].append(losses.grad.detach().double().clone())
        record["shared_grad"].append(x.grad.detach().double().clone())
        optimiser.step()
        with torch.no_grad():
            method.method.update(values[k + 1].float())
        record["logits"].append(method.method.w.detach().double().clone())
    return {key: torch.stack(v) for key, v in record.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    methods = importlib.import_module("methods.weight_methods")
    inputs = cases()
    results = {gamma: {name: _run(methods, data, gamma) for name, data in inputs.items()} for gamma in GAMMAS}
    write(
        out,
        "famo",
        {
            "commit": commit,
            "source": "Cranial-XIX/FAMO methods/weight_methods.py FAMO, WeightMethod.backward; experiments/nyuv2/trainer.py",
            "cases": inputs,
            "w_lr": W_LR,
            "max_norm": MAX_NORM,
            "results": results,
        },
    )
