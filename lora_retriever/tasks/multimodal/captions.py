"""Questions and answers about images of every domain, for pre-training a VLM's vision tower and projector.

    from lora_retriever.tasks.multimodal import caption_examples

    train = caption_examples("train", 4000, seed=0)      # [(PIL image, "What digit is this?", "7"), ...]
    digits = caption_examples("train", 500, seed=0, domains=["digits"])
    heldout = caption_examples("heldout", 400, seed=0)   # images no task split (train/keys/test) uses

The questions describe what an image shows (its labels) in wordings of their own, for every domain
(``DOMAIN_NAMES``): digits ("What digit is this?" -> "7"), photo ("Which photo is this crop from?" ->
"flower"), clock ("What time is it on this clock?" -> "3 o'clock"), calendar ("Which cell is highlighted,
counting from the left?" -> "3"), shop ("What colour is the item on tile 2?" -> "red"), counter ("What digit
does the display show?" -> "seven") and map ("Where is the pin?" -> "top left"). The task suite's
instructions ask about the same images in other wordings and answer formats (a digit's name where the
captions give the numeral and the reverse, a weekday's name where they give the cell's position, even/odd,
``TAP(n)``), which is what its adapters teach: a base VLM trained on these captions does not already answer
the tasks in their own format.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

from PIL import Image

from lora_retriever.tasks.multimodal.domains import ImageItem
from lora_retriever.tasks.multimodal.partition import iter_partition, rng_for
from lora_retriever.tasks.multimodal.registry import DOMAIN_NAMES, get_domain
from lora_retriever.tasks.multimodal.screens import SHAPES
from lora_retriever.tasks.multimodal.tasks import DIGIT_NAMES

__all__ = ["CAPTION_SPLITS", "CaptionExample", "caption_domains", "caption_examples", "caption_questions"]

CAPTION_SPLITS = {"train": "train", "heldout": "heldout"}
"""``caption_examples`` split -> the image partition it draws from."""

CaptionExample = tuple[Image.Image, str, str]
"""``(image, question, answer)``; the question has no ``<image>`` tag (the caller's template places it)."""


Captioner = Callable[[Mapping[str, Any], random.Random], list[tuple[str, str]]]


def _digits(labels, rng) -> list[tuple[str, str]]:
    digit = str(labels["digit"])
    return [("What digit is this?", digit), ("Which digit is written here?", digit)]


def _photo(labels, rng) -> list[tuple[str, str]]:
    return [
        ("Which photo is this crop from?", labels["photo"]),
        ("Is the lighting here bright or dark?", labels["brightness"]),
    ]


def _clock(labels, rng) -> list[tuple[str, str]]:
    hour = labels["hour"]
    return [
        ("What time is it on this clock?", f"{hour} o'clock"),
        ("Which hour is the short hand on?", str(hour)),
    ]


def _calendar(labels, rng) -> list[tuple[str, str]]:
    cell = str(labels["day"])  # the position, not the weekday's name (calendar_day's answer)
    return [
        ("Which cell is highlighted, counting from the left?", cell),
        ("Which day cell of this calendar is coloured?", cell),
    ]


def _shop(labels, rng) -> list[tuple[str, str]]:
    tiles = labels["tiles"]
    tile = rng.randint(1, len(tiles))
    colour, shape = tiles[tile - 1]
    other = rng.choice(SHAPES)
    return [
        (f"What colour is the item on tile {tile}?", colour),
        (f"What shape is on tile {tile}?", shape),
        (f"Which tile shows the {colour} {shape}?", str(tile)),
        (f"How many {other}s are there?", str(sum(s == other for _, s in tiles))),
    ]


def _counter(labels, rng) -> list[tuple[str, str]]:
    name = DIGIT_NAMES[labels["number"]]  # the digit's name, not the numeral (counter_value's answer)
    return [("What digit does the display show?", name), ("Which digit is on the counter's display?", name)]


def _map(labels, rng) -> list[tuple[str, str]]:
    return [
        ("Where is the pin?", labels["quadrant_name"]),
        ("Which quadrant holds the pin?", labels["quadrant_name"]),
    ]


CAPTIONERS: Mapping[str, Captioner] = MappingProxyType(
    {
        "digits": _digits,
        "photo": _photo,
        "clock": _clock,
        "calendar": _calendar,
        "shop": _shop,
        "counter": _counter,
        "map": _map,
    }
)
"""Domain name -> the ``(question, answer)`` pairs an item's labels support (some drawn with the rng)."""


def caption_questions(item: ImageItem, rng: random.Random) -> list[tuple[str, str]]:
    """The ``(question, answer)`` pairs about one image (questions about "tile k" pick ``k`` with ``rng``)."""
    return CAPTIONERS[item.domain](item.labels, rng)


def caption_domains(n: int, domains: Sequence[str] | None = None) -> list[str]:
    """The domain of each of the ``n`` examples :func:`caption_examples` returns for the same ``domains``
    (round-robin, in the given order), e.g. for a per-domain accuracy report.

    Raises:
        ValueError: a negative ``n``, an empty ``domains`` or an unknown domain name.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    names = list(DOMAIN_NAMES if domains is None else domains)
    if not names:
        raise ValueError(f"domains is empty; pick some of: {', '.join(DOMAIN_NAMES)}")
    for name in names:
        get_domain(name)  # fails on an unknown name
    return [names[i % len(names)] for i in range(n)]


def caption_examples(
    split: str, n: int, seed: int = 0, domains: Sequence[str] | None = None
) -> list[CaptionExample]:
    """``n`` ``(image, question, answer)`` triples, dealt round-robin over ``domains`` (default: all; the
    domain of each triple is ``caption_domains(n, domains)``).

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
    order = caption_domains(n, domains)
    resolved = {name: get_domain(name) for name in dict.fromkeys(order)}
    sources = {
        name: iter_partition(
            domain, CAPTION_SPLITS[split], rng_for("captions", name, split, seed), cycle=True
        )
        for name, domain in resolved.items()
    }
    question_rng = rng_for("captions", "questions", split, seed)
    examples: list[CaptionExample] = []
    for name in order:
        item = next(sources[name])
        question, answer = question_rng.choice(caption_questions(item, question_rng))
        examples.append((resolved[name].render(item), question, answer))
    return examples
