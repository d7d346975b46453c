"""What the InvPT-family codebases (InvPT, TaskPrompter: prismformore/Multi-Task-Transformer;
MLoRE: YuqiYang213/MLoRE) share in their checkpoints: task names and the order in which their
`utils/config.py` appends the tasks, which indexes their per-task modules."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor

from mtl_vision.engine.weights import some_keys

AUTHORS_TASK_ORDER = ("semseg", "depth", "human_parts", "sal", "normals", "edge")
TASK_NAMES = {"sal": "saliency"}  # theirs -> ours
# where our Backbone keeps the timm ViT: its feature wrapper holds the model as `.model`
VIT = "backbone.model.model."

Rule = tuple[re.Pattern, Callable[[re.Match], str]]


def ours(task: str) -> str:
    """Our name of one of their tasks."""
    return TASK_NAMES.get(task, task)


def authors_tasks(state: dict[str, Tensor], prefix: str = "heads.") -> list[str]:
    """The authors' task list (their names, their order), read from the task heads' keys."""
    found = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    unknown = sorted(found - set(AUTHORS_TASK_ORDER))
    if unknown or not found:
        raise ValueError(
            f"the checkpoint's task heads {sorted(found)} are not tasks of the authors' code {list(AUTHORS_TASK_ORDER)}"
        )
    return [t for t in AUTHORS_TASK_ORDER if t in found]


def check_task_set(theirs: Sequence[str], tasks: Sequence[str] | None) -> list[str]:
    """Our names of their tasks, in their order; the configured `tasks` must be the same set."""
    named = [ours(t) for t in theirs]
    if tasks is not None and sorted(named) != sorted(tasks):
        raise ValueError(f"the checkpoint was trained on tasks {named}; the configured model has {list(tasks)}")
    return named


def rename_keys(
    state: dict[str, Tensor], rules: Iterable[Rule], *, unused: Iterable[re.Pattern] = (), what: str
) -> dict[str, Tensor]:
    """Every key renamed by the first rule that matches it whole; keys matching `unused` dropped;
    any other key is an error naming it (`what`: the codebase, for the message)."""
    rules, unused = list(rules), list(unused)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        if any(p.match(key) for p in unused):
            continue
        for pattern, rename in rules:
            match = pattern.fullmatch(key)
            if match:
                out[rename(match)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys of no {what} module (not a {what} checkpoint?): {some_keys(unknown)}")
    return out
