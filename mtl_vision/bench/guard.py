"""Cost of the non-finite step guard (`mtl_vision/engine/guard.py`) per optimiser step on CPU.

The guard snapshots the buffers before the forward and checks gradients and buffers for
non-finite values before the step; both are timed against the forward + backward of a timm
classification model they guard (median of `--repeats`; the guard's parts 5x as many times).

    mtl-bench guard
    mtl-bench guard --model resnet18 --size 128 --repeats 3 --json guard.json
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from mtl_vision.bench.report import Result

__all__ = ["add_arguments", "median_ms", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet50", help="a timm model name (random init)")
    parser.add_argument("--size", type=int, default=224, help="square input side")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="timed forward + backward passes")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, in milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def run(args: argparse.Namespace) -> Result:
    import timm
    import torch

    from mtl_vision.engine.guard import NonFiniteGuard

    if args.repeats < 1 or args.batch < 1 or args.size < 1:
        raise SystemExit(f"--repeats, --batch, --size >= 1 expected, got {args.repeats}, {args.batch}, {args.size}")
    model = timm.create_model(args.model, pretrained=False)
    x = torch.randn(args.batch, 3, args.size, args.size)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    guard = NonFiniteGuard()
    step()
    step_ms = median_ms(step, args.repeats)
    snapshot_ms = median_ms(lambda: guard.snapshot(model), args.repeats * 5)
    check_ms = median_ms(lambda: guard.check(model.parameters()), args.repeats * 5)
    rows = [
        {"part": "forward+backward", "ms": step_ms, "percent_of_step": 100.0},
        {"part": "guard snapshot", "ms": snapshot_ms, "percent_of_step": 100 * snapshot_ms / step_ms},
        {"part": "guard check", "ms": check_ms, "percent_of_step": 100 * check_ms / step_ms},
        {"part": "guard total", "ms": snapshot_ms + check_ms,
         "percent_of_step": 100 * (snapshot_ms + check_ms) / step_ms},
    ]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    settings = {"model": args.model, "params_m": round(params, 1), "batch": args.batch, "size": args.size,
                "threads": torch.get_num_threads(), "repeats": args.repeats}
    return Result(title="Non-finite step guard: cost per optimiser step", rows=rows, settings=settings)
