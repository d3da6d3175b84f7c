"""Task-aware answer comparison: ``is_correct("capital", "Paris.", "Paris") -> True``."""

from __future__ import annotations

from lora_retriever.metrics import exact_match
from lora_retriever.tasks.base import Task
from lora_retriever.tasks.registry import get_task

__all__ = ["answer_score", "is_correct"]


def is_correct(task: str | Task, prediction: str, reference: str) -> bool:
    """``lora_retriever.metrics.exact_match`` with the task's normalisation (every task of the suite uses the
    project's one rule, ``normalize_answer``); an empty reference matches nothing. A multimodal task
    (``lora_retriever.tasks.multimodal``) is scored by its own ``is_correct`` (``TAP(n)`` tasks:
    ``action_match``)."""
    from lora_retriever.tasks.multimodal import MULTIMODAL_TASKS, ImageTask, get_multimodal_task

    if isinstance(task, ImageTask) or (isinstance(task, str) and task in MULTIMODAL_TASKS):
        return get_multimodal_task(task).is_correct(prediction, reference)
    return bool(exact_match(prediction, reference, normalize=get_task(task).normalize))


def answer_score(task: str | None, prediction: str, reference: str) -> float:
    """Exact match as the CLI reports it: the task's own rule (``is_correct``) for a task of the offline
    suites, the project's one rule (``lora_retriever.metrics.exact_match``) for any other task."""
    from lora_retriever.tasks.multimodal import MULTIMODAL_TASKS
    from lora_retriever.tasks.registry import TASK_NAMES

    if task in TASK_NAMES or task in MULTIMODAL_TASKS:
        return float(is_correct(task, prediction, reference))
    return exact_match(prediction, reference)
