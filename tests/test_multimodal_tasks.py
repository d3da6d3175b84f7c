"""The multimodal task suite: image domains, disjoint image splits, tasks answerable from what the image
shows, the TAP action rule, VLM pre-training captions, the writer and the CLI. Real rendering throughout."""

from __future__ import annotations

import json
import time
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from lora_retriever.data import read_samples
from lora_retriever.embed_pool import read_sample_texts
from lora_retriever.tasks import is_correct
from lora_retriever.tasks.__main__ import main as tasks_main
from lora_retriever.tasks.multimodal import (
    CATEGORIES,
    DEFAULT_N_KEYS,
    DEFAULT_N_TEST,
    DEFAULT_N_TRAIN,
    DOMAIN_NAMES,
    IMAGE_SIZE,
    MULTIMODAL_TASK_NAMES,
    PARTITIONS,
    SPLIT_NAMES,
    action_match,
    build_image_splits,
    caption_domains,
    caption_examples,
    format_action,
    get_domain,
    get_multimodal_task,
    parse_action,
    partition_of,
    write_multimodal_suite,
)
from lora_retriever.tasks.multimodal.domains import BRIGHTNESS_MARGIN, BRIGHTNESS_THRESHOLD, luminance
from lora_retriever.tasks.multimodal.partition import rng_for
from lora_retriever.tasks.multimodal.screens import ACCENTS, COLOURS, SHOP_COLUMNS
from lora_retriever.tasks.multimodal.tasks import DIGIT_NAMES
from lora_retriever.training.data import read_training_records

TINY = {"n_train": 6, "n_keys": 4, "n_test": 4}


@pytest.fixture(scope="module")
def splits():
    return {
        name: build_image_splits(name, seed=0, n_train=12, n_keys=4, n_test=20)
        for name in MULTIMODAL_TASK_NAMES
    }


@pytest.fixture(scope="module")
def suite_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mm") / "suite"
    write_multimodal_suite(out, seed=0, **TINY)
    return out


def _files(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _pixels(image: Image.Image) -> bytes:
    return np.asarray(image.convert("RGB")).tobytes()


# ------------------------------------------------------------------------------------------------ domains


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_every_domain_renders_one_size_deterministically(name):
    domain, rng = get_domain(name), rng_for("test", name)
    items = [domain.sample(rng) for _ in range(5)]
    for item in items:
        image = domain.render(item)
        assert image.mode == "RGB" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert _pixels(domain.render(item)) == _pixels(image)
        assert np.asarray(image).std() > 5  # something is drawn, not a flat canvas
    assert len({_pixels(domain.render(i)) for i in items}) == len(items)


def test_digits_are_sklearn_digits_upscaled():
    from sklearn.datasets import load_digits

    digits = load_digits()
    domain = get_domain("digits")
    items = domain.all_items()
    assert 1700 <= len(items) <= 1797  # exact duplicates are one item
    for item in items[:50]:
        index = item.style["index"]
        assert item.labels["digit"] == digits.target[index]
        grey = np.asarray(domain.render(item))[..., 0].astype(float)
        assert np.allclose(grey[::8, ::8], digits.images[index] * 255 / 16, atol=0.5)  # 8 x 8 blocks


def test_partition_is_fixed_and_shared_by_photo_blocks():
    digits = get_domain("digits")
    counts = Counter(partition_of(digits, item) for item in digits.all_items())
    assert set(counts) == set(PARTITIONS)
    assert counts["train"] > counts["test"] > counts["keys"] and counts["heldout"] > counts["keys"]
    photo = get_domain("photo")
    crops = [photo.sample(rng_for("blocks", i)) for i in range(300)]
    by_block: dict[tuple, set[str]] = {}
    for crop in crops:
        by_block.setdefault((crop.style["photo"], *crop.style["block"]), set()).add(partition_of(photo, crop))
    assert all(len(parts) == 1 for parts in by_block.values())  # a block's crops never straddle partitions
    assert len(by_block) < len(crops)  # the check compared crops of a shared block


# ------------------------------------------------------------------------------------------------ tasks


def test_suite_shape_categories_and_wordings():
    tasks = [get_multimodal_task(name) for name in MULTIMODAL_TASK_NAMES]
    assert len(tasks) >= 8 and len({t.domain for t in tasks}) >= 3
    assert {"digits", "photo"} <= {t.domain for t in tasks}
    assert 3 <= len(CATEGORIES) <= 4 and all(len(members) >= 2 for members in CATEGORIES.values())
    assert sorted(n for members in CATEGORIES.values() for n in members) == sorted(MULTIMODAL_TASK_NAMES)
    for task in tasks:
        assert not set(task.train_templates) & set(task.alt_templates), task.name
        assert len(task.train_templates) >= 3 and len(task.alt_templates) >= 2
        assert task.scoring in ("exact", "action")
    assert any(t.scoring == "action" for t in tasks)


def test_neither_modality_alone_identifies_the_task():
    tasks = [get_multimodal_task(name) for name in MULTIMODAL_TASK_NAMES]
    same_wording_other_domain = [
        (a.name, b.name)
        for a in tasks
        for b in tasks
        if a.name < b.name and a.domain != b.domain and set(a.train_templates) & set(b.train_templates)
    ]
    same_domain_other_wording = [
        (a.name, b.name)
        for a in tasks
        for b in tasks
        if a.name < b.name and a.domain == b.domain and not set(a.train_templates) & set(b.train_templates)
    ]
    assert ("counter_value", "digit_value") in same_wording_other_domain
    assert ("counter_parity", "digit_parity") in same_wording_other_domain
    assert ("digit_parity", "digit_value") in same_domain_other_wording
    assert ("photo_brightness", "photo_source") in same_domain_other_wording
    # every task shares its wording or its domain with another task
    shared = {n for pair in same_wording_other_domain + same_domain_other_wording for n in pair}
    assert shared == set(MULTIMODAL_TASK_NAMES) - {"clock_hour", "shop_tap"}


@pytest.mark.parametrize("name", MULTIMODAL_TASK_NAMES)
def test_splits_are_disjoint_by_image_and_follow_the_partition(splits, name):
    s, task = splits[name], get_multimodal_task(name)
    domain = get_domain(task.domain)
    assert s.counts() == {"train": 12, "keys": 4, "test": 20, "test_alt": 20}
    keys = {split: {r.item.key for r in s.split(split)} for split in ("train", "keys", "test")}
    assert len(keys["train"]) == 12 and len(keys["test"]) == 20  # distinct images within a split
    assert (
        not keys["train"] & keys["keys"]
        and not keys["train"] & keys["test"]
        and not keys["keys"] & keys["test"]
    )
    for split in ("train", "keys", "test"):
        assert {partition_of(domain, r.item) for r in s.split(split)} == {split}
    for test, alt in zip(s.test, s.test_alt):
        assert alt.item == test.item and alt.response == test.response
        assert alt.instruction not in {task.instruction(t, test.item) for t in task.train_templates}
    ids = [r.id for split in SPLIT_NAMES for r in s.split(split)]
    assert len(ids) == len(set(ids))
    for record in s.train + s.test:
        assert record.query.startswith("<image>\n") and record.query.count("<image>") == 1
        assert record.response in task.answers and len(record.response.split()) <= 2
        assert is_correct(name, record.response, record.response)


def test_few_class_tasks_are_balanced(splits):
    assert Counter(r.response for r in splits["digit_parity"].test) == {"even": 10, "odd": 10}
    assert Counter(r.response for r in splits["map_tap"].test) == {f"TAP({q})": 5 for q in range(1, 5)}
    assert Counter(r.response for r in splits["digit_value"].test) == {name: 2 for name in DIGIT_NAMES}
    assert Counter(r.response for r in splits["counter_value"].test) == {str(n): 2 for n in range(10)}
    weekdays = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
    assert Counter(r.response for r in splits["calendar_day"].test) == {day: 4 for day in weekdays}
    assert Counter(r.response for r in splits["calendar_tap"].test) == {f"TAP({n})": 4 for n in range(1, 6)}


def _shop_answer(record) -> str:
    """The tile whose pixels show the named item: its colour at the tile's centre, its shape from how much of
    the shape's bounding box that colour fills (square ~1, circle ~pi/4, triangle ~1/2)."""
    words = [w.strip("?.,:") for w in record.instruction.split()]
    colour = next(w for w in words if w in COLOURS)
    shape = next(w for w in words if w in ("circle", "square", "triangle"))
    image = np.asarray(record.render()).astype(int)
    tile_w, tile_h = (IMAGE_SIZE - 8) / 3, (IMAGE_SIZE - 14) / 2  # 2 px gaps, a 10 px header
    half = min(tile_w, tile_h) * 0.34
    hits = []
    for index in range(6):
        row, col = divmod(index, SHOP_COLUMNS)
        cx, cy = 2 + col * (tile_w + 2) + tile_w / 2, 10 + row * (tile_h + 2) + tile_h / 2
        box = image[round(cy - half) : round(cy + half), round(cx - half) : round(cx + half)]
        filled = float((np.abs(box - np.array(COLOURS[colour])).max(axis=2) < 60).mean())
        seen = (
            "square" if filled > 0.9 else "circle" if filled > 0.65 else "triangle" if filled > 0.3 else None
        )
        if seen == shape:
            hits.append(index + 1)
    assert len(hits) == 1, (record.id, hits)
    return format_action("TAP", hits[0])


_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")  # the calendar's cells, left to right
_SEVEN_SEGMENTS = {  # lit segments (a top, b top right, c bottom right, d bottom, e bottom left, f top left,
    "abcdef": 0,  # g middle) -> digit: the usual seven-segment font
    "bc": 1,
    "abdeg": 2,
    "abcdg": 3,
    "bcfg": 4,
    "acdfg": 5,
    "acdefg": 6,
    "abc": 7,
    "abcdefg": 8,
    "abcdfg": 9,
}


def _at(image: Image.Image, size: int) -> np.ndarray:
    """The image as the VLM sees it at ``size`` (the image processor resizes bicubic): ``[size, size, 3]``."""
    if size != IMAGE_SIZE:
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image).astype(int)


def _calendar_day(image: Image.Image, size: int = IMAGE_SIZE) -> int:
    """The highlighted cell (1-5 from the left), found by its saturated colour below the header bar: one
    narrow column of it, in one fifth of the width."""
    pixels = _at(image, size)
    scale = size / IMAGE_SIZE
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 120
    saturated[: round(12 * scale)] = False  # the header bar (10 px at 64)
    ys, xs = np.nonzero(saturated)
    assert xs.max() - xs.min() <= 12 * scale and ys.max() - ys.min() >= 40 * scale  # one tall cell
    return int(xs.mean() // (size / 5)) + 1


def _counter_digit(image: Image.Image, style, size: int = IMAGE_SIZE) -> int:
    """The digit whose segments are lit: the digit colour at each segment's middle, decoded with the usual
    seven-segment font. The digit box is 22 x 34 px at 64 px, centred at x = 32 and 6.5 px from the top,
    moved by the style's offset; strokes are 0.16 of its height."""
    pixels, scale = _at(image, size), size / IMAGE_SIZE
    dx, dy = style["offset"]
    x0, y0, w, h = 32 + dx - 11, 6.5 + dy, 22.0, 34.0
    t = 0.16 * h
    middles = {
        "a": (w / 2, t / 2),
        "b": (w - t / 2, h / 4),
        "c": (w - t / 2, 3 * h / 4),
        "d": (w / 2, h - t / 2),
        "e": (t / 2, 3 * h / 4),
        "f": (t / 2, h / 4),
        "g": (w / 2, h / 2),
    }
    ink = np.array(ACCENTS[style["ink"]])
    lit = "".join(
        segment
        for segment, (mx, my) in middles.items()
        if np.abs(pixels[int((y0 + my) * scale), int((x0 + mx) * scale)] - ink).max() < 40
    )
    assert lit in _SEVEN_SEGMENTS, lit
    return _SEVEN_SEGMENTS[lit]


def _clock_hour(image: Image.Image, style, size: int = IMAGE_SIZE) -> int:
    """The hour whose direction (30 degrees per hour, 12 up) the hour hand's accent-coloured pixels lie in,
    away from the hub. At 64 px the hand must be wide: at least 4 such pixels across for every pixel of its
    length (the hairline hand of old had under 4)."""
    pixels, scale = _at(image, size), size / IMAGE_SIZE
    accent = np.array(ACCENTS[style["hands"]])
    near = np.abs(pixels - accent).max(axis=2) < 12  # the hand's own colour, not anti-aliased ink
    cy = (IMAGE_SIZE / 2 + style["centre"][1]) * scale - 0.5  # pixel centres sit at k + 0.5
    cx = (IMAGE_SIZE / 2 + style["centre"][0]) * scale - 0.5
    ys, xs = np.nonzero(near)
    distance = np.hypot(ys - cy, xs - cx)
    reach = 0.6 * style["radius"] * scale
    far = (distance > 4 * scale) & (distance < reach + scale)  # along the hand, off the hub
    assert far.sum() >= (4 if size == IMAGE_SIZE else 0.5) * (reach - 4 * scale), far.sum()  # a wide hand
    angle = np.degrees(np.arctan2(xs[far].mean() - cx, cy - ys[far].mean())) % 360
    return round(angle / 30) % 12 or 12


def _map_quadrant(record) -> int:
    """The quadrant of the red pin's pixels."""
    image = np.asarray(record.render()).astype(int)
    red = (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)
    ys, xs = np.nonzero(red)
    return 1 + int(xs.mean() >= IMAGE_SIZE / 2) + 2 * int(ys.mean() >= IMAGE_SIZE / 2)


def test_answers_agree_with_what_the_image_shows(splits):
    """Independent references computed from pixels (or sklearn's own targets), not from the task's labels."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    for record in splits["digit_value"].test + splits["digit_parity"].test:
        digit = int(target[record.item.style["index"]])
        expected = (
            DIGIT_NAMES[digit] if record.task == "digit_value" else ("even" if digit % 2 == 0 else "odd")
        )
        assert record.response == expected
    for record in splits["shop_tap"].test:
        assert record.response == _shop_answer(record)
    for task in ("calendar_day", "calendar_tap"):
        for record in splits[task].test:
            day = _calendar_day(record.render())
            expected = _WEEKDAYS[day - 1] if task == "calendar_day" else format_action("TAP", day)
            assert record.response == expected, record.id
    for record in splits["map_tap"].test:
        assert record.response == format_action("TAP", _map_quadrant(record))
    for record in splits["photo_brightness"].test:
        level = luminance(record.render())
        assert abs(level - BRIGHTNESS_THRESHOLD) >= BRIGHTNESS_MARGIN
        assert record.response == ("bright" if level > BRIGHTNESS_THRESHOLD else "dark")
    for record in splits["photo_source"].test:
        photo = get_domain("photo")
        x, y, size = record.item.style["box"]
        from lora_retriever.tasks.multimodal.domains import _photos

        crop = _photos()[record.response][y : y + size, x : x + size]
        assert crop.shape[:2] == (size, size) and record.response == record.item.style["photo"]
        assert photo.partition(record.item) == "test"
    for record in splits["counter_value"].test:
        assert record.response == str(_counter_digit(record.render(), record.item.style)), record.id
    for record in splits["counter_parity"].test:
        digit = _counter_digit(record.render(), record.item.style)
        assert record.response == ("even" if digit % 2 == 0 else "odd"), record.id


def test_clock_hand_points_at_the_hour(splits):
    """The hour hand's accent-coloured pixels lie in the direction of the answer (30 degrees per hour)."""
    for record in splits["clock_hour"].test:
        assert record.response == str(_clock_hour(record.render(), record.item.style)), record.id


@pytest.mark.parametrize("name", ["calendar", "counter", "clock"])
def test_screens_stay_legible_at_the_vlm_input_size(name):
    """What the tasks ask about survives the bicubic resize to 32 x 32 (the built VLM's input): the same
    pixel decoders read every label of 120 random screens of each kind, at 64 and at 32 px."""
    domain, rng = get_domain(name), rng_for("legible", name)
    items = [domain.sample(rng) for _ in range(120)]
    for item in items:
        image = domain.render(item)
        for size in (IMAGE_SIZE, 32):
            if name == "calendar":
                assert _calendar_day(image, size) == item.labels["day"], (item.key, size)
                assert item.labels["weekday"] == _WEEKDAYS[item.labels["day"] - 1]
            elif name == "counter":
                assert _counter_digit(image, item.style, size) == item.labels["number"], (item.key, size)
            else:
                assert _clock_hour(image, item.style, size) == item.labels["hour"], (item.key, size)
    values = {"calendar": "day", "counter": "number", "clock": "hour"}[name]
    assert len({item.labels[values] for item in items}) == {"calendar": 5, "counter": 10, "clock": 12}[name]


@pytest.mark.parametrize("task", ["calendar_day", "calendar_tap", "counter_value"])
def test_small_screen_domains_fill_the_default_splits_with_distinct_images(task):
    """The calendar (5 cells x styles) and the one-digit counter are small domains: they still give the
    default split sizes, balanced, with no image (pixels, not only keys) in two splits."""
    s = build_image_splits(task, seed=0)
    assert s.counts() == {"train": DEFAULT_N_TRAIN, "keys": DEFAULT_N_KEYS, "test": DEFAULT_N_TEST} | {
        "test_alt": DEFAULT_N_TEST
    }
    answers = get_multimodal_task(task).answers
    for split in ("train", "keys", "test"):
        assert set(Counter(r.response for r in s.split(split))) == set(answers)
    pixels = {split: [_pixels(r.render()) for r in s.split(split)] for split in ("train", "keys", "test")}
    assert all(len(set(p)) == len(p) for p in pixels.values())  # distinct within a split
    train, keys, test = (set(p) for p in pixels.values())
    assert not train & keys and not train & test and not keys & test


# ------------------------------------------------------------------------------------------------ actions


@pytest.mark.parametrize(
    ("prediction", "reference", "expected"),
    [
        ("TAP(3)", "TAP(3)", 1.0),
        ("tap( 3 ).", "TAP(3)", 1.0),
        ("Answer: TAP(03)", "TAP(3)", 1.0),
        ("TAP(3)\nbecause the red circle is there", "TAP(3)", 1.0),  # first line counts (normalize_answer)
        ("TAP(4)", "TAP(3)", 0.0),
        ("I would TAP(3)", "TAP(3)", 0.0),
        ("TAP(3) TAP(4)", "TAP(3)", 0.0),
        ("3", "TAP(3)", 0.0),
        ("SWIPE(3)", "TAP(3)", 0.0),
        ("", "TAP(3)", 0.0),
    ],
)
def test_action_match(prediction, reference, expected):
    assert action_match(prediction, reference) == expected
    assert is_correct("shop_tap", prediction, reference) == bool(expected)


def test_action_format_and_errors():
    assert format_action("tap", 3) == "TAP(3)" and parse_action(" tap(3). ") == ("TAP", (3,))
    assert parse_action("TAP(1,2)") == ("TAP", (1, 2)) and parse_action("tap three") is None
    with pytest.raises(ValueError, match="not an action"):
        action_match("7", "7")
    with pytest.raises(ValueError, match="must be ints"):
        format_action("TAP", "3")
    assert is_correct("digit_parity", "Even.", "even") and not is_correct(
        "digit_parity", "It is even", "even"
    )
    assert is_correct("capital", "paris.", "Paris")  # the text suite is unchanged


# ------------------------------------------------------------------------------------------------ captions


def test_caption_examples_cover_every_domain_and_are_seeded():
    examples = caption_examples("train", 3 * len(DOMAIN_NAMES), seed=0)
    assert len(examples) == 3 * len(DOMAIN_NAMES)
    for image, question, answer in examples:
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        assert question.endswith("?") and "<image>" not in question and answer.strip()
    again = caption_examples("train", 3 * len(DOMAIN_NAMES), seed=0)
    assert [(_pixels(i), q, a) for i, q, a in again] == [(_pixels(i), q, a) for i, q, a in examples]
    other = caption_examples("train", 3 * len(DOMAIN_NAMES), seed=1)
    assert [_pixels(i) for i, _, _ in other] != [_pixels(i) for i, _, _ in examples]
    assert caption_domains(9, ["map", "digits"]) == ["map", "digits"] * 4 + ["map"]
    about = {
        "digits": ("digit",),
        "photo": ("photo", "lighting"),
        "clock": ("clock", "short hand"),
        "calendar": ("calendar", "cell"),
        "shop": ("tile", "How many"),
        "counter": ("display",),
        "map": ("pin",),
    }
    assert set(about) == set(DOMAIN_NAMES)
    for (_, question, _), domain in zip(examples, caption_domains(len(examples))):
        assert any(word in question for word in about[domain]), (domain, question)
    digits = caption_examples("heldout", 30, seed=0, domains=["digits"])
    assert all(q in ("What digit is this?", "Which digit is written here?") for _, q, _ in digits)
    assert {a for _, _, a in digits} <= {str(d) for d in range(10)}
    assert {"3 o'clock", "top left"} & {a for _, _, a in caption_examples("train", 200, seed=0)}
    # the counter's and the calendar's captions answer in another format than their reading tasks (the digit's
    # name, the cell's position), so the base VLM trained on them leaves those tasks' adapters work to do
    for domain, answers, task in (
        ("counter", set(DIGIT_NAMES), "counter_value"),
        ("calendar", {str(n) for n in range(1, 6)}, "calendar_day"),
    ):
        given = {a for _, _, a in caption_examples("train", 60, seed=0, domains=[domain])}
        assert given == answers and not given & set(get_multimodal_task(task).answers)


def test_caption_images_never_overlap_task_test_images():
    tasks_images = {
        split: {
            _pixels(r.render())
            for name in MULTIMODAL_TASK_NAMES
            for r in build_image_splits(name, seed, **TINY).split(split)
        }
        for seed in (0,)
        for split in ("train", "keys", "test")
    }
    n = 4 * len(DOMAIN_NAMES)
    heldout = {_pixels(i) for i, _, _ in caption_examples("heldout", n, seed=0)}
    train = {_pixels(i) for i, _, _ in caption_examples("train", n, seed=0)}
    for seed in (0, 3):  # the partition ignores seeds: no suite seed puts a caption image into its test set
        test = {
            _pixels(r.render())
            for name in MULTIMODAL_TASK_NAMES
            for r in build_image_splits(name, seed, **TINY).test
        }
        assert not heldout & test and not train & test
    assert not heldout & (tasks_images["train"] | tasks_images["keys"])
    digits_heldout = caption_examples("heldout", 400, seed=0, domains=["digits"])  # more than the partition
    assert len({_pixels(i) for i, _, _ in digits_heldout}) < 400  # cycles (reshuffled) instead of failing


def test_caption_errors():
    with pytest.raises(ValueError, match="split must be one of train, heldout, got 'test'"):
        caption_examples("test", 3)
    with pytest.raises(ValueError, match="unknown image domain 'fonts'"):
        caption_examples("train", 3, domains=["fonts"])
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        caption_examples("train", -1)


# ------------------------------------------------------------------------------------------------ writer


def test_tiny_suite_writes_fast_and_reads_back(tmp_path, suite_dir):
    started = time.perf_counter()
    write_multimodal_suite(tmp_path / "again", seed=0, **TINY)
    assert time.perf_counter() - started < 10
    manifest = json.loads((suite_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["image_size"] == IMAGE_SIZE and list(manifest["tasks"]) == list(MULTIMODAL_TASK_NAMES)
    assert {c: e["tasks"] for c, e in manifest["categories"].items()} == {
        c: list(t) for c, t in CATEGORIES.items()
    }
    for name in MULTIMODAL_TASK_NAMES:
        train = read_training_records(suite_dir / name / "train.jsonl")
        assert len(train) == TINY["n_train"] and train[0].images[0].is_file()
        assert train[0].load_images()[0].size == (IMAGE_SIZE, IMAGE_SIZE)
        assert [s for s, _ in read_sample_texts(suite_dir / name / "keys.jsonl")] == [
            f"{name}-keys-{i:04d}" for i in range(TINY["n_keys"])
        ]
        test = read_samples(suite_dir / name / "test.jsonl")
        assert [s.task for s in test] == [name] * TINY["n_test"]
        assert test[0].extra["category"] == get_multimodal_task(name).category
    mixed, alt = (
        read_samples(suite_dir / "test_mixed.jsonl"),
        read_samples(suite_dir / "test_mixed_alt.jsonl"),
    )
    assert len(mixed) == len(alt) == TINY["n_test"] * len(MULTIMODAL_TASK_NAMES)
    for a, b in zip(mixed, alt):  # aligned: the same image and answer, another wording
        assert a.images == b.images and a.response == b.response and a.query != b.query
        assert a.images[0].is_file()
    reading = read_training_records(suite_dir / "categories" / "reading" / "train.jsonl")
    assert Counter(r.id.split("-")[0] for r in reading) == {t: TINY["n_train"] for t in CATEGORIES["reading"]}
    keys = read_sample_texts(suite_dir / "categories" / "parity" / "keys.jsonl")
    assert Counter(s.split("-")[0] for s, _ in keys) == {"digit_parity": 2, "counter_parity": 2}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path, suite_dir):
    write_multimodal_suite(tmp_path / "a", seed=0, **TINY)
    assert _files(tmp_path / "a") == _files(suite_dir)
    write_multimodal_suite(tmp_path / "b", ["digit_value", "shop_tap"], seed=1, **TINY)
    b = _files(tmp_path / "b")
    assert b["images/shop_tap/test-0000.png"] != _files(suite_dir)["images/shop_tap/test-0000.png"]
    assert not any(
        str(tmp_path) in text.decode("utf-8", "replace")
        for path, text in b.items()
        if path.endswith("json") or path.endswith("jsonl")
    )


def test_writer_refuses_bad_input_and_existing_output(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ValueError, match="tasks is empty"):
        write_multimodal_suite(target, [])
    with pytest.raises(ValueError, match="more than once"):
        write_multimodal_suite(target, ["map_tap", "map_tap"])
    with pytest.raises(ValueError, match="unknown multimodal task 'capital'"):
        write_multimodal_suite(target, ["capital"])
    with pytest.raises(
        ValueError, match="domain 'digits' has \\d+ usable images in partition 'test', 5000 asked"
    ):
        write_multimodal_suite(target, ["map_tap", "digit_value"], n_test=5000)
    with pytest.raises(ValueError, match="n_train must be a non-negative int, got -1"):
        build_image_splits("map_tap", n_train=-1)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # nothing written, no staging left behind
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_multimodal_suite(target, ["map_tap"], **TINY)
    assert (target / "mine.txt").read_text() == "keep"
    write_multimodal_suite(target, ["map_tap"], overwrite=True, **TINY)
    assert not (target / "mine.txt").exists() and (target / "map_tap" / "test.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_writes_the_multimodal_suite(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [
        "--suite",
        "multimodal",
        "--out_dir",
        str(out),
        "--tasks",
        "map_tap",
        "digit_parity",
        "--n_train",
        "3",
    ]
    assert tasks_main([*argv, "--n_test", "2", "--n_keys", "2", "--quiet"]) == 0
    assert "map_tap" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["tasks"]["map_tap"]["counts"] == {"train": 3, "keys": 2, "test": 2, "test_alt": 2}
    with pytest.raises(SystemExit) as exit_info:
        tasks_main([*argv, "--quiet"])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tasks_main(
            ["--suite", "multimodal", "--out_dir", str(tmp_path / "x"), "--tasks", "capital", "--quiet"]
        )
    assert "unknown multimodal task 'capital'" in capsys.readouterr().err


class _TinyDomain:
    """A generated domain with only three distinct images (as a calendar domain is finite, only larger)."""

    name = "tiny"

    def all_items(self):
        return None

    def sample(self, rng):
        from lora_retriever.tasks.multimodal.domains import ImageItem

        value = rng.randint(0, 2)
        return ImageItem(self.name, str(value), {"value": value}, {})

    def partition(self, item):
        return "train"


def test_an_exhausted_generated_domain_stops_or_goes_round_instead_of_sampling_forever():
    from lora_retriever.tasks.multimodal.partition import draw_items, iter_partition

    once = list(iter_partition(_TinyDomain(), "train", rng_for("t")))
    assert sorted(item.key for item in once) == ["0", "1", "2"]
    cycled = iter_partition(_TinyDomain(), "train", rng_for("t"), cycle=True)
    keys = [next(cycled).key for _ in range(7)]
    assert sorted(keys[:3]) == ["0", "1", "2"] and set(keys[3:]) <= {"0", "1", "2"}
    with pytest.raises(ValueError, match=r"domain 'tiny' has 3 usable images in partition 'train', 5 asked"):
        draw_items(_TinyDomain(), "train", 5, rng_for("t"))
