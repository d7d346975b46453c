"""Throughput of the synthetic scene dataset: samples/s of `__getitem__` on one thread, and
through a DataLoader with worker processes.

    PYTHONPATH=. python scripts/bench_synthetic.py --num 500 --workers 2
"""

from __future__ import annotations

import argparse
import os

# One thread means one thread for numpy's BLAS too; set before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from mtl_vision.data.synthetic import TASK_NAMES, SyntheticScenes  # noqa: E402


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--num", type=int, default=500, help="samples to time")
    parser.add_argument("--tasks", nargs="+", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (0 skips the loader run)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--split", default="train")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    torch.set_num_threads(1)
    dataset = SyntheticScenes(split=args.split, tasks=args.tasks, height=args.height, width=args.width,
                              num_samples=args.num)
    dataset[0]  # warm caches (pixel grid, noise bank) outside the timed loop
    wall, cpu = time.perf_counter(), time.process_time()
    for index in range(args.num):
        dataset[index]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{args.height}x{args.width} tasks={','.join(args.tasks)}")
    print(f"single thread: {args.num / wall:8.1f} samples/s wall, {args.num / cpu:8.1f} samples/s per CPU second, "
          f"{1e3 * wall / args.num:.2f} ms/sample")
    if args.workers > 0:
        loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=False)
        start = time.perf_counter()
        count = sum(batch["image"].shape[0] for batch in loader)
        print(f"DataLoader workers={args.workers} batch={args.batch_size}: "
              f"{count / (time.perf_counter() - start):8.1f} samples/s (includes worker start-up)")


if __name__ == "__main__":
    main()
