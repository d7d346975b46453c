"""Collectives for balancers and the task-gradient step, a no-op on a single process.

Every balancer must take the same decision on every process and the same one a single process
would take on the global batch. Each process holds the mean loss (and gradient) of its own
equal-sized share of the batch, so the global value is the mean over processes; these helpers
compute it with one collective on the default process group (the one Lightning's DDP strategy
initialises).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    if world_size() == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum over processes (a new tensor; the input is not modified)."""
    return _all_reduce(tensor, dist.ReduceOp.SUM)


def all_reduce_max(tensor: Tensor) -> Tensor:
    """Element-wise maximum over processes (a new tensor; the input is not modified)."""
    return _all_reduce(tensor, dist.ReduceOp.MAX)


def all_reduce_mean(tensor: Tensor) -> Tensor:
    """Mean over processes (a new tensor; the input is not modified)."""
    size = world_size()
    if size == 1:
        return tensor
    return all_reduce_sum(tensor) / size


def step_seed(seed: int, step: int) -> int:
    """A seed that is the same on every process for a given (seed, step)."""
    return (int(seed) * 1_000_003 + int(step)) % (2**63 - 1)


def seeded_generator(seed: int, step: int) -> torch.Generator:
    """A CPU generator that is the same on every process for a given (seed, step), so random
    weightings (RLW) and random orders (PCGrad, GradDrop) agree across ranks and with one process."""
    return torch.Generator().manual_seed(step_seed(seed, step))


@contextmanager
def seeded_rng(seed: int, step: int, device: torch.device | None = None) -> Iterator[None]:
    """Run code that draws from torch's global RNG (torchjd's PCGrad and GradDrop) with a
    (seed, step) state, restoring the previous state afterwards."""
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(step_seed(seed, step))
        yield
