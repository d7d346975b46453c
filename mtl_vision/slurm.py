"""The Slurm job a process runs in, from the environment Slurm sets (no Slurm tools needed)."""

from __future__ import annotations

import os


def slurm_job_id() -> str | None:
    """`<array job>_<task>` in a Slurm array task, else `SLURM_JOB_ID`; None outside Slurm. The id
    `scontrol requeue` takes, and which a requeued job keeps."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None
