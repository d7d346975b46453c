"""Cost of the non-finite step guard (engine/guard.py) per optimiser step on CPU: the buffer
snapshot before the forward and the finiteness check of gradients and buffers, against the
forward+backward it guards. `python scripts/bench_guard.py [--model resnet50] [--size 224]`"""

from __future__ import annotations

import argparse
import time

import timm
import torch

from mtl_vision.engine.guard import NonFiniteGuard


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
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
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{args.model} ({params:.1f} M parameters), batch {args.batch} at {args.size}px, {torch.get_num_threads()} threads")
    print(f"forward+backward {step_ms:9.2f} ms")
    print(f"guard snapshot   {snapshot_ms:9.3f} ms")
    print(f"guard check      {check_ms:9.3f} ms")
    print(f"guard / step     {100 * (snapshot_ms + check_ms) / step_ms:9.2f} %")


if __name__ == "__main__":
    main()
