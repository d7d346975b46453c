"""Inputs every balancer fixture shares: per-step task gradients (a Jacobian of T tasks over D
shared parameters) and task losses, for T = 2, 3, 4, one nearly rank-deficient case, and the
helpers that write a fixture file. Deterministic in the seed; mtl_vision is not imported."""

from __future__ import annotations

from pathlib import Path

import torch

STEPS = 6
DIM = 40


def cases(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """{case: {"grads": (STEPS, T, DIM) float64, "losses": (STEPS + 1, T) float64 > 0}}.

    `t2`, `t3`, `t4`: random conflicting gradients of different norms; `t3_near_rank_deficient`:
    the third gradient is the mean of the first two plus 1e-6 noise (Gramian rank 2 up to 1e-12).
    Losses decrease with noise, as in training; the extra row is the losses after the last step
    (for methods that recompute the losses after the update, FAMO)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for t in (2, 3, 4):
        scale = torch.logspace(0, 1, t, dtype=torch.float64).view(1, t, 1)
        grads = torch.randn(STEPS, t, DIM, generator=g, dtype=torch.float64) * scale
        grads[:, 1] -= 0.8 * grads[:, 0]  # conflict
        out[f"t{t}"] = {"grads": grads, "losses": _losses(t, g)}
    base = torch.randn(STEPS, 2, DIM, generator=g, dtype=torch.float64)
    third = base.mean(dim=1, keepdim=True) + 1e-6 * torch.randn(STEPS, 1, DIM, generator=g, dtype=torch.float64)
    out["t3_near_rank_deficient"] = {"grads": torch.cat([base, third], dim=1), "losses": _losses(3, g)}
    return out


def _losses(t: int, g: torch.Generator) -> torch.Tensor:
    start = 1.0 + 2.0 * torch.rand(t, generator=g, dtype=torch.float64)
    decay = torch.cumprod(0.9 + 0.08 * torch.rand(STEPS + 1, t, generator=g, dtype=torch.float64), dim=0)
    return start * decay


def write(out: Path, name: str, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.pt"
    torch.save(record, path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB)")


HEAD_DIM = 6


def head_grads(seed: int = 1) -> dict[str, torch.Tensor]:
    """{case: (STEPS, T, HEAD_DIM) float64}: gradients of each task's loss on its own head, for the
    methods that weight the heads (Nash-MTL, MGDA); deterministic in the seed, cases as `cases()`."""
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(STEPS, case["grads"].shape[1], HEAD_DIM, generator=g, dtype=torch.float64)
        for name, case in cases().items()
    }


def linear_losses(grads: torch.Tensor, values: torch.Tensor, shared: torch.Tensor, heads: list) -> list:
    """Task losses whose value is `values[t]` and whose gradients are exactly `grads[t]` on the
    shared parameter (D,) and `heads[t]` ... (a list of (param, gradient) pairs, or None) on the
    task's head: sum(g * p) - sum(g * p).detach() + value, so that an authors' balancer that
    back-propagates losses sees exactly the fixture's gradients."""
    out = []
    for t in range(grads.shape[0]):
        term = (grads[t] * shared).sum()
        if heads[t] is not None:
            param, grad = heads[t]
            term = term + (grad * param).sum()
        out.append(term - term.detach() + values[t])
    return out


LIBMTL: Path | None = None  # the LibMTL checkout of `scripts/balancer_fixtures.py --libmtl`


def libmtl_checkout() -> Path:
    """The LibMTL checkout passed with --libmtl, for codebases whose fixture also records LibMTL's
    variant of the method (CAGrad, FairGrad, SDMGrad, MoCo, ExcessMTL)."""
    if LIBMTL is None:
        raise SystemExit("this codebase also runs LibMTL's variant of the method: pass --libmtl <LibMTL checkout>")
    if not (LIBMTL / "LibMTL" / "weighting").is_dir():
        raise SystemExit(f"--libmtl {LIBMTL}: no LibMTL/weighting/ folder (expected a median-research-group/LibMTL checkout)")
    return LIBMTL
