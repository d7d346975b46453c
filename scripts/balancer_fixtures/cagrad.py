"""CAGrad as Cranial-XIX/CAGrad runs it on NYUv2 (nyuv2/utils.py: `cagrad` and `overwrite_grad`
inside `multi_task_mgd_trainer`, with `--alpha 0.4` of nyuv2/run.sh) and as LibMTL runs it
(LibMTL/weighting/CAGrad.py `CAGrad.backward`, calpha 0.5, rescale 1, from the --libmtl checkout
or --libmtl).

Their `cagrad` is a local function of the trainer, fixed to 3 tasks: it is taken from their file
with `ast` and run as they wrote it (the 3-task cases); the x3 of their `overwrite_grad` is applied
as there. LibMTL's generalises it to T tasks (all cases). Inputs in float32. Writes cagrad.pt."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from balancer_fixtures.common import cases, libmtl_checkout, write


def _authors_cagrad(repo: Path):
    tree = ast.parse((repo / "nyuv2" / "utils.py").read_text())
    trainer = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == "multi_task_mgd_trainer")
    fn = next(n for n in trainer.body if isinstance(n, ast.FunctionDef) and n.name == "cagrad")
    space = {"np": np, "torch": torch, "minimize": minimize}
    code = compile(ast.Module(body=[fn], type_ignores=[]), str(repo / "nyuv2" / "utils.py"), "exec")
    exec(code, space)  # noqa: S102 -- their function, from the checkout the user passes
    return space["cagrad"]


class _LibMTLSelf:
    """What LibMTL's CAGrad.backward reads from its weighting object."""

    rep_grad = False
    device = torch.device("cpu")

    def __init__(self, grads: torch.Tensor) -> None:
        self.grads, self.task_num, self.new = grads, grads.shape[0], None

    def _compute_grad_dim(self) -> None:
        pass

    def _compute_grad(self, losses, mode):
        return self.grads

    def _reset_grad(self, new_grads):
        self.new = new_grads


def _libmtl_backward():
    # their package __init__ imports the whole trainer (torch_geometric, ...): bind the two package
    # names to their folders only, so that just the weighting modules load
    for name, folder in (("LibMTL", libmtl_checkout() / "LibMTL"), ("LibMTL.weighting", libmtl_checkout() / "LibMTL" / "weighting")):
        package = types.ModuleType(name)
        package.__path__ = [str(folder)]
        sys.modules.setdefault(name, package)
    spec = importlib.util.spec_from_file_location("libmtl_cagrad", libmtl_checkout() / "LibMTL" / "weighting" / "CAGrad.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CAGrad.backward


def build(repo: Path, out: Path) -> None:
    theirs = _authors_cagrad(repo)
    libmtl = _libmtl_backward()
    commit = subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip()
    libmtl_commit = subprocess.check_output(["git", "-C", str(libmtl_checkout()), "rev-parse", "HEAD"], text=True).strip()
    record = {"commit": commit, "libmtl_commit": libmtl_commit, "cases": {},
              "source": "nyuv2/utils.py multi_task_mgd_trainer.cagrad/overwrite_grad; LibMTL/weighting/CAGrad.py"}  # fmt: skip
    for name, case in cases().items():
        grads = case["grads"].float()
        steps, t, _ = grads.shape
        entry = {"grads": grads, "losses": case["losses"].float()}
        if t == 3:
            entry["authors"] = torch.stack([theirs(grads[s].T.contiguous(), 0.4, rescale=1) * 3 for s in range(steps)])
        updates = []
        for s in range(steps):
            obj = _LibMTLSelf(grads[s])
            libmtl(obj, None, calpha=0.5, rescale=1)
            updates.append(obj.new)
        entry["libmtl"] = torch.stack(updates)
        record["cases"][name] = entry
    write(out, "cagrad", record)
