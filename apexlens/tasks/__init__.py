"""Tasks: clean/corrupted batches with answer and wrong tokens for the shipped models and GPT-2."""

from apexlens.tasks.base import Task, TaskBatch

__all__ = ["Task", "TaskBatch"]
