"""Training history that survives resumes and the reuse of a run directory.

Lightning's CSV logger deletes `metrics.csv` whenever its folder is not empty, so every resume
lost the history logged before it. `HistoryCSVLogger` continues the file instead: resumed from a
checkpoint of step `g`, it keeps the rows of steps before `g` (the resumed run logs the later ones
again, as the run straight through logged them) and appends; started afresh in a folder that holds
an earlier run's file, it moves that file aside to `metrics.<n>.csv` rather than deleting it.
TensorBoard's writer gets `purge_step=g`, which hides the events after the checkpoint.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


def set_aside(path: Path) -> Path:
    """Rename `<stem>.csv` to the first free `<stem>.<n>.csv`; returns the new path."""
    n = 1
    while (target := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    os.replace(path, target)
    return target


def keep_rows_before(path: Path, step: int) -> list[str]:
    """Drop the rows of `step` and later from a Lightning metrics CSV; returns its header."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [r for r in reader if r.get("step") not in (None, "") and int(float(r["step"])) < step]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return header


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing metrics file (see the module docstring)."""

    def __init__(self, log_dir: str, resume_step: int | None) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resume_step is None:
            set_aside(path)
        else:
            self.metrics_keys = sorted(keep_rows_before(path, self.resume_step))


class HistoryCSVLogger(CSVLogger):
    """`CSVLogger` that continues `metrics.csv` on resume (call `continue_from` before logging)."""

    resume_step: int | None = None

    def continue_from(self, step: int | None) -> None:
        """`step`: the global step of the checkpoint the run resumes from; None for a fresh start."""
        if self._experiment is not None:
            raise RuntimeError("HistoryCSVLogger.continue_from must be called before anything is logged")
        self.resume_step = step

    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir, resume_step=self.resume_step)
        return self._experiment


def continue_history(loggers: list[Logger], step: int | None) -> None:
    """Point the run's loggers at the checkpoint step it resumes from (None: a fresh start)."""
    for logger in loggers:
        if isinstance(logger, HistoryCSVLogger):
            logger.continue_from(step)
        elif isinstance(logger, TensorBoardLogger) and step is not None and logger._experiment is None:
            logger._kwargs["purge_step"] = step
