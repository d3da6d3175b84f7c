"""Task-aware answer comparison: ``is_correct("capital", "Paris.", "Paris") -> True``."""

from __future__ import annotations

from lora_retriever.tasks.base import Task
from lora_retriever.tasks.registry import get_task

__all__ = ["is_correct", "normalize_answer"]


def normalize_answer(task: str | Task, text: str) -> str:
    """The comparison form of an answer to ``task`` (rule: :func:`lora_retriever.tasks.base.normalize_text`:
    case, surrounding quotes/markdown, a trailing period, an ``Answer:`` label and later lines don't count;
    accents, extra words and full sentences do)."""
    return get_task(task).normalize(text)


def is_correct(task: str | Task, prediction: str, reference: str) -> bool:
    """Exact match after :func:`normalize_answer`; an empty reference matches nothing."""
    task = get_task(task)
    expected = task.normalize(reference)
    return bool(expected) and task.normalize(prediction) == expected
