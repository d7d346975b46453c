"""Decoded + augmented samples/s per data-loading worker for NYUD-v2 and PASCAL-Context.

One process with one thread stands for one DataLoader worker. Without --root a fixture is written
to a temporary folder in the real layout and at the real image size (NYUD 480x640 with 4 tasks,
PASCAL 375x500 with 5 tasks), so the number measures decoding and the training transforms of the
dataset config, not disk speed.

    python scripts/bench_data.py --dataset nyud --num 200
    python scripts/bench_data.py --dataset pascal_context --root /data/PASCAL_MT
"""

from __future__ import annotations

import argparse
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from mtl_vision.data.transforms import TrainTransform  # noqa: E402

SETTINGS = {
    # dataset: (tasks, crop size of the data config, fixture size)
    "nyud": (["semseg", "depth", "normals", "edge"], (448, 576), (480, 640)),
    "pascal_context": (["semseg", "human_parts", "saliency", "normals", "edge"], (512, 512), (375, 500)),
}


def _dataset(name: str, root: Path, tasks: list[str], crop: tuple[int, int]):
    transform = TrainTransform(crop_size=crop)
    if name == "nyud":
        from mtl_vision.data.nyud import NYUDv2

        return NYUDv2(root=root, split="train", tasks=tasks, transform=transform)
    from mtl_vision.data.pascal_context import PascalContext

    return PascalContext(root=root, split="train", tasks=tasks, transform=transform)


def _fixture(name: str, out: Path, n: int, size: tuple[int, int]) -> Path:
    if name == "nyud":
        from mtl_vision.data.nyud_fixture import write_nyud_fixture

        return write_nyud_fixture(out, layout="nyud_mt", n=n, height=size[0], width=size[1])
    from mtl_vision.data.pascal_fixture import write_pascal_fixture

    return write_pascal_fixture(out, n=n, height=size[0], width=size[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(SETTINGS), default="nyud")
    parser.add_argument("--root", type=Path, default=None, help="a dataset on disk; default: a temporary fixture")
    parser.add_argument("--num", type=int, default=200, help="samples to time")
    parser.add_argument("--fixture-n", type=int, default=16, help="samples per split of the temporary fixture")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks, crop, size = SETTINGS[args.dataset]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or _fixture(args.dataset, Path(tmp) / args.dataset, args.fixture_n, size)
        dataset = _dataset(args.dataset, root, tasks, crop)
        torch.manual_seed(0)
        for i in range(min(5, len(dataset))):  # warm caches and lazy imports
            dataset[i]
        start = time.perf_counter()
        cpu = time.process_time()
        for i in range(args.num):
            dataset[i % len(dataset)]
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"{args.dataset}: tasks={','.join(tasks)} crop={crop[0]}x{crop[1]} source={'fixture ' + 'x'.join(map(str, size)) if args.root is None else root}")
    print(f"per worker: {args.num / wall:.1f} samples/s wall, {args.num / cpu:.1f} samples/s per CPU second, {1000 * wall / args.num:.1f} ms/sample")


if __name__ == "__main__":
    main()
