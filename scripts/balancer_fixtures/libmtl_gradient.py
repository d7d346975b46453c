"""LibMTL's gradient methods on the shared inputs: DB-MTL (whose authors wrote LibMTL) and IMTL
(IMTL-G with IMTL-L's learned loss scales, "implemented by us" in LibMTL; no authors' code).

    python scripts/balancer_fixtures.py libmtl_gradient --repo <LibMTL checkout>

Each method is driven as LibMTL's trainer drives it (`Trainer.train_singlelevel` with
rep_grad=False): per step the optimiser's gradients are zeroed, `backward(losses, **weight_args)`
back-propagates every task loss (so each head gets its task's gradient) and writes the aggregated
gradient of the shared parameters, then the optimiser steps (SGD at `LR` on the method's own
parameters, IMTL's loss_scale; the shared parameter is not moved, the fixture's gradients are
fixed). The shared parameter is one vector x (D,), each task has a head h_t (HEAD_DIM,), and the
task losses have exactly the case's values and gradients (`common.linear_losses`). Writes
`<out>/libmtl_gradient.pt`: {"commit", "source", "args", "lr", "cases": {case: {"grads", "losses",
"heads", <method>: {"update", "heads", "weights", "own_grad", "own"}}}}.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from fixtures.common import use_repository

from balancer_fixtures.common import cases, head_grads, write
from balancer_fixtures.libmtl import LR, _make, _weighting, harness_steps

METHODS = {
    "DB_MTL": {"DB_beta": 0.9, "DB_beta_sigma": 0.0},  # LibMTL/config.py defaults
    "DB_MTL_decay": {"DB_beta": 0.9, "DB_beta_sigma": 0.5},  # a decaying rate, to test the option
    "IMTL": {},
}


def _run(repo: Path, method: str, case: dict, heads: torch.Tensor) -> dict:
    grads, values = case["grads"].float(), case["losses"].float()
    _, tasks, dim = grads.shape
    name = method.split("_decay")[0]
    model = _make(_weighting(repo, name), tasks, dim, heads.shape[-1])
    own = [p for n, p in model.named_parameters() if n != "x" and not n.startswith("h.")]
    optimiser = torch.optim.SGD(own, lr=LR) if own else None
    def after_step(rows: dict[str, list]) -> None:
        rows.setdefault("own_grad", []).append(torch.cat([p.grad.detach().flatten() for p in own]) if own else torch.zeros(0))
        if optimiser is not None:
            optimiser.step()
        rows.setdefault("own", []).append(torch.cat([p.detach().flatten() for p in own]) if own else torch.zeros(0))

    rows = harness_steps(model, grads, values, heads, METHODS[method], weights_dtype=np.float64, after_step=after_step)
    return {k: torch.stack(v) for k, v in rows.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    torch.set_default_dtype(torch.float32)
    heads_all = head_grads()
    record = {
        "commit": commit,
        "source": "median-research-group/LibMTL LibMTL/weighting/{DB_MTL,IMTL}.py, abstract_weighting.py, trainer.py",
        "args": METHODS,
        "lr": LR,
        "cases": {},
    }
    for name, case in cases().items():
        heads = heads_all[name].float()
        entry = {"grads": case["grads"].float(), "losses": case["losses"].float(), "heads": heads}
        for method in METHODS:
            entry[method] = _run(repo, method, case, heads)
        record["cases"][name] = entry
    write(out, "libmtl_gradient", record)
