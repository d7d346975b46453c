"""GradVac as LibMTL computes it (LibMTL/weighting/GradVac.py `GradVac.backward`; the authors
released no code), for its three group types, on the shared inputs.

    python scripts/balancer_fixtures.py gradvac --repo <LibMTL checkout>

Driven as LibMTL's trainer drives it (rep_grad=False): per step `backward(losses, GradVac_beta=0.5,
GradVac_group_type=k)` back-propagates each task loss and writes the aggregated gradient of the
shared parameters. The shared parameters are those of a small encoder (`LAYOUT`: two linear layers
and a layer norm, 40 numbers = common.DIM), so that the layers (group type 1) and the matrices
(group type 2) are different groups; the task losses are linear in the concatenated parameters with
exactly the case's values and gradients. Python's `random.shuffle` (LibMTL's task order) is
recorded, so that a test can replay the orders. Writes `<out>/gradvac.pt`: {"commit", "source",
"beta", "layout", "cases": {case: {"grads", "losses", <group_type>: {"update" (S, D), "targets"
(S, groups, T, T), "orders" [S][T][T-1]}}}}.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from fixtures.common import use_repository

from balancer_fixtures.common import cases, write
from balancer_fixtures.libmtl import _weighting

BETA = 0.5  # LibMTL/config.py --GradVac_beta default
GROUP_TYPES = {"whole_model": 0, "all_layer": 1, "all_matrix": 2}  # LibMTL's GradVac_group_type
# (module name, its parameters' shapes), in encoder.parameters() order: 12+4, 16, 4+4 = 40 numbers
LAYOUT = [("0", [(4, 3), (4,)]), ("1", [(4, 4)]), ("2", [(4,), (4,)])]


def _encoder() -> torch.nn.Module:
    encoder = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 4, bias=False), torch.nn.LayerNorm(4))
    shapes = [
        (str(name), [tuple(p.shape) for p in m.parameters(recurse=False)]) for name, m in encoder.named_children()
    ]
    assert shapes == LAYOUT, shapes
    return encoder


class _Recorder:
    """Stands in for the `random` module inside LibMTL's GradVac: shuffles as `random.shuffle` does
    and records the result."""

    def __init__(self) -> None:
        self.orders: list[list[int]] = []

    def shuffle(self, values: list) -> None:
        random.shuffle(values)
        self.orders.append(list(values))


def _run(repo: Path, case: dict, group_type: int) -> dict:
    cls = _weighting(repo, "GradVac")
    grads, values = case["grads"].float(), case["losses"].float()
    steps, tasks, dim = grads.shape

    class Harness(cls):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = _encoder()
            self.task_num, self.device, self.rep_grad = tasks, torch.device("cpu"), False
            self.init_param()

        def get_share_params(self):
            return self.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            self.encoder.zero_grad(set_to_none=False)

    model = Harness()
    recorder = _Recorder()
    sys.modules[cls.__module__].random = recorder
    random.seed(0)
    rows: dict[str, list] = {"update": [], "targets": [], "orders": []}
    for s in range(steps):
        model.encoder.zero_grad(set_to_none=True)
        flat = torch.cat([p.reshape(-1) for p in model.encoder.parameters()])
        assert flat.numel() == dim
        lin = grads[s] @ flat
        losses = lin - lin.detach() + values[s]
        start = len(recorder.orders)
        model.backward(losses, GradVac_beta=BETA, GradVac_group_type=group_type)
        rows["update"].append(torch.cat([p.grad.detach().reshape(-1) for p in model.encoder.parameters()]))
        rows["targets"].append(model.rho_T.detach().permute(2, 0, 1).double().clone())
        rows["orders"].append(recorder.orders[start:])
    return {"update": torch.stack(rows["update"]), "targets": torch.stack(rows["targets"]), "orders": rows["orders"]}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    torch.set_default_dtype(torch.float32)
    record = {
        "commit": commit,
        "source": "median-research-group/LibMTL LibMTL/weighting/GradVac.py (GradVac.backward, _init_rho)",
        "beta": BETA,
        "layout": LAYOUT,
        "cases": {},
    }
    for name, case in cases().items():
        entry = {"grads": case["grads"].float(), "losses": case["losses"].float()}
        for group_name, group_type in GROUP_TYPES.items():
            entry[group_name] = _run(repo, case, group_type)
        record["cases"][name] = entry
    write(out, "gradvac", record)
