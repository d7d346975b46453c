"""The errors `mtl-train`, `mtl-eval` and `mtl-predict` answer with one line (the traceback goes
to the run's log file; `HYDRA_FULL_ERROR=1` prints it)."""

from __future__ import annotations


class TrainingStopped(RuntimeError):
    """A run stopped for a reason it states in its message (e.g. too many non-finite steps)."""


# the project's own checks raise these with a message that names the key, file or value
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, TypeError, TrainingStopped)
