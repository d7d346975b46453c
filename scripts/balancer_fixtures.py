"""Reference numbers of the authors' balancing code on fixed gradients and loss sequences, for
tests/test_balancers_reference_*.py.

    python scripts/balancer_fixtures.py <codebase> --repo <checkout> [--libmtl <LibMTL checkout>] [--out tests/fixtures/balancers]

`<codebase>` is a module of scripts/balancer_fixtures/ (one per reference implementation: LibMTL,
the official FAMO, Nash-MTL, CAGrad, Aligned-MTL, MGDA, MTAN code) with `build(repo, out)`, which
imports the authors' code from the folder given (nothing of theirs is copied into this project),
runs each strategy on the inputs of `balancer_fixtures.common` and writes `<out>/<codebase>.pt`:
inputs and the authors' outputs only (weights, aggregated updates, internal state per step).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
CODEBASES = sorted(
    m.name for m in pkgutil.iter_modules([str(ROOT / "balancer_fixtures")]) if not m.name.startswith("_") and m.name != "common"
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("codebase", choices=CODEBASES)
    parser.add_argument("--repo", type=Path, required=True, help="checkout of the authors' repository")
    parser.add_argument("--out", type=Path, default=ROOT.parent / "tests" / "fixtures" / "balancers")
    parser.add_argument(
        "--libmtl", type=Path, default=None,
        help="a LibMTL checkout, for codebases that also record LibMTL's variant (cagrad, fairgrad, sdmgrad, moco, excess_mtl)",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.repo.is_dir():
        raise SystemExit(f"--repo {args.repo}: no such folder")
    from balancer_fixtures import common

    common.LIBMTL = args.libmtl
    importlib.import_module(f"balancer_fixtures.{args.codebase}").build(args.repo, args.out)


if __name__ == "__main__":
    main()
