"""The task types of the mini M-BEIR: what each one asks, drawn from the project's offline task suites.

Each :class:`TaskSpec` turns one split's request (how many queries, how many extra candidates, which image
partition, a seeded rng) into a :class:`SplitDraft`: queries with their positive contents, and the task's
local candidate pool. Ids, files and images are :mod:`.build`'s business.

=====================  ==================  ======================================================================
task                   modalities          what a query is -> what it retrieves
=====================  ==================  ======================================================================
``capital``            text -> text        "What is the capital of France?" -> "Paris" (text suite ``capital``)
``currency``           text -> text        "Which currency code does Peru use?" -> "PEN" (text suite ``currency``)
``screen_caption``     text -> image       "an analogue clock showing 3 o'clock on a dark face ..." -> that screen
``screen_describe``    image -> text       a screen (clock, counter, calendar, shop, map) -> its description
``screen_qa``          image,text -> text  any domain's image + "What time is it on this clock?" -> "3 o'clock"
``clock_restyle``      image,text -> image a clock + "the same time on a light face with teal hands" -> that clock
``digit_match``        image -> image      a handwritten digit -> other images of the same digit
=====================  ==================  ======================================================================

Images come from the image domains of :mod:`lora_retriever.tasks.multimodal`; a split's images (queries and
candidates alike) come from one fixed partition (:data:`SPLIT_PARTITIONS`), so no image is in two splits. A
query image is never a candidate of its own task (it would retrieve itself). Every image that fits a query
(the same description, the same digit, the same hour and look) is one of its positives, not only the one it
was drawn with.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from types import MappingProxyType
from typing import Any

from lora_retriever.mbeir.formats import task_id_of
from lora_retriever.tasks import build_splits, get_task
from lora_retriever.tasks.multimodal import DOMAIN_NAMES, ImageItem, caption_questions, draw_items, get_domain
from lora_retriever.tasks.splits import task_rng

__all__ = [
    "DATASET_IDS",
    "DESCRIBERS",
    "MBEIR_TASKS",
    "MBEIR_TASK_NAMES",
    "SPLITS",
    "SPLIT_PARTITIONS",
    "Content",
    "QueryDraft",
    "SplitDraft",
    "SplitRequest",
    "TaskSpec",
    "describe",
]

SPLIT_PARTITIONS: Mapping[str, str] = MappingProxyType({"train": "train", "val": "keys", "test": "test"})
"""M-BEIR split -> the image partition it draws from, which is also the name of the text suite's split
(:func:`lora_retriever.tasks.build_splits`: train, keys, test)."""
SPLITS: tuple[str, ...] = tuple(SPLIT_PARTITIONS)

DATASET_IDS: Mapping[str, int] = MappingProxyType(
    {"capitals": 0, "currencies": 1, "screens": 2, "clocks": 3, "digits": 4}
)
"""Dataset name -> the ``<dataset_id>`` of its ids (fixed, whichever tasks are built)."""

IMAGE_SOURCES = ("scikit-learn", "pillow")
"""Distributions the image tasks' pixels come from (digits and photos; the PNG encoder), for the manifest."""
SCREEN_DOMAINS = ("clock", "counter", "calendar", "shop", "map")
"""Domains whose description names what sets one image apart (used by the caption/description tasks)."""


# ----------------------------------------------------------------------------------------------------------
# descriptions of images (from their labels and the style fields that show)
# ----------------------------------------------------------------------------------------------------------


def _clock(item: ImageItem) -> str:
    s = item.style
    return f"an analogue clock showing {item.labels['hour']} o'clock on a {s['theme']} face with {s['hands']} hands"


def _counter(item: ImageItem) -> str:
    s = item.style
    return f"a counter app showing {item.labels['number']} in {s['ink']} digits on a {s['theme']} screen"


def _calendar(item: ImageItem) -> str:
    s, labels = item.style, item.labels
    return (
        f"a {s['theme']} work-week calendar with a {s['header']} header: {labels['weekday']} highlighted in "
        f"{s['highlight']}"
    )


def _shop(item: ImageItem) -> str:
    tiles = ", ".join(f"{colour} {shape}" for colour, shape in item.labels["tiles"])
    return f"a {item.style['theme']} shop screen with a {item.style['header']} header and six tiles: {tiles}"


def _map(item: ImageItem) -> str:
    return f"a map with a red pin in the {item.labels['quadrant_name']} quadrant"


def _digits(item: ImageItem) -> str:
    return f"a handwritten digit {item.labels['digit']}, grey on black"


def _photo(item: ImageItem) -> str:
    return f"a {item.labels['brightness']} crop of the {item.labels['photo']} photograph"


DESCRIBERS: Mapping[str, Callable[[ImageItem], str]] = MappingProxyType(
    {
        "clock": _clock,
        "counter": _counter,
        "calendar": _calendar,
        "shop": _shop,
        "map": _map,
        "digits": _digits,
        "photo": _photo,
    }
)
"""Domain name -> a one-line description of one of its images."""


def describe(item: ImageItem) -> str:
    """A one-line description of an image: its labels and the style fields a viewer can see."""
    return DESCRIBERS[item.domain](item)


# ----------------------------------------------------------------------------------------------------------
# drafts: contents before they get ids
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Content:
    """A candidate before it has a ``did``: text, an image, or both, and where it came from.

    Two contents with the same text and image are one candidate (``key``)."""

    txt: str | None
    image: ImageItem | None
    src: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def key(self) -> tuple[str | None, tuple[str, str] | None]:
        return (self.txt, None if self.image is None else (self.image.domain, self.image.key))


@dataclass(frozen=True)
class QueryDraft:
    """A query before it has a ``qid``: its text and/or image, its source, and its positive contents."""

    txt: str | None
    image: ImageItem | None
    src: Mapping[str, Any]
    positives: tuple[Content, ...]


@dataclass(frozen=True)
class SplitDraft:
    """One task's split: its queries and its local pool (which holds every positive)."""

    queries: list[QueryDraft]
    pool: list[Content]


@dataclass(frozen=True)
class SplitRequest:
    """What a task builds for one split."""

    task: str
    split: str
    n_queries: int
    n_distractors: int
    seed: int
    sizes: tuple[int, int, int]  # (n_train, n_val, n_test), for the text suite's one build_splits call

    @property
    def partition(self) -> str:
        return SPLIT_PARTITIONS[self.split]

    def rng(self, purpose: str) -> random.Random:
        """A seeded rng for one purpose (a ``str`` seed goes through SHA-512: the same on every platform)."""
        return random.Random(f"lora_retriever.mbeir:{self.task}:{self.split}:{self.seed}:{purpose}")


@dataclass(frozen=True)
class TaskSpec:
    """One task type of the mini M-BEIR."""

    name: str
    dataset: str
    query_modality: str
    cand_modality: str
    description: str
    prompts: tuple[str, ...]
    build: Callable[[SplitRequest], SplitDraft]
    data_sources: tuple[str, ...] = IMAGE_SOURCES

    @property
    def dataset_id(self) -> int:
        return DATASET_IDS[self.dataset]

    @property
    def task_id(self) -> int:
        return task_id_of(self.query_modality, self.cand_modality)


def _image_source(item: ImageItem, partition: str, **extra: Any) -> dict[str, Any]:
    return {
        "domain": item.domain,
        "key": item.key,
        "labels": dict(item.labels),
        "partition": partition,
        **extra,
    }


def _image(item: ImageItem, partition: str) -> Content:
    return Content(None, item, _image_source(item, partition))


def _deal(domains: Sequence[str], n: int) -> list[str]:
    return [domains[i % len(domains)] for i in range(n)]


def _draw_dealt(
    domains: Sequence[str], counts: Sequence[int], partition: str, rng: random.Random
) -> list[list[ImageItem]]:
    """Distinct images for several groups (``counts[g]`` each), dealt round-robin over ``domains``; no image
    is in two groups."""
    order = [_deal(domains, n) for n in counts]
    need = {d: sum(o.count(d) for o in order) for d in domains}
    drawn = {d: draw_items(get_domain(d), partition, k, rng) for d, k in need.items() if k}
    cursor = dict.fromkeys(drawn, 0)
    groups = []
    for group in order:
        items = []
        for d in group:
            items.append(drawn[d][cursor[d]])
            cursor[d] += 1
        groups.append(items)
    return groups


def _unique(contents: Sequence[Content]) -> list[Content]:
    """The contents without repeats (first one kept, order kept)."""
    seen: dict[tuple, Content] = {}
    for content in contents:
        seen.setdefault(content.key, content)
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------------
# builders
# ----------------------------------------------------------------------------------------------------------


@cache
def _text_splits(task: str, seed: int, sizes: tuple[int, int, int]):
    n_train, n_val, n_test = sizes
    return build_splits(task, seed, n_train=n_train, n_keys=n_val, n_test=n_test)


@cache
def _text_answers(task: str, seed: int) -> tuple[str, ...]:
    """Every answer the task's facts have (the pool distractors are drawn from them)."""
    items = get_task(task).load_items(task_rng(task, seed, "items"))
    return tuple(sorted({answer for _, answer in items}))


def _text_answer_builder(task: str) -> Callable[[SplitRequest], SplitDraft]:
    """Text -> text: a text-suite question retrieves its answer among the task's answers."""

    def build(request: SplitRequest) -> SplitDraft:
        records = _text_splits(task, request.seed, request.sizes).split(request.partition)
        answer = {a: Content(a, None, {"task": task, "answer": a}) for a in _text_answers(task, request.seed)}
        queries = [
            QueryDraft(
                r.input, None, {"task": task, "record": r.id, "subject": r.subject}, (answer[r.output],)
            )
            for r in records
        ]
        needed = {r.output for r in records}
        others = [a for a in answer if a not in needed]
        extra = request.rng("distractors").sample(others, min(request.n_distractors, len(others)))
        return SplitDraft(queries, _unique([answer[r.output] for r in records] + [answer[a] for a in extra]))

    return build


def _build_screen_caption(request: SplitRequest) -> SplitDraft:
    """Text -> image: a screen's description retrieves the screen (and any other it describes as well)."""
    targets, distractors = _draw_dealt(
        SCREEN_DOMAINS, (request.n_queries, request.n_distractors), request.partition, request.rng("images")
    )
    pool = [_image(item, request.partition) for item in targets + distractors]
    by_text: dict[str, list[Content]] = {}
    for content in pool:
        by_text.setdefault(describe(content.image), []).append(content)
    queries = [
        QueryDraft(describe(t), None, _image_source(t, request.partition), tuple(by_text[describe(t)]))
        for t in targets
    ]
    return SplitDraft(queries, pool)


def _build_screen_describe(request: SplitRequest) -> SplitDraft:
    """Image -> text: a screen retrieves its description."""
    images, distractors = _draw_dealt(
        SCREEN_DOMAINS, (request.n_queries, request.n_distractors), request.partition, request.rng("images")
    )
    text = {}
    for item in images + distractors:
        text.setdefault(describe(item), Content(describe(item), None, {"describes": item.domain}))
    queries = [
        QueryDraft(None, item, _image_source(item, request.partition), (text[describe(item)],))
        for item in images
    ]
    return SplitDraft(queries, list(text.values()))


def _build_screen_qa(request: SplitRequest) -> SplitDraft:
    """(Image, text) -> text: an image and a question about it retrieve the answer (as a text candidate)."""
    images, distractors = _draw_dealt(
        DOMAIN_NAMES, (request.n_queries, request.n_distractors), request.partition, request.rng("images")
    )
    rng = request.rng("questions")
    answers: dict[str, Content] = {}
    queries = []
    for item in images:
        question, answer = rng.choice(caption_questions(item, rng))
        content = answers.setdefault(answer, Content(answer, None, {"answer": answer}))
        queries.append(QueryDraft(question, item, _image_source(item, request.partition), (content,)))
    for item in distractors:
        _, answer = rng.choice(caption_questions(item, rng))
        answers.setdefault(answer, Content(answer, None, {"answer": answer}))
    return SplitDraft(queries, list(answers.values()))


def _look(item: ImageItem) -> tuple[str, str]:
    return (item.style["theme"], item.style["hands"])


def _build_clock_restyle(request: SplitRequest) -> SplitDraft:
    """(Image, text) -> image: a clock and "the same time on a <theme> face with <colour> hands" retrieve the
    clocks at that hour with that look (a composed-image query, as CIRR / FashionIQ in M-BEIR)."""
    clock, rng, partition = get_domain("clock"), request.rng("images"), request.partition
    references = draw_items(clock, partition, request.n_queries, rng)
    used = {item.key for item in references}
    targets = []
    for reference in references:

        def fits(item: ImageItem, reference: ImageItem = reference) -> bool:
            same_hour = item.labels["hour"] == reference.labels["hour"]
            return same_hour and _look(item) != _look(reference) and item.key not in used

        (target,) = draw_items(clock, partition, 1, rng, accept=fits)
        used.add(target.key)
        targets.append(target)
    distractors = draw_items(
        clock, partition, request.n_distractors, rng, accept=lambda item: item.key not in used
    )
    pool = [_image(item, partition) for item in targets + distractors]
    queries = []
    for reference, target in zip(references, targets):
        theme, hands = _look(target)
        positives = tuple(
            c
            for c in pool
            if c.image.labels["hour"] == target.labels["hour"] and _look(c.image) == _look(target)
        )
        text = f"the same time on a {theme} face with {hands} hands"
        queries.append(
            QueryDraft(text, reference, _image_source(reference, partition, target=target.key), positives)
        )
    return SplitDraft(queries, pool)


def _build_digit_match(request: SplitRequest) -> SplitDraft:
    """Image -> image: a handwritten digit retrieves the other images of the same digit (as NIGHTS in M-BEIR)."""
    digits, rng, partition = get_domain("digits"), request.rng("images"), request.partition
    queries_items = draw_items(
        digits, partition, request.n_queries, rng, balance=lambda item: item.labels["digit"], classes=10
    )
    used = {item.key for item in queries_items}
    pool_items = []
    for query in queries_items:
        if any(item.labels["digit"] == query.labels["digit"] for item in pool_items):
            continue

        def fits(item: ImageItem, query: ImageItem = query) -> bool:
            return item.labels["digit"] == query.labels["digit"] and item.key not in used

        (match,) = draw_items(digits, partition, 1, rng, accept=fits)
        used.add(match.key)
        pool_items.append(match)
    pool_items += draw_items(
        digits, partition, request.n_distractors, rng, accept=lambda item: item.key not in used
    )
    pool = [_image(item, partition) for item in pool_items]
    queries = [
        QueryDraft(
            None,
            item,
            _image_source(item, partition),
            tuple(c for c in pool if c.image.labels["digit"] == item.labels["digit"]),
        )
        for item in queries_items
    ]
    return SplitDraft(queries, pool)


_SPECS = (
    TaskSpec(
        "capital",
        "capitals",
        "text",
        "text",
        "a question about a country's capital -> the capital's name (text suite: capital)",
        ("Retrieve the name of the city that answers this question.", "Find the capital city asked about."),
        _text_answer_builder("capital"),
        get_task("capital").data_sources,
    ),
    TaskSpec(
        "currency",
        "currencies",
        "text",
        "text",
        "a question about a country's currency -> its ISO 4217 code (text suite: currency)",
        ("Retrieve the currency code that answers this question.", "Find the three-letter code asked about."),
        _text_answer_builder("currency"),
        get_task("currency").data_sources,
    ),
    TaskSpec(
        "screen_caption",
        "screens",
        "text",
        "image",
        "a screen's description -> the screen (clock, counter, calendar, shop, map)",
        ("Retrieve the screen that matches this description.", "Find an image of the app screen described."),
        _build_screen_caption,
    ),
    TaskSpec(
        "screen_describe",
        "screens",
        "image",
        "text",
        "a screen -> its description",
        ("Retrieve a description of this screen.", "Find the caption that describes this image."),
        _build_screen_describe,
    ),
    TaskSpec(
        "screen_qa",
        "screens",
        "image,text",
        "text",
        "an image of any domain and a question about it -> the answer",
        (
            "Retrieve the answer to the question about this image.",
            "Find the text that answers this question.",
        ),
        _build_screen_qa,
    ),
    TaskSpec(
        "clock_restyle",
        "clocks",
        "image,text",
        "image",
        "a clock and a new look -> the clocks at the same hour with that look",
        (
            "Retrieve the clock that shows this time with the change described.",
            "Find this clock, restyled as said.",
        ),
        _build_clock_restyle,
    ),
    TaskSpec(
        "digit_match",
        "digits",
        "image",
        "image",
        "a handwritten digit -> other images of the same digit",
        ("Retrieve other handwritten images of this digit.", "Find images of the same digit."),
        _build_digit_match,
    ),
)

MBEIR_TASKS: Mapping[str, TaskSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Task name -> its :class:`TaskSpec` (the registry the builder and its CLI read)."""
MBEIR_TASK_NAMES: tuple[str, ...] = tuple(MBEIR_TASKS)
