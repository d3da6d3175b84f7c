"""The task registry: ``TASK_NAMES`` (every text task), ``DEMO_TASK_NAMES`` (the seven of ``make demo``),
``CLUSTERS`` (related tasks, grouped) and ``get_task(name)``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lora_retriever.tasks.arithmetic import ArithmeticTask, DifferenceTask, ProductTask
from lora_retriever.tasks.base import Task
from lora_retriever.tasks.geography import (
    CallingCodeTask,
    CapitalCountryTask,
    CapitalTask,
    ContinentTask,
    CurrencyTask,
    FrenchCapitalTask,
    Iso3Task,
)
from lora_retriever.tasks.language import (
    CountryFromFrenchTask,
    FrenchCountryTask,
    FrenchLanguageTask,
    GermanCountryTask,
    LanguageCodeTask,
    LanguageIdTask,
    SpanishCountryTask,
)
from lora_retriever.tasks.sentiment import PositiveWordTask, SentenceSentimentTask, SentimentTask

__all__ = ["CLUSTERS", "DEMO_TASK_NAMES", "TASKS", "TASK_NAMES", "get_task"]

TASKS: Mapping[str, type[Task]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            # the seven tasks of `make demo`, in its order (its mixed test set is shuffled in this order)
            ArithmeticTask,
            CapitalTask,
            ContinentTask,
            CurrencyTask,
            FrenchCountryTask,
            SentimentTask,
            LanguageIdTask,
            # the rest of the full pool: each one related to some of the above
            DifferenceTask,
            ProductTask,
            CapitalCountryTask,
            FrenchCapitalTask,
            Iso3Task,
            CallingCodeTask,
            GermanCountryTask,
            SpanishCountryTask,
            CountryFromFrenchTask,
            LanguageCodeTask,
            FrenchLanguageTask,
            SentenceSentimentTask,
            PositiveWordTask,
        )
    }
)
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
DEMO_TASK_NAMES: tuple[str, ...] = TASK_NAMES[:7]
CLUSTERS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        cluster: tuple(name for name, cls in TASKS.items() if cls.cluster == cluster)
        for cluster in dict.fromkeys(cls.cluster for cls in TASKS.values())
    }
)


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
