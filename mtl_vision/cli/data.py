"""`mtl-data`: check a dataset on disk, or write a tiny one in a real layout.

    mtl-data check data=nyud data.root=/data/NYUD_MT [data.layout=nyudv2]
    mtl-data check data=pascal_context data.root=/data/PASCAL_MT
    mtl-data check data=cityscapes data.root=/data/cityscapes [data.dataset.labels=19]
    mtl-data fixture --layout {nyud_mt,nyudv2,mtan,pascal_mt,cityscapes_mtan,cityscapes_libmtl} --out DIR [--n N]

`check` composes the same config as `mtl-train` (so it checks what training would read), reads
every sample of the train and val splits and prints the number of supervised samples per split
and task; the first missing, corrupt or out-of-range file is named and the exit status is 1.
Nothing is written into the data folder.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from rich.console import Console
from rich.table import Table

from mtl_vision.cli import check_config_dir

FIXTURE_LAYOUTS = ("nyud_mt", "nyudv2", "mtan", "pascal_mt", "cityscapes_mtan", "cityscapes_libmtl")


def check(overrides: Sequence[str]) -> dict[str, dict[str, int]]:
    """Read every sample of the configured dataset's train and val splits; {split: {task: count}}."""
    with initialize_config_dir(config_dir=str(check_config_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    datamodule = instantiate(cfg.data)
    counts: dict[str, dict[str, int]] = {}
    for split in dict.fromkeys([datamodule.train_split, datamodule.val_split]):
        dataset = datamodule.build_split(split)
        counts[split] = dataset.check()
    return counts


def write_fixture(layout: str, out: Path, n: int, seed: int) -> Path:
    if layout == "pascal_mt":
        from mtl_vision.data.pascal_fixture import write_pascal_fixture

        return write_pascal_fixture(out, n=n, seed=seed)
    if layout.startswith("cityscapes_"):
        from mtl_vision.data.cityscapes_fixture import write_cityscapes_fixture

        return write_cityscapes_fixture(out, layout=layout.removeprefix("cityscapes_"), n=n, seed=seed)
    from mtl_vision.data.nyud_fixture import write_nyud_fixture

    return write_nyud_fixture(out, layout=layout, n=n, seed=seed)


def _print_counts(counts: dict[str, dict[str, int]]) -> None:
    tasks = list(dict.fromkeys(t for per_split in counts.values() for t in per_split))
    table = Table(title="samples with supervision, per split and task")
    table.add_column("split")
    for task in tasks:
        table.add_column(task, justify="right")
    for split, per_task in counts.items():
        table.add_row(split, *(str(per_task.get(t, 0)) for t in tasks))
    Console().print(table)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="mtl-data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="validate a dataset layout (Hydra overrides as for mtl-train)")
    p_check.add_argument("overrides", nargs="*", help="e.g. data=nyud data.root=/data/NYUD_MT")
    p_fix = sub.add_parser("fixture", help="write a tiny dataset in a real on-disk layout")
    p_fix.add_argument("--layout", required=True, choices=FIXTURE_LAYOUTS)
    p_fix.add_argument("--out", required=True, type=Path)
    p_fix.add_argument("--n", type=int, default=4, help="samples per split")
    p_fix.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "fixture":
        root = write_fixture(args.layout, args.out, args.n, args.seed)
        print(f"wrote a {args.layout} fixture with {args.n} samples per split to {root}")
        return 0
    try:
        counts = check(args.overrides)
    except (OSError, ValueError) as err:  # DataFileError is a ValueError; missing roots are OSErrors
        print(f"mtl-data check: {err}", file=sys.stderr)
        return 1
    _print_counts(counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
