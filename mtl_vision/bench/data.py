"""Decoded + augmented samples/s per data-loading worker, split into decoding and transform.

One process on one thread stands for one DataLoader worker (with the worker's allocator setting,
`data.io.keep_sample_buffers`, unless --no-keep-buffers). Each sample is read with the
augmentation seed that training gives it (`data.sampling`): decoding (`dataset[i]` without a
transform: reading the files into the sample's tensors) and the training transform of the
dataset config (`conf/data/<name>.yaml`) are timed apart; the table gives the median over
--repeats passes of --num samples. Without --root a fixture is written to a temporary folder in
the real layout and at the real size (NYUD-v2 480x640 with 4 tasks, PASCAL-Context 375x500 with
5), so the numbers measure decoding and transforms, not the disk. `synthetic` renders the
built-in scenes (no files, no transform: its config trains on them as rendered).

    mtl-bench data                                        # nyud and pascal_context, fixtures
    mtl-bench data --dataset nyud --num 300 --repeats 5
    mtl-bench data --dataset pascal_context --root /data/PASCAL_MT
    mtl-bench data --dataset synthetic --size 128 160 --workers 2
    mtl-bench data --dataset nyud pascal_context --json data.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mtl_vision.bench.report import Result

__all__ = ["SETTINGS", "add_arguments", "run"]

# dataset: (tasks, crop of the data config, fixture / render size)
SETTINGS: dict[str, tuple[list[str], tuple[int, int] | None, tuple[int, int]]] = {
    "nyud": (["semseg", "depth", "normals", "edge"], (448, 576), (480, 640)),
    "pascal_context": (["semseg", "human_parts", "saliency", "normals", "edge"], (512, 512), (375, 500)),
    "synthetic": (["semseg", "depth", "normals", "edge", "saliency", "human_parts"], None, (128, 160)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", nargs="+", choices=sorted(SETTINGS), default=["nyud", "pascal_context"],
                        help="datasets to time, one row each")
    parser.add_argument("--root", type=Path, default=None,
                        help="a dataset on disk (with a single --dataset); default: a temporary fixture")
    parser.add_argument("--num", type=int, default=200, help="samples timed per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes; the table gives the median")
    parser.add_argument("--fixture-n", type=int, default=16, help="samples per split of the temporary fixture")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="fixture / render size (default: the dataset's real size)")
    parser.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="training crop (default: the data config's)")
    parser.add_argument("--workers", type=int, default=0,
                        help="also time a DataLoader with this many workers (includes their start-up)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the --workers run")
    parser.add_argument("--sampling", type=int, default=20000, metavar="N",
                        help="also time the resumable order (EpochSampler + SeededSamples) over N free items (0: skip)")
    parser.add_argument("--no-keep-buffers", action="store_true",
                        help="leave the allocator as it is (DataLoader workers keep sample buffers)")


def _fixture(name: str, out: Path, n: int, size: tuple[int, int]) -> Path:
    if name == "nyud":
        from mtl_vision.data.nyud_fixture import write_nyud_fixture

        return write_nyud_fixture(out, layout="nyud_mt", n=n, height=size[0], width=size[1])
    from mtl_vision.data.pascal_fixture import write_pascal_fixture

    return write_pascal_fixture(out, n=n, height=size[0], width=size[1])


def _datasets(name: str, root: Path | None, size: tuple[int, int], crop: tuple[int, int] | None,
              num: int) -> tuple[Any, Any]:
    """(the training split without a transform, its training transform or None)."""
    from mtl_vision.data.transforms import TrainTransform

    tasks = SETTINGS[name][0]
    if name == "synthetic":
        from mtl_vision.data.synthetic import SyntheticScenes

        return SyntheticScenes(split="train", tasks=tasks, height=size[0], width=size[1], num_samples=num), None
    transform = TrainTransform(crop_size=crop)  # the data configs' scale_range, flip and jitter are the defaults
    if name == "nyud":
        from mtl_vision.data.nyud import NYUDv2

        return NYUDv2(root=root, split="train", tasks=tasks), transform
    from mtl_vision.data.pascal_context import PascalContext

    return PascalContext(root=root, split="train", tasks=tasks), transform


def _time_passes(dataset: Any, transform: Any, num: int, repeats: int) -> dict[str, float]:
    """Median over passes of wall and CPU seconds per sample, total and split decode / transform."""
    import statistics
    import time

    import torch

    from mtl_vision.data.sampling import sample_seed

    generator = torch.default_generator
    for index in range(min(3, len(dataset))):  # lazy imports, caches
        generator.manual_seed(index)
        sample = dataset[index]
        if transform is not None:
            transform(sample)
    passes: dict[str, list[float]] = {k: [] for k in ("wall", "cpu", "decode", "transform")}
    for rep in range(repeats):
        decode = augment = 0.0
        wall, cpu = time.perf_counter(), time.process_time()
        for k in range(num):
            index = k % len(dataset)
            generator.manual_seed(sample_seed(rep, 0, index))  # as SeededSamples seeds a training sample
            t0 = time.perf_counter()
            sample = dataset[index]
            t1 = time.perf_counter()
            if transform is not None:
                transform(sample)
            decode, augment = decode + t1 - t0, augment + time.perf_counter() - t1
        passes["wall"].append((time.perf_counter() - wall) / num)
        passes["cpu"].append((time.process_time() - cpu) / num)
        passes["decode"].append(decode / num)
        passes["transform"].append(augment / num)
    return {k: statistics.median(v) for k, v in passes.items()}


def _loader_rate(dataset: Any, transform: Any, workers: int, batch_size: int, num: int) -> float:
    """Samples/s through a DataLoader with `workers` workers over `num` seeded samples (start-up included)."""
    import time

    from torch.utils.data import DataLoader

    from mtl_vision.data.datamodule import init_worker
    from mtl_vision.data.sampling import EpochSampler, SeededSamples

    class _Transformed:
        def __init__(self) -> None:
            self.n = len(dataset)

        def __len__(self) -> int:
            return max(num, self.n)

        def __getitem__(self, index: int) -> Any:
            sample = dataset[index % self.n]
            return transform(sample) if transform is not None else sample

    items = _Transformed()
    loader = DataLoader(SeededSamples(items), batch_size=batch_size, sampler=EpochSampler(items, seed=0),
                        num_workers=workers, worker_init_fn=init_worker if workers > 0 else None, drop_last=False)
    start = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def _sampling_overhead(n: int) -> tuple[float, float]:
    """(us per item of plain shuffled indexing, us per item through EpochSampler + SeededSamples)
    over a dataset whose items cost nothing, so the difference is the resumable order's overhead."""
    import time

    import torch

    from mtl_vision.data.sampling import EpochSampler, SeededSamples

    class _Free:
        def __len__(self) -> int:
            return n

        def __getitem__(self, index: int) -> int:
            return index

    data = _Free()
    start = time.perf_counter()
    for index in torch.randperm(n).tolist():
        data[index]
    plain = (time.perf_counter() - start) / n
    seeded = SeededSamples(data)
    start = time.perf_counter()
    for item in EpochSampler(data, seed=0):
        seeded[item]
    return 1e6 * plain, 1e6 * (time.perf_counter() - start) / n


def run(args: argparse.Namespace) -> Result:
    import os
    import tempfile

    import torch

    from mtl_vision.data.io import keep_sample_buffers

    if args.root is not None and len(args.dataset) != 1:
        raise SystemExit(f"mtl-bench data: --root {args.root} needs exactly one --dataset, got {args.dataset}")
    if args.root is not None and args.dataset == ["synthetic"]:
        raise SystemExit("mtl-bench data: --root: the synthetic dataset is rendered, it has no folder")
    if args.num < 1 or args.repeats < 1:
        raise SystemExit(f"mtl-bench data: --num and --repeats must be >= 1, got {args.num} and {args.repeats}")
    torch.set_num_threads(1)
    kept = False if args.no_keep_buffers else keep_sample_buffers()
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.dataset:
            tasks, crop, size = SETTINGS[name]
            size = tuple(args.size) if args.size is not None else size
            crop = tuple(args.crop) if args.crop is not None and crop is not None else crop
            root = args.root
            if root is None and name != "synthetic":
                root = _fixture(name, Path(tmp) / name, args.fixture_n, size)
            dataset, transform = _datasets(name, root, size, crop, args.num)
            t = _time_passes(dataset, transform, args.num, args.repeats)
            row = {
                "dataset": name,
                "tasks": len(tasks),
                "source": "x".join(map(str, size)) if args.root is None else str(root),
                "crop": "x".join(map(str, crop)) if crop is not None else "-",
                "samples/s": 1.0 / t["wall"],
                "samples/cpu-s": 1.0 / t["cpu"],
                "ms/sample": 1e3 * t["wall"],
                "decode ms": 1e3 * t["decode"],
                "transform ms": 1e3 * t["transform"],
            }
            if args.workers > 0:
                row[f"loader {args.workers}w samples/s"] = _loader_rate(
                    dataset, transform, args.workers, args.batch_size, args.num)
            rows.append(row)
    if args.sampling > 0:
        plain, resumable = _sampling_overhead(args.sampling)
        notes.append(f"resumable order (EpochSampler + SeededSamples) over {args.sampling} free items: "
                     f"{resumable:.1f} us/sample against {plain:.1f} for plain shuffled indexing "
                     f"(overhead {resumable - plain:.1f} us/sample)")
    notes.append("one process, one thread (a DataLoader worker); decode = dataset[i] without a transform, "
                 "transform = the config's training transform; medians over the passes")
    settings = {"num": args.num, "repeats": args.repeats, "threads": torch.get_num_threads(),
                "keep_sample_buffers": kept, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return Result(title="mtl-bench data: samples/s per data-loading worker", rows=rows, settings=settings,
                  notes=notes)
