"""Task-conditioned backbones: modules inside a backbone that behave differently per task.

Sparse MoE layers with one router per task (M3ViT, Mod-Squad) and task-specific low-rank adapters
(MTLoRA) make the backbone's features depend on the task. Such modules subclass
`TaskConditioned` and read the task being computed with `current_task()`. When a backbone holds
any of them, `Backbone.forward` runs once per task inside `task_scope(task)` and returns
`{task: [feature maps]}` instead of one list, and `MultiTaskModel` decodes each task from its
own features (as M3ViT does: one backbone pass per task).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from torch import nn

__all__ = ["TaskConditioned", "current_task", "task_scope"]

_CURRENT: ContextVar[str | None] = ContextVar("mtl_vision_current_task", default=None)


class TaskConditioned(nn.Module):
    """Marker base class of modules whose forward depends on `current_task()`."""


@contextlib.contextmanager
def task_scope(task: str) -> Iterator[None]:
    """Within this block, `current_task()` is `task`."""
    token = _CURRENT.set(task)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current_task() -> str:
    """The task being computed; raises outside `task_scope`."""
    task = _CURRENT.get()
    if task is None:
        raise RuntimeError("a task-conditioned module ran outside task_scope(task); Backbone.forward sets it")
    return task
