"""Reference fixtures from the authors' code: their model at its smallest configuration, random
weights, eval mode, float32 on the CPU; saved as their checkpoint plus inputs and outputs.

    python scripts/reference_fixtures.py invpt --repo /src/Multi-Task-Transformer/InvPT
    python scripts/reference_fixtures.py taskprompter --repo /src/Multi-Task-Transformer/TaskPrompter
    python scripts/reference_fixtures.py mlore --repo /src/MLoRE
    python scripts/reference_fixtures.py mtan --repo /src/nash-mtl --datasets nyuv2 cityscapes

The repository is imported from the folder given (never vendored or installed by this project);
its own dependencies (einops, easydict, an old-API timm, ...) must be importable, e.g. from a
scratch virtual environment. Writes tests/fixtures/reference/<model>_<dataset>.{pth,pt} for the
NYUD and PASCAL-Context task sets; tests/test_reference_models.py compares ours with them.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
MODELS = ("invpt", "taskprompter", "mlore", "mtlora", "padnet", "mtinet", "ctal", "hps", "memanet", "mtan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=MODELS)
    parser.add_argument("--repo", type=Path, required=True, help="folder of the authors' code for this model")
    parser.add_argument("--datasets", nargs="+", default=["nyud", "pascal"], choices=["nyud", "pascal", "pascal_vitb", "pascal_plus", "pascal_pertask_plus", "nyud_en", "cityscapes", "nyuv2"])
    parser.add_argument("--out", type=Path, default=ROOT.parent / "tests" / "fixtures" / "reference")
    args = parser.parse_args()
    builder = importlib.import_module(f"fixtures.{args.model}")
    for dataset in args.datasets:
        builder.build(args.repo, dataset, args.out)


if __name__ == "__main__":
    main()
