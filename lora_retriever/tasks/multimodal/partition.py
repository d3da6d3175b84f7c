"""The fixed image partition: every image of every domain belongs to one of ``train``, ``keys``, ``test``,
``heldout``, whatever the seed.

A task's train / keys / test images come from the partitions of those names (its ``test_alt`` asks about the
``test`` images again); captions for VLM pre-training come from ``train`` and, for held-out accuracy, from
``heldout``, which no task split uses. Because the partition depends only on the image (a SHA-256 of its
domain and key, or for photos of the block it was cut from), not on a seed, a VLM pre-trained on
``caption_examples("train", ...)`` never saw a test image of a suite written with *any* seed. Seeds choose
which images of a partition are drawn and in what order.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterator
from itertools import count

from lora_retriever.tasks.multimodal.domains import PARTITIONS, ImageDomain, ImageItem
from swift.utils import get_logger

__all__ = ["draw_items", "iter_partition", "partition_of", "rng_for"]

logger = get_logger(__name__)

MAX_TRIES_PER_ITEM = 400  # a generated domain gives up after this many draws per item asked
#: a generated domain's partition counts as exhausted after this many draws in a row without a new image
#: (a finite one, e.g. calendars, would otherwise be sampled forever once every image of it was drawn)
MAX_MISSES_IN_A_ROW = 100 * MAX_TRIES_PER_ITEM


def rng_for(*parts: object) -> random.Random:
    """A seeded rng for one purpose. ``random.Random`` seeds a ``str`` through SHA-512, so this is the same on
    every run and platform (unlike ``hash()``), and different purposes don't disturb one another."""
    return random.Random(":".join(["lora_retriever.tasks.multimodal", *map(str, parts)]))


def partition_of(domain: ImageDomain, item: ImageItem) -> str:
    """The partition of an image (:meth:`ImageDomain.partition`: a fixed function of the image, no seed)."""
    return domain.partition(item)


def iter_partition(
    domain: ImageDomain, partition: str, rng: random.Random, *, cycle: bool = False
) -> Iterator[ImageItem]:
    """Distinct images of one partition in a seeded order.

    A finite domain yields its partition shuffled, then stops (or, with ``cycle``, reshuffles and goes round
    again: repeats are fine for pre-training captions). A generated domain yields fresh random images until
    ``MAX_MISSES_IN_A_ROW`` draws in a row bring no new one, then stops (or, with ``cycle``, goes round again).
    """
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    items = domain.all_items()
    if items is not None:
        members = [item for item in items if partition_of(domain, item) == partition]
        while members:
            order = list(members)
            rng.shuffle(order)
            yield from order
            if not cycle:
                return
        return
    seen: set[str] = set()
    misses = 0
    for _ in count():
        item = domain.sample(rng)
        if item.key not in seen and partition_of(domain, item) == partition:
            seen.add(item.key)
            misses = 0
            yield item
            continue
        misses += 1
        if misses >= MAX_MISSES_IN_A_ROW:  # the partition's distinct images are (almost surely) all drawn
            if not cycle:
                return
            logger.info(
                "image domain %r, partition %r: all %d distinct images drawn; going round again",
                domain.name,
                partition,
                len(seen),
            )
            seen.clear()
            misses = 0


def draw_items(
    domain: ImageDomain,
    partition: str,
    n: int,
    rng: random.Random,
    *,
    accept: Callable[[ImageItem], bool] | None = None,
    balance: Callable[[ImageItem], Hashable] | None = None,
    classes: int | None = None,
) -> list[ImageItem]:
    """``n`` distinct images of one partition.

    Args:
        domain: the image domain.
        partition: ``train``, ``keys``, ``test`` or ``heldout``.
        n: how many.
        rng: the seeded rng (the draw is a function of it).
        accept: keep only images it accepts (a task that needs, e.g., a pin away from the centre).
        balance: when given, the images are dealt round-robin over its values (the answers of a few-class
            task), so every prefix is balanced; ``classes`` (how many values exist) lets the draw stop once
            every class has its share.

    Raises:
        ValueError: the partition has fewer than ``n`` acceptable images (the message names the domain,
            the partition and how many it has), or a generated domain keeps failing ``accept``.
    """
    source = iter_partition(domain, partition, rng)
    max_tries = MAX_TRIES_PER_ITEM * max(n, 1)
    if balance is None:
        out: list[ImageItem] = []
        for tries, item in enumerate(source):
            if len(out) == n or tries >= max_tries:
                break
            if accept is None or accept(item):
                out.append(item)
        _check_enough(domain, partition, n, len(out))
        return out
    groups: dict[Hashable, list[ImageItem]] = {}
    share = -(-n // classes) if classes else n
    for tries, item in enumerate(source):
        if tries >= max_tries or (
            classes and len(groups) == classes and all(len(g) >= share for g in groups.values())
        ):
            break
        if accept is None or accept(item):
            groups.setdefault(balance(item), []).append(item)
    queues = [groups[value] for value in sorted(groups, key=str)]
    rng.shuffle(queues)  # which classes come first (when n < classes) is random, not alphabetical
    dealt = [queue[i] for i in range(max(map(len, queues), default=0)) for queue in queues if i < len(queue)]
    _check_enough(domain, partition, n, len(dealt))
    return dealt[:n]


def _check_enough(domain: ImageDomain, partition: str, n: int, found: int) -> None:
    if found < n:
        raise ValueError(
            f"domain {domain.name!r} has {found} usable images in partition {partition!r}, {n} asked; "
            f"ask for at most {found}"
        )
