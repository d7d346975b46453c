"""The errors `mtl-train`, `mtl-eval` and `mtl-predict` answer with one line (the traceback goes
to the run's log file; `HYDRA_FULL_ERROR=1` prints it)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TrainingStopped(RuntimeError):
    """A run stopped for a reason it states in its message (e.g. too many non-finite steps)."""


# the project's own checks raise these with a message that names the key, file or value
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError, TypeError, TrainingStopped)


def closest(value: str, choices: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The choice most like `value` (for "did you mean"), or None when none is close enough."""
    close = difflib.get_close_matches(str(value), list(choices), n=1, cutoff=cutoff)
    return close[0] if close else None
