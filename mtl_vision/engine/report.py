"""End-of-run reporting: the per-task metric table and metrics.json."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

from rich.console import Console
from rich.table import Table

from mtl_vision.tasks import get_task


def metric_table(metrics: Mapping[str, float], tasks: Sequence[str], *, title: str = "validation") -> Table:
    """One row per task: its primary metric first, then the others (per-class IoUs left out)."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("primary", justify="right")
    table.add_column("other metrics")
    for task in tasks:
        spec = get_task(task)
        prefix = f"val/{task}/"
        values = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix) and "/" not in k[len(prefix) :]}
        primary = values.pop(spec.primary, math.nan)
        arrow = "↓" if spec.lower_is_better else "↑"
        others = "  ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "loss")
        table.add_row(task, f"{spec.primary} {arrow} {primary:.4g}", others)
    return table


def print_metric_table(metrics: Mapping[str, float], tasks: Sequence[str], *, title: str = "validation") -> None:
    Console().print(metric_table(metrics, tasks, title=title))


def write_json(path: str | os.PathLike, values: Mapping[str, float]) -> Path:
    """Write a flat dict as JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dict(values), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
