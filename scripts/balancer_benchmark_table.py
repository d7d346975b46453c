"""The balancing benchmark's table from a finished sweep: per balancer, the mean over its seeds of
each run's metrics averaged over its last epochs, as the balancing papers report them.

    mtl-train hparams_search=balancer_benchmark experiment=mtan_cityscapes data.root=/data/cityscapes \
        hydra.sweep.dir=logs/bench_cityscapes
    python scripts/balancer_benchmark_table.py logs/bench_cityscapes

Reads every `<sweep dir>/<job>/` with a `.hydra/overrides.yaml` (its `balancer=` and `seed=`) and
`metrics_last10.json` (the experiments' `callbacks.last_epochs`; `metrics.json`, the final
validation, when a run has none, marked with *). Prints a Markdown table: one row per balancer,
the mean over seeds of each metric (`--keys`, those the runs have), Δm with the papers' sign
(lower is better: -val/delta_m) and the number of seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import yaml

KEYS = ("semseg/mIoU", "semseg/pixel_acc", "depth/abs_err", "depth/abs_rel", "normals/mean", "normals/median",
        "normals/within_11_25", "normals/within_22_5", "normals/within_30")


def read_jobs(sweep: Path) -> list[dict]:
    """[{"balancer", "seed", "metrics", "final_only"}] of the finished jobs of a sweep directory."""
    jobs = []
    for overrides in sorted(sweep.glob("*/.hydra/overrides.yaml")):
        job = overrides.parent.parent
        values = dict(o.split("=", 1) for o in yaml.safe_load(overrides.read_text()) or [] if "=" in o)
        last, final = job / "metrics_last10.json", job / "metrics.json"
        path = last if last.is_file() else final
        if not path.is_file():
            continue  # not finished
        jobs.append({"balancer": values.get("balancer", "(default)"), "seed": values.get("seed", "(default)"),
                     "metrics": json.loads(path.read_text()), "final_only": path == final})
    return jobs


def table(jobs: list[dict], keys: tuple[str, ...] = KEYS) -> str:
    """The Markdown table of `jobs` (see the module docstring)."""
    if not jobs:
        raise ValueError("no finished jobs (no <job>/metrics_last10.json or metrics.json)")
    present = [k for k in keys if all(f"val/{k}" in j["metrics"] for j in jobs)]
    with_delta = all("val/delta_m" in j["metrics"] for j in jobs)
    rows = defaultdict(list)
    for job in jobs:
        rows[job["balancer"]].append(job)
    head = ["balancer", *present, *(["Δm % (lower is better)"] if with_delta else []), "seeds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for balancer in sorted(rows):
        runs = rows[balancer]
        cells = [balancer + (" *" if any(r["final_only"] for r in runs) else "")]
        for key in [*present, *(["delta_m"] if with_delta else [])]:
            mean = math.fsum(float(r["metrics"][f"val/{key}"]) for r in runs) / len(runs)
            cells.append(f"{-mean:+.2f}" if key == "delta_m" else f"{mean:.4f}" if abs(mean) < 1 else f"{mean:.2f}")
        cells.append(str(len({r["seed"] for r in runs})))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep directories (hydra.sweep.dir)")
    parser.add_argument("--keys", default=",".join(KEYS), help="<task>/<metric> columns, comma-separated")
    args = parser.parse_args(argv)
    jobs = [job for sweep in args.sweeps for job in read_jobs(sweep)]
    try:
        print(table(jobs, tuple(k for k in args.keys.split(",") if k)))
    except ValueError as err:
        print(f"balancer_benchmark_table: {err} in {', '.join(map(str, args.sweeps))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
