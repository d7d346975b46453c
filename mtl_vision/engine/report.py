"""End-of-run reporting: the per-task metric table and metrics.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from mtl_vision.fileio import atomic_write_text
from mtl_vision.metrics.delta_m import KEY as DELTA_M_KEY
from mtl_vision.metrics.delta_m import task_metrics
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, protocol_primary
from mtl_vision.tasks import get_task


def primary_key(task: str, values: Mapping[str, float], protocol: str = DEFAULT_PROTOCOL) -> str:
    """The key a table shows first for `task`: the protocol's primary (MTI-Net's saliency mIoU,
    InvPT's saliency maxF) where it differs and was computed, else the task's primary or its proxy."""
    own = protocol_primary(task, protocol)
    if own is not None and own in values:
        return own
    spec = get_task(task)
    return spec.primary_in(values) or spec.primary


def metric_table(
    metrics: Mapping[str, float], tasks: Sequence[str], *, title: str = "validation", protocol: str = DEFAULT_PROTOCOL
) -> Table:
    """One row per task: its primary metric first, then the others (per-class IoUs left out)."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("primary", justify="right")
    table.add_column("other metrics")
    for task in tasks:
        spec = get_task(task)
        values = task_metrics(metrics, task)
        key = primary_key(task, values, protocol)
        primary = values.pop(key, math.nan)
        arrow = "↓" if key in spec.lower_is_better_keys else "↑"
        others = "  ".join(f"{k} {v:.4g}" for k, v in values.items())
        table.add_row(task, f"{key} {arrow} {primary:.4g}", others)
    if f"val/{DELTA_M_KEY}" in metrics:
        table.add_row("all", f"Δm ↑ {metrics[f'val/{DELTA_M_KEY}']:+.2f}%", "")
    return table


def markdown_report(
    metrics: Mapping[str, float],
    tasks: Sequence[str],
    *,
    name: str,
    baselines: Mapping[str, Mapping[str, float]] | None = None,
    convention: str = "mtinet",
    protocol: str = DEFAULT_PROTOCOL,
) -> str:
    """A results table as the papers print it (one column per task's primary metric, then Δm),
    with the single-task baseline row when there is one, followed by every metric per task."""
    baselines = baselines or {}
    values = {t: task_metrics(metrics, t) for t in tasks}
    keys = {t: primary_key(t, values[t], protocol) for t in tasks}

    def arrow(task: str, key: str) -> str:
        return "↓" if key in get_task(task).lower_is_better_keys else "↑"

    head = [f"{t} {keys[t]} {arrow(t, keys[t])}" for t in tasks] + ["Δm (%) ↑"]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    if all(t in baselines for t in tasks):
        row = [_fmt(baselines[t].get(keys[t], math.nan)) for t in tasks]
        lines.append("| single-task baselines | " + " | ".join(row) + " | 0.00 |")
    dm = metrics.get(f"val/{DELTA_M_KEY}")
    row = [_fmt(values[t].get(keys[t], math.nan)) for t in tasks] + ["n/a" if dm is None else f"{dm:+.2f}"]
    lines.append(f"| {name} | " + " | ".join(row) + " |")
    if dm is None:
        lines += ["", "Δm: no single-task baselines for every task (see `experiment=single_task`)."]
    else:
        lines += ["", f"Δm convention: {convention}."]
    lines += ["", f"Evaluation protocol: `{protocol}` (README: Evaluation protocols)."]
    lines += ["", "| task | metric | value |", "|---|---|---|"]
    for t in tasks:
        lines += [f"| {t} | {k} {arrow(t, k)} | {_fmt(v)} |" for k, v in values[t].items()]
    classes = [k for k in metrics if "/IoU/" in k]
    if classes:
        lines += ["", "| per-class IoU | value |", "|---|---|"]
        lines += [f"| {k.split('/', 1)[1]} | {_fmt(metrics[k])} |" for k in classes]
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def print_metric_table(
    metrics: Mapping[str, float], tasks: Sequence[str], *, title: str = "validation", protocol: str = DEFAULT_PROTOCOL
) -> None:
    Console().print(metric_table(metrics, tasks, title=title, protocol=protocol))


def write_json(path: str | os.PathLike, values: Mapping[str, float]) -> Path:
    """Write a flat dict as JSON atomically (temp file + rename)."""
    return atomic_write_text(path, json.dumps(dict(values), indent=2, sort_keys=True) + "\n")
