"""ExcessMTL (He et al., ICML 2024) on the shared inputs: the authors' LibMTL fork and LibMTL.

    python scripts/balancer_fixtures.py excess_mtl --repo <uiuctml/ExcessMTL checkout>

The authors' LibMTL/LibMTL/weighting/ExcessMTL.py is driven as their LibMTL trainer drives it (the
harness of balancer_fixtures/libmtl_gradient.py, plus the `encoder` their method zeroes): per step
the gradients are zeroed and `backward(losses, robust_step_size=...)` reads the task gradients of
the shared parameter with autograd and back-propagates the weighted loss, so the shared parameter
and every head get sum_t w_t g_t. The same is run with LibMTL's LibMTL/weighting/ExcessMTL.py
(4336804) from the --libmtl checkout; the two packages
are both named LibMTL, so each run imports its own. Variants: robust_step_size 1e-2 (their
config.py default) and 1 (their README's Office-Home command).

Writes `<out>/excess_mtl.pt`: {"commit", "libmtl_commit", "source", "variants": {name:
robust_step_size}, "cases": {case: {"grads", "losses", "heads", <variant>: {"update", "heads",
"weights", "grad_sum", "initial_w"}, "libmtl_<variant>": {...}}}} (float32; "grad_sum" and
"initial_w" after the last step).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fixtures.common import commit_of

from balancer_fixtures.common import cases, head_grads, libmtl_checkout, write
from balancer_fixtures.libmtl import _make, _weighting, harness_steps

VARIANTS = {"default": 1e-2, "fast": 1.0}


def _package_root(repo: Path) -> Path:
    """The folder holding the LibMTL package: the fork nests it one level down (LibMTL/LibMTL)."""
    for root in (repo / "LibMTL", repo):
        if (root / "LibMTL" / "weighting" / "ExcessMTL.py").is_file():
            return root
    raise SystemExit(f"{repo}: no LibMTL/weighting/ExcessMTL.py (expected the ExcessMTL fork or a LibMTL checkout)")


def _excess_mtl(root: Path) -> type:
    for name in [m for m in sys.modules if m == "LibMTL" or m.startswith("LibMTL.")]:
        del sys.modules[name]  # the other checkout's package of the same name
    return _weighting(root, "ExcessMTL")


def _run(cls: type, step_size: float, grads: torch.Tensor, values: torch.Tensor, heads: torch.Tensor) -> dict:
    _, tasks, dim = grads.shape
    model = _make(cls, tasks, dim, heads.shape[-1])
    model.encoder = torch.nn.ParameterList([model.x])  # what their backward zeroes before its own
    rows = harness_steps(model, grads, values, heads, {"robust_step_size": step_size})
    out = {k: torch.stack(v) for k, v in rows.items()}
    out["grad_sum"], out["initial_w"] = model.grad_sum.detach().clone(), model.initial_w.detach().clone()
    return out


def build(repo: Path, out: Path) -> None:
    torch.set_default_dtype(torch.float32)
    authors, libmtl = _package_root(repo), _package_root(libmtl_checkout())
    record = {
        "commit": commit_of(repo),
        "libmtl_commit": commit_of(libmtl_checkout()),
        "source": "uiuctml/ExcessMTL LibMTL/LibMTL/weighting/ExcessMTL.py, LibMTL/LibMTL/config.py, README.md; "
        "median-research-group/LibMTL LibMTL/weighting/ExcessMTL.py",
        "variants": VARIANTS,
        "cases": {},
    }
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        entry = {"grads": grads, "losses": values, "heads": heads}
        for prefix, root in (("", authors), ("libmtl_", libmtl)):
            cls = _excess_mtl(root)
            for variant, step_size in VARIANTS.items():
                entry[prefix + variant] = _run(cls, step_size, grads, values, heads)
        record["cases"][name] = entry
    write(out, "excess_mtl", record)
