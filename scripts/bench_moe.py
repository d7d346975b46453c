"""Step time (forward + backward) of TaskMoE with many vs few experts at equal expert size and top-k.

With sparse dispatch a token only pays for its `top_k` experts, so the many-expert layer should cost
about as much as the few-expert one (target: at most 1.5x).

    python scripts/bench_moe.py
    python scripts/bench_moe.py --tokens 8192 --dim 768 --hidden 3072 --device cuda
    python scripts/bench_moe.py --experts 16 2 --top-k 2 --capacity-factor none
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mtl_vision.models.moe import TaskMoE


def _parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--hidden", type=int, default=1536, help="hidden size of every expert")
    parser.add_argument("--experts", type=int, nargs=2, default=(16, 2), metavar=("MANY", "FEW"))
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", default="1.25", help="a float or 'none'")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    return parser.parse_args(argv)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(num_experts: int, args: argparse.Namespace) -> tuple[float, dict[str, float]]:
    """Median seconds of forward + backward (aux loss included) and the last expert statistics."""
    device = torch.device(args.device)
    cf = None if args.capacity_factor.lower() == "none" else float(args.capacity_factor)
    torch.manual_seed(0)
    moe = TaskMoE(args.dim, args.hidden, num_experts, args.top_k, tasks=["task"], capacity_factor=cf).to(device)
    x = torch.randn(args.tokens, args.dim, device=device, requires_grad=True)
    grad = torch.randn(args.tokens, args.dim, device=device)
    times = []
    for i in range(3 + args.steps):
        moe.zero_grad(set_to_none=True)
        x.grad = None
        _sync(device)
        start = time.perf_counter()
        out = moe(x, "task")
        loss = (out * grad).sum() + 0.01 * moe.pop_aux_loss()
        loss.backward()
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times), moe.expert_stats()


def main(argv=None) -> None:
    args = _parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    many, few = args.experts
    print(
        f"tokens={args.tokens} dim={args.dim} hidden={args.hidden} top_k={args.top_k} "
        f"capacity_factor={args.capacity_factor} device={args.device} threads={torch.get_num_threads()}"
    )
    results = {}
    for num_experts in (few, many):
        t, stats = step_time(num_experts, args)
        results[num_experts] = t
        print(
            f"experts={num_experts:3d}: {t * 1000:8.1f} ms/step  "
            f"dropped_share={stats['dropped_share']:.3f} dead_share={stats['dead_share']:.3f}"
        )
    ratio = results[many] / results[few]
    verdict = "OK" if ratio <= 1.5 else "ABOVE TARGET"
    print(f"ratio {many}/{few} experts: {ratio:.2f}x (target <= 1.5x: {verdict})")


if __name__ == "__main__":
    main()
