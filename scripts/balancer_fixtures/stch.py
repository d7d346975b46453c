"""The authors' STCH (Xi-L/STCH, STCH_MTL/LibMTL/weighting/STCH.py) on the shared inputs.

    python scripts/balancer_fixtures.py stch --repo <Xi-L/STCH checkout>
    python scripts/balancer_fixtures.py stch --repo <LibMTL checkout> --out /tmp/libmtl_stch

`--repo` is the STCH checkout (its LibMTL fork under STCH_MTL/) or a LibMTL checkout (whose
LibMTL/weighting/STCH.py is the same computation); the file says which in "source". The class is
driven as their trainer (`Trainer.train` in STCH_MTL/LibMTL/trainer.py) drives it: `model.epoch`
set at every epoch, one `backward(losses, STCH_mu=..., STCH_warmup_epoch=...)` per step with the
stacked task losses, then the model optimiser's step. The shared parameter is one vector x (D,) and
the losses of step k are `common.linear_losses` (values: the case's losses, gradients on x: the
case's gradients). Per setting (mu, warmup epochs, steps per epoch) and case, per step: "total"
(the scalar their `backward` back-propagates, captured at its `.backward()` call), "loss_grad"
(d total / d L), "shared_grad" (x.grad), "nadir" (their nadir vector after the step, zeros while
None) and "epoch". Written to `<out>/stch.pt`.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import torch

from balancer_fixtures.common import STEPS, cases, linear_losses, write
from balancer_fixtures.libmtl import _make, _weighting

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

# (mu, warmup epochs, steps per epoch): their config.py defaults are mu 1.0 and 4 warm-up epochs,
# too long for 6 steps; these settings put 2 to 5 of the 6 steps after the warm-up.
SETTINGS = {
    "mu1_warmup1_epoch2": (1.0, 1, 2),
    "mu1_warmup0_epoch1": (1.0, 0, 1),
    "mu0.1_warmup0_epoch2": (0.1, 0, 2),
    "mu3_warmup2_epoch1": (3.0, 2, 1),
}


class _Captured:
    """Records the tensor whose `.backward()` is called (their objective is a local variable)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    @contextlib.contextmanager
    def active(self):
        original = torch.Tensor.backward

        def backward(tensor, *args, **kwargs):
            self.value = tensor.detach().clone()
            return original(tensor, *args, **kwargs)

        torch.Tensor.backward = backward
        try:
            yield
        finally:
            torch.Tensor.backward = original


def _run(cls: type, case: dict, mu: float, warmup: int, epoch_steps: int) -> dict:
    grads, values = case["grads"].float(), case["losses"].float()
    tasks, dim = grads.shape[1], grads.shape[2]
    model = _make(cls, tasks, dim)
    optimiser = torch.optim.SGD([model.x], lr=0.0)  # x only carries gradients
    captured = _Captured()
    record: dict[str, list] = {"total": [], "loss_grad": [], "shared_grad": [], "nadir": [], "epoch": []}
    for k in range(STEPS):
        model.epoch = k // epoch_steps
        losses = torch.stack(linear_losses(grads[k], values[k], model.x, [None] * tasks))
        losses.retain_grad()
        optimiser.zero_grad(set_to_none=False)
        with captured.active(), contextlib.redirect_stdout(io.StringIO()):  # they print the nadir vector
            model.backward(losses, STCH_mu=mu, STCH_warmup_epoch=warmup)
        record["total"].append(captured.value.double())
        record["loss_grad"].append(losses.grad.detach().double().clone())
        record["shared_grad"].append(model.x.grad.detach().double().clone())
        nadir = model.nadir_vector
        record["nadir"].append(torch.zeros(tasks, dtype=torch.float64) if nadir is None else nadir.double().clone())
        record["epoch"].append(torch.tensor(model.epoch))
        optimiser.step()
    return {key: torch.stack(v) for key, v in record.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo)
    fork = repo / "STCH_MTL"
    if (fork / "LibMTL" / "weighting" / "STCH.py").is_file():
        root, source = fork, "Xi-L/STCH STCH_MTL/LibMTL/weighting/STCH.py, STCH_MTL/LibMTL/trainer.py"
    elif (repo / "LibMTL" / "weighting" / "STCH.py").is_file():
        root, source = repo, "median-research-group/LibMTL LibMTL/weighting/STCH.py, LibMTL/trainer.py"
    else:
        raise SystemExit(f"--repo {repo}: neither STCH_MTL/LibMTL/weighting/STCH.py nor LibMTL/weighting/STCH.py")
    cls = _weighting(root, "STCH")
    torch.set_default_dtype(torch.float32)
    inputs = cases()
    results = {
        setting: {name: _run(cls, data, mu, warmup, epoch_steps) for name, data in inputs.items()}
        for setting, (mu, warmup, epoch_steps) in SETTINGS.items()
    }
    write(
        out,
        "stch",
        {
            "commit": commit,
            "source": source,
            "cases": inputs,
            "settings": SETTINGS,
            "results": results,
        },
    )
