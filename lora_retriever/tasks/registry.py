"""The task registry: ``TASK_NAMES`` and ``get_task(name)``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lora_retriever.tasks.arithmetic import ArithmeticTask
from lora_retriever.tasks.base import Task
from lora_retriever.tasks.geography import CapitalTask, ContinentTask, CurrencyTask
from lora_retriever.tasks.language import FrenchCountryTask, LanguageIdTask
from lora_retriever.tasks.sentiment import SentimentTask

__all__ = ["TASKS", "TASK_NAMES", "get_task"]

TASKS: Mapping[str, type[Task]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            ArithmeticTask,
            CapitalTask,
            ContinentTask,
            CurrencyTask,
            FrenchCountryTask,
            SentimentTask,
            LanguageIdTask,
        )
    }
)
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | Task) -> Task:
    """The task called ``task`` (a :class:`Task` instance is returned as it is).

    Raises:
        ValueError: no task of that name (the message lists the known ones).
    """
    if isinstance(task, Task):
        return task
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASK_NAMES)}")
    return TASKS[task]()
