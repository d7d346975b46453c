"""Nash-MTL as AvivNavon/nash-mtl runs it: `NashMTL.backward` (methods/weight_methods.py) with
its defaults (max_norm 1.0, update_weights_every 1, optim_niter 20; the same as the defaults of
experiments/utils.py) and once with update_weights_every 2, on a shared parameter and one head per
task whose losses have exactly the fixture's gradients (float32). One NashMTL object per case, run
over the steps, as in training (warm start from the previous weights). Writes nashmtl.pt: per
step the shared gradient after their clip_grad_norm_, the heads' gradients and their weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from balancer_fixtures.common import cases, head_grads, linear_losses, write

VARIANTS = {"default": {}, "every2": {"update_weights_every": 2}}


def build(repo: Path, out: Path) -> None:
    sys.path.insert(0, str(repo))
    from methods.weight_methods import NashMTL

    record = {"commit": subprocess.check_output(["git", "-C", str(repo), "rev-parse", "HEAD"], text=True).strip(),
              "source": "methods/weight_methods.py NashMTL.backward", "variants": VARIANTS, "cases": {}}  # fmt: skip
    heads_all = head_grads()
    for name, case in cases().items():
        grads, values, heads = case["grads"].float(), case["losses"].float(), heads_all[name].float()
        steps, t, dim = grads.shape
        record["cases"][name] = {"grads": grads, "losses": values, "heads": heads}
        for variant, kwargs in VARIANTS.items():
            method = NashMTL(n_tasks=t, device=torch.device("cpu"), **kwargs)
            rows = {"update": [], "weights": [], "heads": []}
            for s in range(steps):
                shared = torch.nn.Parameter(torch.zeros(dim))
                own = [torch.nn.Parameter(torch.zeros(heads.shape[-1])) for _ in range(t)]
                losses = linear_losses(grads[s], values[s], shared, [(own[k], heads[s, k]) for k in range(t)])
                _, extra = method.backward(
                    torch.stack(losses), shared_parameters=[shared], task_specific_parameters=own
                )
                rows["update"].append(shared.grad.clone())
                rows["weights"].append(torch.as_tensor(extra["weights"], dtype=torch.float64))
                rows["heads"].append(torch.stack([p.grad.clone() for p in own]))
            record["cases"][name][variant] = {k: torch.stack(v) for k, v in rows.items()}
    write(out, "nashmtl", record)
