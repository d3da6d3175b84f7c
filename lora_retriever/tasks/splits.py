"""Seeded train / key-sample / test splits of a task, disjoint by subject.

The facts of a task are shuffled once per seed; the test subjects come first, then the key samples, then
the training items, so the test set of a seed does not change with ``n_train``. ``test_alt`` asks about the
same subjects as ``test`` (same order, same answers) in the task's alternative wordings.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

from lora_retriever.tasks.base import Task
from lora_retriever.tasks.registry import get_task
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "DEFAULT_N_KEYS",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "SPLIT_NAMES",
    "TaskRecord",
    "TaskSplits",
    "build_splits",
    "task_rng",
]

DEFAULT_N_TRAIN = 400
DEFAULT_N_KEYS = 20
DEFAULT_N_TEST = 50
SPLIT_NAMES = ("train", "keys", "test", "test_alt")


@dataclass(frozen=True)
class TaskRecord:
    """One query of a task with its reference answer.

    ``subject`` is the underlying fact's subject (``"France"``, ``"47 + 38"``); it is what the splits keep
    disjoint.
    """

    id: str
    task: str
    subject: str
    input: str
    output: str

    def to_dict(self) -> dict[str, str]:
        """Training / key-sample form: ``{"id", "task", "subject", "input", "output"}``."""
        return {
            "id": self.id,
            "task": self.task,
            "subject": self.subject,
            "input": self.input,
            "output": self.output,
        }

    def to_test_record(self) -> dict[str, str]:
        """Test-set form read by :func:`lora_retriever.data.read_samples`:
        ``{"id", "task", "subject", "query", "response"}``."""
        return {
            "id": self.id,
            "task": self.task,
            "subject": self.subject,
            "query": self.input,
            "response": self.output,
        }


@dataclass(frozen=True)
class TaskSplits:
    """The four splits of one task; ``test_alt[i]`` asks about ``test[i]``'s subject in another wording."""

    task: str
    train: list[TaskRecord]
    keys: list[TaskRecord]
    test: list[TaskRecord]
    test_alt: list[TaskRecord]

    def split(self, name: str) -> list[TaskRecord]:
        if name not in SPLIT_NAMES:
            raise ValueError(f"unknown split {name!r}; splits are {', '.join(SPLIT_NAMES)}")
        return getattr(self, name)

    def counts(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLIT_NAMES}


def task_rng(task_name: str, seed: int, purpose: str) -> random.Random:
    """An rng for one purpose of one task. ``random.Random`` seeds a ``str`` through SHA-512, so this is
    the same on every run and platform (unlike ``hash()``), and purposes don't disturb one another."""
    return random.Random(f"lora_retriever.tasks:{task_name}:{seed}:{purpose}")


def build_splits(
    task: str | Task,
    seed: int = 0,
    n_train: int | None = None,
    n_keys: int = DEFAULT_N_KEYS,
    n_test: int = DEFAULT_N_TEST,
) -> TaskSplits:
    """Split a task's facts into train / keys / test (+ test_alt), disjoint by subject.

    Args:
        task: a task name from ``TASK_NAMES`` or a :class:`Task`.
        seed: same seed, same splits (byte for byte); another seed shuffles differently.
        n_train: training items; ``None`` takes ``DEFAULT_N_TRAIN`` or, when the task has fewer facts
            left after test and keys, all of them (logged).
        n_keys: key samples (embedded to build the adapter's retrieval key).
        n_test: test subjects; ``test`` and ``test_alt`` have this many records each.

    Raises:
        ValueError: a count that is negative or not an int, or more items asked than the task has facts
            (the message names the task, its number of facts and the largest count that fits).
    """
    task = get_task(task)
    for arg, value in (("seed", seed), ("n_keys", n_keys), ("n_test", n_test), ("n_train", n_train)):
        if arg == "n_train" and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or (arg != "seed" and value < 0):
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")

    items = task.load_items(task_rng(task.name, seed, "items"))
    n_facts = len(items)
    room = n_facts - n_test - n_keys
    if room < 0:
        raise ValueError(
            f"task {task.name!r} has {n_facts} facts, fewer than n_test={n_test} + n_keys={n_keys}; "
            f"lower n_test or n_keys"
        )
    if n_train is None:
        n_train = min(DEFAULT_N_TRAIN, room)
        if n_train < DEFAULT_N_TRAIN:
            logger.info("task %s: %d facts, so n_train=%d (all that is left)", task.name, n_facts, n_train)
    elif n_train > room:
        raise ValueError(
            f"task {task.name!r} has {n_facts} facts: n_test={n_test} + n_keys={n_keys} + n_train={n_train} "
            f"= {n_test + n_keys + n_train} asked; use n_train <= {room} (or leave it unset for all that fit)"
        )

    ordered = _ordered(task, items, task_rng(task.name, seed, "split"))
    chunks = {
        "test": ordered[:n_test],
        "keys": ordered[n_test : n_test + n_keys],
        "train": ordered[n_test + n_keys : n_test + n_keys + n_train],
    }
    for name, chunk in chunks.items():
        task_rng(task.name, seed, f"order:{name}").shuffle(chunk)
    return TaskSplits(
        task=task.name,
        train=_records(task, "train", chunks["train"], task.train_templates, seed),
        keys=_records(task, "keys", chunks["keys"], task.train_templates, seed),
        test=_records(task, "test", chunks["test"], task.train_templates, seed),
        test_alt=_records(task, "test_alt", chunks["test"], task.alt_templates, seed),
    )


def _ordered(task: Task, items: list[tuple[str, str]], rng: random.Random) -> list[tuple[str, str]]:
    """Shuffled facts; for ``balance_answers`` tasks, interleaved round-robin across answers so every
    prefix (the test set, then the keys) is balanced."""
    items = list(items)
    if not task.balance_answers:
        rng.shuffle(items)
        return items
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for item in items:
        groups[task.normalize(item[1])].append(item)
    queues = [groups[answer] for answer in sorted(groups)]
    for queue in queues:
        rng.shuffle(queue)
    ordered: list[tuple[str, str]] = []
    for i in range(max(map(len, queues), default=0)):
        ordered.extend(queue[i] for queue in queues if i < len(queue))
    return ordered


def _records(
    task: Task, split: str, items: list[tuple[str, str]], templates: tuple[str, ...], seed: int
) -> list[TaskRecord]:
    """One record per fact; the wordings are dealt evenly (whole rounds of all templates, shuffled)."""
    rng = task_rng(task.name, seed, f"templates:{split}")
    deck = list(templates) * math.ceil(len(items) / len(templates))
    rng.shuffle(deck)
    return [
        TaskRecord(
            id=f"{task.name}-{split}-{i:04d}",
            task=task.name,
            subject=subject,
            input=task.render(template, subject),
            output=answer,
        )
        for i, ((subject, answer), template) in enumerate(zip(items, deck))
    ]
