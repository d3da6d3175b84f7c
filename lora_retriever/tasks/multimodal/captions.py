"""Questions and answers about images of every domain, for pre-training a VLM's vision tower and projector.

    from lora_retriever.tasks.multimodal import caption_examples

    train = caption_examples("train", 4000, seed=0)      # [(PIL image, "What digit is this?", "7"), ...]
    heldout = caption_examples("heldout", 400, seed=0)   # images no task split (train/keys/test) uses

The questions describe what an image shows (its labels), in wordings of their own; the task suite's
instructions ask the same facts in other wordings and formats, which is what the adapters then teach.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import cycle

from PIL import Image

from lora_retriever.tasks.multimodal.domains import ImageItem
from lora_retriever.tasks.multimodal.partition import iter_partition, rng_for
from lora_retriever.tasks.multimodal.registry import DOMAIN_NAMES, get_domain

__all__ = ["CAPTION_SPLITS", "CaptionExample", "caption_examples", "caption_questions"]

CAPTION_SPLITS = {"train": "train", "heldout": "heldout"}
"""``caption_examples`` split -> the image partition it draws from."""

CaptionExample = tuple[Image.Image, str, str]
"""``(image, question, answer)``; the question has no ``<image>`` tag (the caller's template places it)."""


def _digits(labels) -> list[tuple[str, str]]:
    digit = str(labels["digit"])
    return [("What digit is this?", digit), ("Which digit is written here?", digit)]


def _photo(labels) -> list[tuple[str, str]]:
    return [
        ("Which photo is this crop from?", labels["photo"]),
        ("Is this crop from the china photo or the flower photo?", labels["photo"]),
        ("Is this image bright or dark?", labels["brightness"]),
    ]


CAPTIONERS: dict[str, Callable[..., list[tuple[str, str]]]] = {"digits": _digits, "photo": _photo}
"""Domain name -> the ``(question, answer)`` pairs an item's labels support."""


def caption_questions(item: ImageItem) -> list[tuple[str, str]]:
    """Every ``(question, answer)`` pair about one image."""
    return CAPTIONERS[item.domain](item.labels)


def caption_examples(
    split: str, n: int, seed: int = 0, domains: Sequence[str] | None = None
) -> list[CaptionExample]:
    """``n`` ``(image, question, answer)`` triples, dealt round-robin over ``domains`` (default: all).

    Args:
        split: ``"train"`` draws images of the ``train`` partition only; ``"heldout"`` draws images of the
            ``heldout`` partition, which no task split (train / keys / test / test_alt) of any seed uses, so
            accuracy on them is honest.
        n: number of triples. A finite domain (digits) cycles through its partition, reshuffled each round,
            when ``n`` asks for more images than it has; a question is drawn for each image.
        seed: same seed, same triples.
        domains: domain names (see ``DOMAIN_NAMES``).

    Raises:
        ValueError: an unknown split or domain, or a negative ``n``.
    """
    if split not in CAPTION_SPLITS:
        raise ValueError(f"split must be one of {', '.join(CAPTION_SPLITS)}, got {split!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    names = list(DOMAIN_NAMES if domains is None else domains)
    if not names:
        raise ValueError(f"domains is empty; pick some of: {', '.join(DOMAIN_NAMES)}")
    resolved = [get_domain(name) for name in names]
    sources = {
        d.name: iter_partition(d, CAPTION_SPLITS[split], rng_for("captions", d.name, split, seed), cycle=True)
        for d in resolved
    }
    question_rng = rng_for("captions", "questions", split, seed)
    examples: list[CaptionExample] = []
    for domain, _ in zip(cycle(resolved), range(n)):
        item = next(sources[domain.name])
        question, answer = question_rng.choice(caption_questions(item))
        examples.append((domain.render(item), question, answer))
    return examples
