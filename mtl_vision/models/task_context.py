"""Task-conditioned backbones: modules inside a backbone that behave differently per task.

Sparse MoE layers with one router per task (M3ViT, Mod-Squad) and task-specific low-rank adapters
(MTLoRA) make the backbone's features depend on the task. Such modules subclass
`TaskConditioned` and read the task being computed with `current_task()`. When a backbone holds
any of them, `Backbone.forward` returns `{task: [feature maps]}` instead of one list, and
`MultiTaskModel` decodes each task from its own features (as M3ViT does).

Two ways to compute them (`Backbone(task_passes=...)`):

* one pass with the tasks stacked in the batch (the default, for a timm ViT whose task-conditioned
  modules all sit in its blocks and declare `stacks_tasks = True`, as MoE layers do): the layers
  before the first task-conditioned block (and that block's attention, when only its MLP is
  task-conditioned) run once, then the tokens are repeated once per task, and from there on the
  batch holds the tasks one after the other (`(tasks * N, ...)`, rows `[t * N, (t + 1) * N)`
  belong to `tasks[t]`). Inside `stacked_task_scope(tasks)` a task-conditioned module reads
  `current_tasks()` and computes each chunk for its task (a task-routed MoE layer routes every
  chunk with its task's router in one dispatch); everything else sees an ordinary, bigger batch.
  Only per-sample layers may follow (transformer blocks: LayerNorm, attention, MLP); a BatchNorm
  would mix the tasks' statistics.
* one full backbone pass per task inside `task_scope(task)` (the reference, and what modules that
  cannot handle a stacked batch get).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import ClassVar

from torch import nn

__all__ = ["TaskConditioned", "current_task", "current_tasks", "stacked_task_scope", "task_scope"]

_CURRENT: ContextVar[str | None] = ContextVar("mtl_vision_current_task", default=None)
_STACKED: ContextVar[tuple[str, ...] | None] = ContextVar("mtl_vision_stacked_tasks", default=None)


class TaskConditioned(nn.Module):
    """Marker base class of modules whose forward depends on `current_task()`.

    `stacks_tasks = True` declares that the forward also handles a task-stacked batch inside
    `stacked_task_scope(tasks)` (see the module docstring), reading the tasks with `current_tasks()`.
    """

    stacks_tasks: ClassVar[bool] = False


@contextlib.contextmanager
def task_scope(task: str) -> Iterator[None]:
    """Within this block, `current_task()` is `task`."""
    token = _CURRENT.set(task)
    stacked = _STACKED.set(None)
    try:
        yield
    finally:
        _STACKED.reset(stacked)
        _CURRENT.reset(token)


@contextlib.contextmanager
def stacked_task_scope(tasks: Sequence[str]) -> Iterator[None]:
    """Within this block, task-conditioned modules receive batches of `len(tasks)` equal consecutive
    chunks, chunk t computed for `tasks[t]` (`current_tasks()`)."""
    if not tasks:
        raise ValueError("stacked_task_scope needs at least one task")
    token = _STACKED.set(tuple(tasks))
    current = _CURRENT.set(None)
    try:
        yield
    finally:
        _CURRENT.reset(current)
        _STACKED.reset(token)


def current_tasks() -> tuple[str, ...] | None:
    """The stacked tasks inside `stacked_task_scope`, else None."""
    return _STACKED.get()


def current_task() -> str:
    """The task being computed; raises outside `task_scope` (and on a task-stacked batch)."""
    task = _CURRENT.get()
    if task is None:
        if _STACKED.get() is not None:
            raise RuntimeError(
                "a task-conditioned module without `stacks_tasks = True` ran on a task-stacked batch "
                "(stacked_task_scope); Backbone(task_passes='per_task') runs one pass per task instead"
            )
        raise RuntimeError("a task-conditioned module ran outside task_scope(task); Backbone.forward sets it")
    return task
