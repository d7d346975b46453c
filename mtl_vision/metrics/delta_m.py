"""The multi-task delta Δm against single-task baselines, and the baselines files it reads.

    Δm = (1/T) Σ_t (−1)^{l_t} (M_t − B_t) / B_t · 100      (Maninis et al., ASTMT / MTI-Net)

with M_t the multi-task model's metric of task t, B_t the single-task model's, l_t = 1 when lower
is better. Positive Δm means the multi-task model is better on average.

Three conventions:

* ``mtinet`` (default): one metric per task, its primary (semseg/human_parts mIoU, depth rmse,
  normals mean angle, saliency maxF, edge odsF), as in the tables of MTI-Net, ATRC, InvPT and
  TaskExpert. Edge uses the exact ``odsF`` when both sides have it, else ``odsF_approx`` on both.
  The saliency primary follows the evaluation protocol (``protocols.py``): ``maxF`` under
  ``atrc``, ``maxF_sigmoid_prob`` under ``invpt``, ``max_mIoU_per_image`` (MTI-Net's saliency
  mIoU, which its own Δm uses) under ``mtinet``; both sides must have been scored with it.
* ``libmtl``: LibMTL's mean over every metric of a task (each with its own direction), then over
  tasks. Per-class IoUs and losses are left out.
* ``pooled``: the mean over every metric of every task at once, so a task counts by its number of
  metrics (Nash-MTL, FAMO, CAGrad: ``delta_fn`` of nash-mtl/FAMO ``experiments/nyuv2/utils.py``
  over 2 + 2 + 5 NYUv2 metrics; their tables print it with the other sign, lower = better).

A baselines file is YAML, one per dataset and backbone (``baselines/<data.name>/<backbone>.yaml``
by default), written by ``mtl-train experiment=single_task data.tasks=[<task>]``::

    dataset: nyud
    backbone: resnet18
    tasks:
      depth:
        metrics: {rmse: 0.61, abs_rel: 0.16, log_rmse: 0.21, delta1: 75.2}
        run: logs/single_task/runs/2026-11-23_10-00-00
        updated: "2026-11-23T10:31:02"

Updates are merged under a file lock and written atomically, so the runs of a sweep over tasks
can write into one file at the same time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import yaml

from mtl_vision.fileio import atomic_write_text
from mtl_vision.metrics.protocols import DEFAULT_PROTOCOL, check_protocol, protocol_primary
from mtl_vision.tasks import get_task

log = logging.getLogger(__name__)

CONVENTIONS = ("mtinet", "libmtl", "pooled")
KEY = "delta_m"

__all__ = [
    "CONVENTIONS",
    "DeltaM",
    "delta_m",
    "load_baselines",
    "task_metrics",
    "update_baselines",
]


def task_metrics(results: Mapping[str, float], task: str, prefix: str = "val") -> dict[str, float]:
    """``{metric: value}`` of one task from a flat ``{"<prefix>/<task>/<metric>": value}`` dict,
    without the loss and the per-class entries (keys with a further ``/``)."""
    head = f"{prefix}/{task}/"
    out = {}
    for key, value in results.items():
        if key.startswith(head):
            name = key[len(head) :]
            if "/" not in name and name != "loss":
                out[name] = float(value)
    return out


def _term(task: str, key: str, value: float, base: float) -> float:
    if base == 0 or not math.isfinite(base):
        raise ValueError(f"single-task baseline of {task}/{key} is {base}; Δm divides by it")
    sign = -1.0 if key in get_task(task).lower_is_better_keys else 1.0
    return sign * (value - base) / base * 100.0


def _task_keys(task: str, common: set[str], convention: str, protocol: str = DEFAULT_PROTOCOL) -> list[str]:
    spec = get_task(task)
    if convention == "mtinet":
        override = protocol_primary(task, protocol)
        key = (override if override in common else None) if override else spec.primary_in(common)
        return [key] if key is not None else []
    keys = sorted(common)
    if spec.primary in common and spec.proxy in common:
        keys.remove(spec.proxy)  # the exact metric and its estimate are one metric, counted once
    return keys


def delta_m(
    results: Mapping[str, float],
    baselines: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    *,
    convention: str = "mtinet",
    protocol: str = DEFAULT_PROTOCOL,
    prefix: str = "val",
) -> float:
    """Δm in percent of ``results`` (flat ``<prefix>/<task>/<metric>`` dict) against
    ``baselines`` (``{task: {metric: value}}``) over ``tasks``; ``protocol`` (the evaluation
    protocol both were scored with) chooses the primary metric where the papers differ.

    Raises:
        ValueError: unknown convention, or a task without a baseline or without a metric that
            both sides have (a Δm over fewer tasks than the model has would not be comparable).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"delta_m convention must be one of {CONVENTIONS}, got {convention!r}")
    protocol = check_protocol(protocol)
    if not tasks:
        raise ValueError("delta_m needs at least one task")
    per_task, terms = [], []
    for task in tasks:
        if task not in baselines:
            raise ValueError(f"no single-task baseline for task {task!r} (baselines have {sorted(baselines)})")
        ours = task_metrics(results, task, prefix)
        base = baselines[task]
        keys = _task_keys(task, set(ours) & set(base), convention, protocol)
        if not keys:
            wanted = protocol_primary(task, protocol) if convention == "mtinet" else None
            need = f" (its primary under eval.protocol={protocol} is {wanted!r})" if wanted else ""
            raise ValueError(
                f"task {task!r}: no metric both in the results {sorted(ours)} and in the baseline {sorted(base)}{need}"
            )
        own = [_term(task, k, ours[k], float(base[k])) for k in keys]
        terms += own
        per_task.append(sum(own) / len(own))
    return sum(terms) / len(terms) if convention == "pooled" else sum(per_task) / len(per_task)


def load_baselines(path: str | os.PathLike, protocol: str | None = None) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from a baselines file; {} when the file does not exist. With
    ``protocol``, only the tasks scored under that evaluation protocol (an entry without one was
    written before protocols existed, by ATRC's metrics)."""
    path = Path(path)
    if not path.is_file():
        return {}
    data = _read(path)
    return {
        task: {k: float(v) for k, v in entry["metrics"].items()}
        for task, entry in data["tasks"].items()
        if protocol is None or entry.get("protocol", DEFAULT_PROTOCOL) == protocol
    }


def baseline_protocols(path: str | os.PathLike) -> dict[str, str]:
    """``{task: evaluation protocol}`` of a baselines file's entries."""
    path = Path(path)
    if not path.is_file():
        return {}
    return {task: str(entry.get("protocol", DEFAULT_PROTOCOL)) for task, entry in _read(path)["tasks"].items()}


def _read(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({err})") from None
    tasks = data.get("tasks", {}) if isinstance(data, dict) else None
    if not isinstance(tasks, dict):
        raise ValueError(f"{path}: expected a mapping with a 'tasks' mapping of {{task: {{metrics: {{...}}}}}}")
    for task, entry in tasks.items():
        get_task(task)
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
            raise ValueError(f"{path}: tasks.{task}.metrics must map metric names to numbers, got {metrics!r}")
    return data


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def update_baselines(
    path: str | os.PathLike,
    task: str,
    metrics: Mapping[str, float],
    *,
    dataset: str | None = None,
    backbone: str | None = None,
    run: str | None = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> Path:
    """Merge one task's single-task metrics into the baselines file (metrics already stored for
    the task and absent from ``metrics`` are kept, e.g. an exact odsF from ``mtl-eval``). The
    entry records the evaluation protocol; metrics of another protocol are refused, since some
    keys (the normals' under ``mtinet``) mean something else under each."""
    get_task(task)
    protocol = check_protocol(protocol)
    if not metrics:
        raise ValueError(f"no metrics to write for task {task!r} into {path}")
    path = Path(path)
    with _locked(path):
        data = _read(path) if path.is_file() else {}
        for key, value in (("dataset", dataset), ("backbone", backbone)):
            if value is not None:
                if data.get(key) not in (None, value):
                    raise ValueError(f"{path} holds baselines of {key} {data[key]!r}, not {value!r}")
                data[key] = value
        tasks = data.setdefault("tasks", {})
        entry = tasks.setdefault(task, {})
        if entry.get("metrics") and entry.get("protocol", DEFAULT_PROTOCOL) != protocol:
            raise ValueError(
                f"{path}: the {task} baseline was scored with eval.protocol={entry.get('protocol', DEFAULT_PROTOCOL)}, "
                f"these metrics with {protocol}; write them to another file (delta_m.baselines=...)"
            )
        entry["protocol"] = protocol
        merged = dict(entry.get("metrics", {}))
        merged.update({k: float(v) for k, v in metrics.items()})
        entry["metrics"] = merged
        if run is not None:
            entry["run"] = str(run)
        entry["updated"] = dt.datetime.now().isoformat(timespec="seconds")
        header = "# Single-task baselines for the multi-task delta (see mtl_vision/metrics/delta_m.py).\n"
        atomic_write_text(path, header + yaml.safe_dump(data, sort_keys=False))
    return path


class DeltaM:
    """Δm against one baselines file, as configured in ``conf/train.yaml`` (``delta_m:``).

    Args:
        baselines: path of the baselines YAML; a missing file means no Δm (nothing is logged).
        convention: ``mtinet`` (primary metric per task), ``libmtl`` (mean over all metrics of each
            task, then over tasks) or ``pooled`` (mean over all metrics of all tasks).
        protocol: the evaluation protocol (``eval.protocol``) of the results and the baselines;
            it chooses the saliency primary under ``mtinet``.
    """

    def __init__(
        self, baselines: str | os.PathLike | None, convention: str = "mtinet", protocol: str = DEFAULT_PROTOCOL
    ) -> None:
        if convention not in CONVENTIONS:
            raise ValueError(f"delta_m.convention must be one of {CONVENTIONS}, got {convention!r}")
        self.path = Path(baselines) if baselines else None
        self.convention = convention
        self.protocol = check_protocol(protocol)
        self.baselines = load_baselines(self.path, self.protocol) if self.path is not None else {}
        if self.path is not None:
            other = {t: p for t, p in baseline_protocols(self.path).items() if p != self.protocol}
            if other:
                log.warning(
                    "baselines in %s scored with another evaluation protocol than eval.protocol=%s are left out "
                    "of val/delta_m: %s", self.path, self.protocol, other,
                )
        self._warned: set[str] = set()

    def covers(self, tasks: Sequence[str]) -> bool:
        """True when every task has a baseline."""
        return bool(self.baselines) and all(t in self.baselines for t in tasks)

    def __call__(self, results: Mapping[str, float], tasks: Sequence[str], prefix: str = "val") -> float | None:
        """Δm in percent, or None when some task has no baseline or no comparable metric."""
        if not self.covers(tasks):
            return None
        try:
            return delta_m(
                results, self.baselines, tasks, convention=self.convention, protocol=self.protocol, prefix=prefix
            )
        except ValueError as err:
            if str(err) not in self._warned:
                self._warned.add(str(err))
                log.warning("no val/delta_m against %s: %s", self.path, err)
            return None
