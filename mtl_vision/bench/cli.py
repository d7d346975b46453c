"""`mtl-bench <subcommand> [options]`: dispatch to `mtl_vision.bench.<subcommand>`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from mtl_vision.bench.report import format_table, write_json

__all__ = ["SUBCOMMANDS", "main"]

# subcommand -> (module, one line of help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "step": ("mtl_vision.bench.step", "training step of our Trainer run vs a plain PyTorch loop of the same config"),
    "data": ("mtl_vision.bench.data", "decoded + augmented samples/s per data-loading worker"),
    "decoders": ("mtl_vision.bench.decoders", "step time and peak memory of every decoder"),
    "balancers": ("mtl_vision.bench.balancers", "step time of every balancing strategy"),
    "boundary": ("mtl_vision.bench.boundary", "cost of the BSDS boundary benchmark"),
    "guard": ("mtl_vision.bench.guard", "cost of the non-finite step guard per optimiser step"),
    "moe": ("mtl_vision.bench.moe", "TaskMoE dispatch and task-conditioned backbones"),
}


def _parser(command: str | None) -> argparse.ArgumentParser:
    """The parser of `mtl-bench`; only the module of `command` is imported (each subcommand's
    imports are its own: lightning, numba, timm)."""
    parser = argparse.ArgumentParser(
        prog="mtl-bench", description="Benchmarks of mtl_vision. Each prints a table; --json FILE writes it."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_text, add_help=False)
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name, help=help_text, description=mod.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.add_argument("--json", type=Path, default=None, help="also write the table and settings to this file")
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = _parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    result = args._module.run(args)
    print(format_table(result), flush=True)
    if args.json is not None:
        write_json(result, args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
