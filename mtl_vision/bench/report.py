"""What a benchmark returns and how it is shown: a titled table of rows, written as JSON on request."""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["Result", "environment", "format_table", "write_json"]


@dataclass
class Result:
    """One benchmark's outcome: `rows` (one dict per measured setting, the same keys in each, shown
    as table columns in key order), the `settings` it ran with, and `notes` printed under the table."""

    title: str
    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "settings": self.settings, "rows": self.rows, "notes": self.notes,
                "environment": environment()}


def environment() -> dict[str, Any]:
    """Where a number was measured: versions, threads, CPU count and the accelerator."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
    }
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name()
    return env


def _cell(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if magnitude and (magnitude >= 1e5 or magnitude < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if magnitude < 10 else f"{value:.1f}"
    return str(value)


def format_table(result: Result) -> str:
    """The rows as a Markdown table (columns: the keys of all rows, in first-seen order)."""
    columns: list[str] = []
    for row in result.rows:
        columns.extend(k for k in row if k not in columns)
    lines = [f"## {result.title}", ""]
    if result.settings:
        lines.append(", ".join(f"{k}={v}" for k, v in result.settings.items()))
        lines.append("")
    if columns:
        cells = [[_cell(row.get(c, "")) for c in columns] for row in result.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |")
        lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        lines.extend("| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells)
    lines.extend(["", *result.notes] if result.notes else [])
    return "\n".join(lines)


def write_json(result: Result, path: Path) -> None:
    """Write `result` to `path` as JSON, atomically (a partial file never replaces a good one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    tmp.replace(path)
