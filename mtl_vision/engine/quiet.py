"""Start-up noise that says nothing about the run, silenced once, each for a stated reason."""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(f in message for f in self.fragments)


_FILTER = _DropMessages(
    # an advertisement for a cloud logger, printed by every Trainer
    "try installing [litlogger]",
)


def quiet_lightning() -> None:
    """Silence Lightning's notices that are wrong or irrelevant for mtl_vision runs (idempotent)."""
    root = logging.getLogger()
    if root.handlers:
        # Hydra's logging is set up (console and train.log); Lightning's own console handler on the
        # `lightning` logger would print each of its messages a second time
        package = logging.getLogger("lightning")
        for handler in list(package.handlers):
            if type(handler) is logging.StreamHandler:
                package.removeHandler(handler)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
    # Lightning's own pytree helper uses a torch API that torch deprecates; nothing for a user to do
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    # the validation metrics are logged with sync_dist=False on purpose: torchmetrics has already
    # reduced their summed states over all processes, so every rank logs the split-level value
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self\.log\('val/.*sync_dist=True")
