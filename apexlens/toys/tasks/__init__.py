"""Tasks: clean/corrupted batches with answer and wrong tokens for the shipped models and GPT-2.

``get_task(name)`` returns a task object (see :mod:`apexlens.toys.tasks.base`); the shipped toy
models name theirs in :func:`apexlens.toys.models.model_info` (``info["task"]``).
"""

from __future__ import annotations

from typing import Any

from apexlens.errors import ApexlensError
from apexlens.toys.tasks.base import Task, TaskBatch
from apexlens.toys.tasks.toy import BackdoorTask, InductionTask, ModAddTask

TASKS: dict[str, Any] = {
    "induction": InductionTask,
    "modadd": ModAddTask,
    "backdoor": BackdoorTask,
}


def get_task(name: str, **kwargs: Any) -> Any:
    """The task called ``name`` (``"induction"``, ``"modadd"``, ``"backdoor"``, ``"ioi"``)."""
    if name == "ioi":
        from apexlens.toys.tasks.ioi import IOITask

        return IOITask(**kwargs)
    if name not in TASKS:
        raise ApexlensError(f"unknown task {name!r}; known: {', '.join([*TASKS, 'ioi'])}")
    return TASKS[name](**kwargs)


__all__ = [
    "Task",
    "TaskBatch",
    "get_task",
    "InductionTask",
    "ModAddTask",
    "BackdoorTask",
    "TASKS",
]
