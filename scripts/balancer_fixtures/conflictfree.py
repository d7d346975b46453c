"""ConFIG and M-ConFIG as tum-pbs/ConFIG computes them, on the shared inputs.

    python scripts/balancer_fixtures.py conflictfree --repo <ConFIG checkout>

ConFIG is driven through their multi-task wrapper (experiments/MTL/methods/weight_methods.py
`ConFIG.backward`: `ConFIGOperator()` with its defaults on the shared parameters, the gradient of
the summed loss on the task-specific ones), with one shared vector x (D,) and one head per task,
the task losses having exactly the case's values and gradients (`common.linear_losses`).

M-ConFIG (`MConFIG` there: conflictfree/momentum_operator.py `PseudoMomentumOperator` around
`ConFIGOperator`, the tasks taken in turn by `OrderedSliceSelector`) is driven through the same
wrapper with `num_updates=2`; their wrapper fails on its default `num_updates=1` (it iterates
over the one selected loss, a 0-d tensor), so for one update per step the operator is driven as
the wrapper would (`calculate_gradient([k], [g_k])`, k in turn). Inputs in float32, on CPU.
Writes `<out>/conflictfree.pt`: {"commit", "source", "cases": {case: {"grads", "losses", "heads",
"config": {"update", "heads"}, "m_config_1" / "m_config_2": {"update", "heads", "indexes"}}}}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fixtures.common import use_repository

from balancer_fixtures.common import cases, head_grads, linear_losses, write


def _wrapper(repo: Path):
    sys.path.insert(0, str(repo / "experiments" / "MTL"))
    from methods.weight_methods import ConFIG, MConFIG

    return ConFIG, MConFIG


def _run_wrapper(method, case: dict, heads: torch.Tensor) -> dict:
    grads, values = case["grads"].float(), case["losses"].float()
    steps, tasks, dim = grads.shape
    x = torch.nn.Parameter(torch.zeros(dim))
    h = [torch.nn.Parameter(torch.zeros(heads.shape[-1])) for _ in range(tasks)]
    rows: dict[str, list] = {"update": [], "heads": [], "indexes": []}
    for s in range(steps):
        for p in [x, *h]:
            p.grad = None
        losses = torch.stack(
            linear_losses(grads[s], values[s].float(), x, [(h[k], heads[s, k].float()) for k in range(tasks)])
        )
        selector = getattr(method, "loss_selector", None)
        start = None if selector is None else selector.start_index
        method.backward(losses, shared_parameters=[x], task_specific_parameters=h)
        rows["update"].append(x.grad.detach().clone())
        rows["heads"].append(torch.stack([p.grad.detach().clone() for p in h]))
        if start is not None:
            rows["indexes"].append([(start + k) % tasks for k in range(method.num_updates)])
    out = {k: torch.stack(v) for k, v in rows.items() if k != "indexes"}
    if rows["indexes"]:
        out["indexes"] = torch.tensor(rows["indexes"])
    return out


def _run_operator_one_update(case: dict, heads: torch.Tensor) -> dict:
    from conflictfree.grad_operator import ConFIGOperator
    from conflictfree.momentum_operator import PseudoMomentumOperator
    from conflictfree.utils import OrderedSliceSelector

    grads = case["grads"].float()
    steps, tasks, _ = grads.shape
    operator = PseudoMomentumOperator(num_vectors=tasks, gradient_operator=ConFIGOperator())
    selector = OrderedSliceSelector()
    rows: dict[str, list] = {"update": [], "heads": [], "indexes": []}
    for s in range(steps):
        indexes, _ = selector.select(1, list(range(tasks)))
        rows["update"].append(operator.calculate_gradient(indexes, [grads[s, i] for i in indexes]).clone())
        rows["heads"].append(heads[s].float().clone())  # the summed loss: each head its own gradient
        rows["indexes"].append(list(indexes))
    out = {k: torch.stack(v) for k, v in rows.items() if k != "indexes"}
    out["indexes"] = torch.tensor(rows["indexes"])
    return out


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    torch.set_default_dtype(torch.float32)
    config_cls, m_config_cls = _wrapper(repo)
    heads_all = head_grads()
    record = {
        "commit": commit,
        "source": "tum-pbs/ConFIG experiments/MTL/methods/weight_methods.py ConFIG, MConFIG; "
        "conflictfree/grad_operator.py ConFIGOperator; conflictfree/momentum_operator.py PseudoMomentumOperator",
        "cases": {},
    }
    for name, case in cases().items():
        tasks = case["grads"].shape[1]
        heads = heads_all[name]
        entry = {"grads": case["grads"].float(), "losses": case["losses"].float(), "heads": heads.float()}
        entry["config"] = _run_wrapper(config_cls(n_tasks=tasks, device=torch.device("cpu")), case, heads)
        entry["m_config_2"] = _run_wrapper(
            m_config_cls(n_tasks=tasks, device=torch.device("cpu"), num_updates=2), case, heads
        )
        entry["m_config_1"] = _run_operator_one_update(case, heads)
        record["cases"][name] = entry
    write(out, "conflictfree", record)
