"""MTAN's own trainer (lorenmt/mtan im2im_pred/utils.py `multi_task_trainer`) on the shared inputs:
its DWA and uncertainty weighting, for the 3-task cases (the trainer hard-codes NYUv2's 3 tasks).

    python scripts/balancer_fixtures.py mtan --repo <mtan checkout>

The trainer runs unchanged, with shims for what it reads from the data and the network:
`model_fit` returns the case's losses of the step, `L_t = <x, g_kt> - <x, g_kt>.detach() + loss_kt`
(x (D,) a shared parameter of a stand-in model, which also holds `logsigma`, initialised to -0.5 as
in im2im_pred/model_segnet_mtan.py), the loaders yield placeholders (with the Python 2 `.next()`
the trainer calls), the metrics and confusion matrix return zeros, and there is no test batch.
Epochs of EPOCH_STEPS steps; the balancer's own parameters (logsigma) take SGD steps of LR. Per
weighting and case, per step: "loss_grad" (d total / d L_t: the weights), "logsigma" (after the
step). Written to `<out>/mtan.pt`.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

import torch

from balancer_fixtures.common import STEPS, cases, write

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fixtures.common import use_repository

EPOCH_STEPS = 2
LR = 0.02
TEMP = 2.0  # im2im_pred/model_segnet_mtan.py --temp default
LOGSIGMA_INIT = -0.5  # im2im_pred/model_segnet_mtan.py: nn.Parameter(torch.FloatTensor([-0.5, -0.5, -0.5]))


class _Loader:
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> _Loader:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        return (torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))

    next = __next__  # the trainer's Python 2 spelling


class _Model(torch.nn.Module):
    class_nb = 2

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.x = torch.nn.Parameter(torch.zeros(dim))
        self.logsigma = torch.nn.Parameter(torch.full((3,), LOGSIGMA_INIT))

    def forward(self, image: torch.Tensor):
        pred = torch.zeros(1, 2, 1)
        return [pred, pred, pred], self.logsigma


class _Conf:
    def __init__(self, classes: int) -> None:
        pass

    def update(self, pred, target) -> None:
        pass

    def get_metrics(self):
        return 0.0, 0.0


def _run(utils, case: dict, weight: str) -> dict:
    grads, values = case["grads"], case["losses"]
    model = _Model(grads.shape[2])
    step = {"k": 0, "t": 0, "losses": []}

    def model_fit(pred, target, task_type):
        k, t = step["k"], step["t"]
        lin = grads[k, t].float() @ model.x
        loss = lin - lin.detach() + values[k, t].float()
        loss.retain_grad()
        step["losses"].append(loss)
        step["t"] = (t + 1) % 3
        return loss

    record: dict[str, list] = {"loss_grad": [], "logsigma": []}

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            out = super().step(closure)
            record["loss_grad"].append(torch.stack([loss.grad.detach().double() for loss in step["losses"]]))
            record["logsigma"].append(model.logsigma.detach().double().clone())
            step["losses"], step["k"] = [], step["k"] + 1
            return out

    optimiser = Recording([{"params": [model.x], "lr": 0.0}, {"params": [model.logsigma], "lr": LR}])
    utils.model_fit = model_fit
    utils.depth_error = lambda pred, target: (0.0, 0.0)
    utils.normal_error = lambda pred, target: (0.0, 0.0, 0.0, 0.0, 0.0)
    utils.ConfMatrix = _Conf
    scheduler = torch.optim.lr_scheduler.StepLR(optimiser, step_size=100, gamma=0.5)
    opt = types.SimpleNamespace(weight=weight, temp=TEMP)
    utils.multi_task_trainer(
        _Loader(EPOCH_STEPS),
        _Loader(0),
        model,
        torch.device("cpu"),
        optimiser,
        scheduler,
        opt,
        total_epoch=STEPS // EPOCH_STEPS,
    )
    return {key: torch.stack(v) for key, v in record.items()}


def build(repo: Path, out: Path) -> None:
    commit = use_repository(repo / "im2im_pred")
    utils = importlib.import_module("utils")
    if not hasattr(utils, "multi_task_trainer"):
        raise SystemExit(f"{repo}/im2im_pred/utils.py has no multi_task_trainer (another `utils` module was imported)")
    inputs = {name: data for name, data in cases().items() if data["grads"].shape[1] == 3}
    results = {
        weight: {name: _run(utils, data, weight) for name, data in inputs.items()} for weight in ("dwa", "uncert")
    }
    write(
        out,
        "mtan",
        {
            "commit": commit,
            "source": "lorenmt/mtan im2im_pred/utils.py multi_task_trainer; logsigma init from im2im_pred/model_segnet_mtan.py",
            "cases": inputs,
            "epoch_steps": EPOCH_STEPS,
            "lr": LR,
            "temp": TEMP,
            "results": results,
        },
    )
