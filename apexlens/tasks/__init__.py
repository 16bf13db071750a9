"""Tasks: clean/corrupted batches with answer and wrong tokens for the shipped models and GPT-2.

``get_task(name)`` returns a task object (see :mod:`apexlens.tasks.base`); the shipped toy
models name theirs in :func:`apexlens.models.model_info` (``info["task"]``).
"""

from __future__ import annotations

from typing import Any

from apexlens.backend import ApexlensError
from apexlens.tasks.base import Task, TaskBatch
from apexlens.tasks.toy import BackdoorTask, InductionTask, ModAddTask

TASKS: dict[str, Any] = {
    "induction": InductionTask,
    "modadd": ModAddTask,
    "backdoor": BackdoorTask,
}


def check_task_fits(task: Any, model: Any, model_name: str | None = None) -> None:
    """Refuse, in one line, a task whose prompts mean nothing to the model.

    * a shipped toy model (``model_name``) only fits the task it was trained on
      (``model_info(name)["task"]``);
    * the task's vocabulary (``task.d_vocab``, or its tokenizer's size) must equal the
      model's ``cfg.d_vocab``, and its sequences (``task.seq_len``) must fit ``cfg.n_ctx``.

    ``model`` may be ``None`` to check only the declared task of ``model_name``.
    """
    from apexlens.models import list_models, model_info

    if model_name is not None and model_name in list_models():
        trained = model_info(model_name)["task"]
        if task.name != trained:
            raise ApexlensError(
                f"model {model_name!r} was trained on the {trained!r} task; the {task.name!r} "
                f"task does not fit it (its tokens mean nothing to it): use --task {trained}"
            )
    if model is None:
        return
    who = repr(model_name) if model_name else "the model"
    cfg = model.cfg
    vocab = getattr(task, "d_vocab", None)
    tokenizer = getattr(task, "tokenizer", None)
    if vocab is None and tokenizer is not None:
        vocab = len(tokenizer)
    d_vocab = getattr(cfg, "d_vocab", None)
    if vocab is not None and d_vocab is not None and int(vocab) != int(d_vocab):
        raise ApexlensError(
            f"the {task.name!r} task uses a vocabulary of {vocab} tokens but {who} has "
            f"{d_vocab} (d_vocab): the task does not fit this model"
        )
    seq_len = getattr(task, "seq_len", None)
    n_ctx = getattr(cfg, "n_ctx", None)
    if seq_len is not None and n_ctx is not None and int(seq_len) > int(n_ctx):
        raise ApexlensError(
            f"the {task.name!r} task's prompts have {seq_len} tokens but {who} takes at most "
            f"{n_ctx} (n_ctx): the task does not fit this model"
        )


def get_task(name: str, **kwargs: Any) -> Any:
    """The task called ``name`` (``"induction"``, ``"modadd"``, ``"backdoor"``, ``"ioi"``)."""
    if name == "ioi":
        from apexlens.tasks.ioi import IOITask

        return IOITask(**kwargs)
    if name not in TASKS:
        raise ApexlensError(f"unknown task {name!r}; known: {', '.join([*TASKS, 'ioi'])}")
    return TASKS[name](**kwargs)


__all__ = [
    "Task",
    "TaskBatch",
    "get_task",
    "check_task_fits",
    "InductionTask",
    "ModAddTask",
    "BackdoorTask",
    "TASKS",
]
