"""Aligned-MTL as SamsungLabs/MTL runs it: `AlignedMTLBalancer.step` (code/optim/aligned/balancer.py)
on a shared parameter whose task losses have exactly the fixture's gradients (float32, their dtype).

Their code calls torch.symeig (removed from torch); the shim maps it to torch.linalg.eigh(UPLO="U"),
which returns the same ascending eigenvalues. Writes aligned_mtl.pt: per case and scale mode, the
shared gradient they write and their task weights (weights.sum(-1)) per step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from balancer_fixtures.common import cases, linear_losses, write


def _shim() -> None:
    if torch.__version__ >= "1.9":  # symeig is deprecated there and raises from 2.0
        torch.symeig = lambda a, eigenvectors=True, upper=True: torch.linalg.eigh(a, UPLO="U" if upper else "L")


def build(repo: Path, out: Path) -> None:
    _shim()
    sys.path.insert(0, str(repo / "code"))
    from optim.aligned.balancer import AlignedMTLBalancer
    from optim.aligned.solver import ProcrustesSolver

    record = {"commit": subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip(),
              "source": "code/optim/aligned/balancer.py AlignedMTLBalancer.step, code/optim/aligned/solver.py",
              "cases": {}}  # fmt: skip
    for name, case in cases().items():
        grads = case["grads"].float()
        record["cases"][name] = {"grads": grads, "losses": case["losses"].float()}
        for mode in ("min", "median", "rmse"):
            balancer = AlignedMTLBalancer(scale_mode=mode)
            shared = torch.nn.Parameter(torch.zeros(grads.shape[-1]))
            updates, weights = [], []
            for step in range(grads.shape[0]):
                losses = linear_losses(grads[step], case["losses"][step].float(), shared, [None] * grads.shape[1])
                shared.grad = None
                balancer.step({str(t): l for t, l in enumerate(losses)}, [shared], None)
                updates.append(shared.grad.detach().clone())
                weights.append(ProcrustesSolver.apply(grads[step].T.unsqueeze(0), mode)[1].sum(-1))
            record["cases"][name][mode] = {"update": torch.stack(updates), "weights": torch.stack(weights)}
    write(out, "aligned_mtl", record)
