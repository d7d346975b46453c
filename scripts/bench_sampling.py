"""Per-sample cost of the resumable training order: `EpochSampler` + `SeededSamples` against plain
indexing of a dataset whose items cost nothing, so what is printed is the overhead alone.

    python scripts/bench_sampling.py --samples 20000
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import Dataset

from mtl_vision.data.sampling import EpochSampler, SeededSamples


class Free(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> int:
        return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000)
    args = parser.parse_args()
    data = Free(args.samples)

    start = time.perf_counter()
    for index in torch.randperm(len(data)).tolist():
        data[index]
    plain = (time.perf_counter() - start) / len(data)

    seeded = SeededSamples(data)
    start = time.perf_counter()
    for item in EpochSampler(data, seed=0):
        seeded[item]
    resumable = (time.perf_counter() - start) / len(data)

    print(f"plain shuffled indexing:         {plain * 1e6:7.1f} us/sample")
    print(f"EpochSampler + SeededSamples:    {resumable * 1e6:7.1f} us/sample")
    print(f"overhead:                        {(resumable - plain) * 1e6:7.1f} us/sample")


if __name__ == "__main__":
    main()
