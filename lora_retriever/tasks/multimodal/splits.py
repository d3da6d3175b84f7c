"""Seeded train / keys / test / test_alt splits of an image task, disjoint by image.

A task's ``train``, ``keys`` and ``test`` images are drawn from the image partitions of those names
(:mod:`~lora_retriever.tasks.multimodal.partition`), so no image is in two splits, and no split shares an
image with the ``heldout`` captions. ``test_alt`` asks about the ``test`` images (same order, same answers)
in the task's alternative wordings. Images are dealt round-robin over the task's answers, so splits are
balanced; each split is then shuffled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from PIL import Image

from lora_retriever.tasks.multimodal.domains import ImageItem
from lora_retriever.tasks.multimodal.partition import draw_items, rng_for
from lora_retriever.tasks.multimodal.registry import get_domain, get_multimodal_task
from lora_retriever.tasks.multimodal.tasks import ImageTask
from lora_retriever.tasks.splits import SPLIT_NAMES, TaskSplits

__all__ = [
    "DEFAULT_N_KEYS",
    "DEFAULT_N_TEST",
    "DEFAULT_N_TRAIN",
    "SPLIT_NAMES",
    "ImageRecord",
    "ImageTaskSplits",
    "build_image_splits",
]

DEFAULT_N_TRAIN = 300
DEFAULT_N_KEYS = 20
DEFAULT_N_TEST = 20
SPLIT_PARTITIONS = {"train": "train", "keys": "keys", "test": "test"}
"""Split -> the image partition its images come from (``test_alt`` reuses ``test``'s images)."""


def image_tag() -> str:
    """The ``<image>`` placeholder of the project's templates (``swift.llm.template.IMAGE_TAG``)."""
    from swift.llm.template import IMAGE_TAG

    return IMAGE_TAG


@dataclass(frozen=True)
class ImageRecord:
    """One question about one image, with its reference answer.

    ``query`` is the instruction after an ``<image>`` tag on its own line, as the test-data and chat
    training formats expect.
    """

    id: str
    task: str
    category: str
    item: ImageItem
    instruction: str
    response: str

    @property
    def domain(self) -> str:
        return self.item.domain

    @property
    def query(self) -> str:
        return f"{image_tag()}\n{self.instruction}"

    def render(self) -> Image.Image:
        """The record's image (RGB, ``IMAGE_SIZE`` square)."""
        return get_domain(self.item.domain).render(self.item)

    def to_chat(self, image_path: str) -> dict[str, Any]:
        """Training / key-sample form (``lora_retriever.training.data``'s chat records)."""
        return {
            "id": self.id,
            "task": self.task,
            "category": self.category,
            "messages": [
                {"role": "user", "content": self.query},
                {"role": "assistant", "content": self.response},
            ],
            "images": [image_path],
        }

    def to_test(self, image_path: str) -> dict[str, Any]:
        """Test-set form read by :func:`lora_retriever.data.read_samples`."""
        return {
            "id": self.id,
            "task": self.task,
            "category": self.category,
            "domain": self.domain,
            "query": self.query,
            "images": [image_path],
            "response": self.response,
        }


@dataclass(frozen=True)
class ImageTaskSplits(TaskSplits):
    """The four splits of one image task (the text suite's :class:`~lora_retriever.tasks.splits.TaskSplits`
    holding :class:`ImageRecord` s); ``test_alt[i]`` asks about ``test[i]``'s image in another wording."""

    train: list[ImageRecord]
    keys: list[ImageRecord]
    test: list[ImageRecord]
    test_alt: list[ImageRecord]


def build_image_splits(
    task: str | ImageTask,
    seed: int = 0,
    n_train: int = DEFAULT_N_TRAIN,
    n_keys: int = DEFAULT_N_KEYS,
    n_test: int = DEFAULT_N_TEST,
) -> ImageTaskSplits:
    """Draw a task's images and questions.

    Args:
        task: a name from ``MULTIMODAL_TASK_NAMES`` or an :class:`ImageTask`.
        seed: same seed, same splits; the image partition itself never depends on it.
        n_train, n_keys, n_test: records per split (``test_alt`` has ``n_test``).

    Raises:
        ValueError: a count that is not a non-negative int, an unknown task, or a partition too small for
            the count (digits: about 875 train, 170 keys, 370 test images per task).
    """
    task = get_multimodal_task(task)
    for arg, value in (("seed", seed), ("n_train", n_train), ("n_keys", n_keys), ("n_test", n_test)):
        if not isinstance(value, int) or isinstance(value, bool) or (arg != "seed" and value < 0):
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    domain = get_domain(task.domain)
    counts = {"train": n_train, "keys": n_keys, "test": n_test}
    items: dict[str, list[ImageItem]] = {}
    for split, n in counts.items():
        rng = rng_for(task.name, seed, split)
        drawn = draw_items(
            domain, SPLIT_PARTITIONS[split], n, rng, balance=task.answer, classes=len(task.answers)
        )
        rng.shuffle(drawn)
        items[split] = drawn
    return ImageTaskSplits(
        task=task.name,
        train=_records(task, "train", items["train"], task.train_templates, seed),
        keys=_records(task, "keys", items["keys"], task.train_templates, seed),
        test=_records(task, "test", items["test"], task.train_templates, seed),
        test_alt=_records(task, "test_alt", items["test"], task.alt_templates, seed),
    )


def _records(
    task: ImageTask, split: str, items: list[ImageItem], templates: tuple[str, ...], seed: int
) -> list[ImageRecord]:
    """One record per image; the wordings are dealt evenly (whole rounds of all templates, shuffled)."""
    deck = list(templates) * math.ceil(len(items) / len(templates))
    rng_for(task.name, seed, f"templates:{split}").shuffle(deck)
    return [
        ImageRecord(
            id=f"{task.name}-{split}-{i:04d}",
            task=task.name,
            category=task.category,
            item=item,
            instruction=task.instruction(template, item),
            response=task.answer(item),
        )
        for i, (item, template) in enumerate(zip(items, deck))
    ]
