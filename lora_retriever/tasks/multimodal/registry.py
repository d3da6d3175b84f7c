"""The image domains and image tasks by name: ``DOMAIN_NAMES`` / ``get_domain``, ``MULTIMODAL_TASK_NAMES`` /
``get_multimodal_task``, and the task ``CATEGORIES``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TypeVar

from lora_retriever.tasks.multimodal import tasks as _tasks
from lora_retriever.tasks.multimodal.domains import DigitsDomain, ImageDomain, PhotoDomain
from lora_retriever.tasks.multimodal.screens import (
    CalendarDomain,
    ClockDomain,
    CounterDomain,
    MapDomain,
    ShopDomain,
)
from lora_retriever.tasks.multimodal.tasks import ImageTask

__all__ = [
    "CATEGORIES",
    "DOMAINS",
    "DOMAIN_NAMES",
    "MULTIMODAL_TASKS",
    "MULTIMODAL_TASK_NAMES",
    "get_domain",
    "get_multimodal_task",
]

DOMAINS: Mapping[str, type[ImageDomain]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            DigitsDomain,
            PhotoDomain,
            ClockDomain,
            CalendarDomain,
            ShopDomain,
            CounterDomain,
            MapDomain,
        )
    }
)
DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS)

MULTIMODAL_TASKS: Mapping[str, type[ImageTask]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            _tasks.DigitValueTask,
            _tasks.CounterValueTask,
            _tasks.ClockHourTask,
            _tasks.CalendarDayTask,
            _tasks.DigitParityTask,
            _tasks.CounterParityTask,
            _tasks.ShopTapTask,
            _tasks.CalendarTapTask,
            _tasks.MapTapTask,
            _tasks.PhotoSourceTask,
            _tasks.PhotoBrightnessTask,
        )
    }
)
MULTIMODAL_TASK_NAMES: tuple[str, ...] = tuple(MULTIMODAL_TASKS)
CATEGORIES: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        category: tuple(name for name, cls in MULTIMODAL_TASKS.items() if cls.category == category)
        for category in dict.fromkeys(cls.category for cls in MULTIMODAL_TASKS.values())
    }
)
"""Category name -> its tasks, in registry order."""

_T = TypeVar("_T")


def _resolve(registry: Mapping[str, type[_T]], value: str | _T, base: type[_T], kind: str) -> _T:
    if isinstance(value, base):
        return value
    if value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; known: {', '.join(registry)}")
    return registry[value]()


def get_domain(domain: str | ImageDomain) -> ImageDomain:
    """The domain called ``domain`` (an :class:`ImageDomain` is returned as it is).

    Raises:
        ValueError: no domain of that name (the message lists the known ones).
    """
    return _resolve(DOMAINS, domain, ImageDomain, "image domain")


def get_multimodal_task(task: str | ImageTask) -> ImageTask:
    """The image task called ``task`` (an :class:`ImageTask` is returned as it is).

    Raises:
        ValueError: no image task of that name (the message lists the known ones).
    """
    return _resolve(MULTIMODAL_TASKS, task, ImageTask, "multimodal task")
