"""Procedurally drawn "app screens": a clock, a calendar, a shop grid, a counter and a map with a pin.

Each screen is drawn with PIL at ``SUPERSAMPLE`` times ``IMAGE_SIZE`` and box-filtered down, so edges are
anti-aliased and thin strokes stay visible at 64 x 64. Numbers are drawn as seven-segment digits (plain
rectangles), not with a font, so the pixels don't depend on a font file or a FreeType version. Layout facts
a task relies on (tiles numbered 1-6 in reading order, map quadrants 1-4, the calendar's weekdays Monday to
Friday left to right) are constants here, named in the tasks' descriptions.

The facts a task asks about are drawn large enough for the small VLM's vision tower, which sees these images
at 32 x 32 in 8 x 8 patches (16 image tokens): the counter shows one digit as tall as its panel, the calendar
is a strip of five day cells, each about 6 px wide at 32 px, and the clock's hour hand is about 3 px wide at
32 px. (Two small digits of a 0-99 counter, the cells of a 7 x 5 month grid and a hairline hour hand were
below what that tower resolves: docs/decisions.md section 14.)
"""

from __future__ import annotations

import math
import random
from typing import Any

from PIL import Image, ImageDraw

from lora_retriever.tasks.multimodal.domains import IMAGE_SIZE, ImageDomain, ImageItem

__all__ = [
    "COLOURS",
    "QUADRANTS",
    "SHAPES",
    "SHOP_COLUMNS",
    "SHOP_ROWS",
    "WEEKDAYS",
    "CalendarDomain",
    "ClockDomain",
    "CounterDomain",
    "MapDomain",
    "ShopDomain",
]

SUPERSAMPLE = 4
CANVAS = IMAGE_SIZE * SUPERSAMPLE
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 90, 220), "yellow": (240, 190, 20)}
"""The named colours of shop items (what a question may ask for)."""
SHAPES = ("circle", "square", "triangle")
SHOP_ROWS, SHOP_COLUMNS = 2, 3  # tiles are numbered 1..6 left to right, top to bottom
QUADRANTS = {1: "top left", 2: "top right", 3: "bottom left", 4: "bottom right"}
"""Map quadrants by number (the ``TAP`` argument of the map task) and name."""
THEMES = {  # background, panel, ink
    "light": ((236, 236, 240), (255, 255, 255), (40, 40, 48)),
    "dark": ((28, 30, 36), (58, 62, 72), (225, 225, 230)),
}
ACCENTS = {"teal": (0, 150, 136), "purple": (120, 70, 190), "orange": (235, 120, 20), "slate": (90, 110, 130)}
"""Colours of header bars and other decoration (never an answer)."""
COUNTER_DIGIT = (22.0, 34.0)  # width, height of the counter's digit at IMAGE_SIZE scale
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday")
"""The calendar's day cells, left to right (cell ``n`` is ``WEEKDAYS[n - 1]``)."""

# Seven-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle).
_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abdeg",
    3: "abcdg",
    4: "bcfg",
    5: "acdfg",
    6: "acdefg",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}


def _canvas(colour: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (CANVAS, CANVAS), colour)
    return image, ImageDraw.Draw(image)


def _finish(image: Image.Image) -> Image.Image:
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _px(value: float) -> int:
    """An ``IMAGE_SIZE``-scale coordinate on the supersampled canvas."""
    return round(value * SUPERSAMPLE)


def _header(draw: ImageDraw.ImageDraw, colour: tuple[int, int, int], height: float) -> None:
    draw.rectangle([0, 0, CANVAS - 1, _px(height) - 1], fill=colour)


def draw_digit(
    draw: ImageDraw.ImageDraw, digit: int, x: float, y: float, width: float, height: float, colour
) -> None:
    """A seven-segment digit with its top-left corner at ``(x, y)`` (``IMAGE_SIZE`` scale)."""
    t = max(width, height) * 0.16  # stroke thickness
    half = height / 2
    boxes = {
        "a": (x, y, x + width, y + t),
        "b": (x + width - t, y, x + width, y + half),
        "c": (x + width - t, y + half, x + width, y + height),
        "d": (x, y + height - t, x + width, y + height),
        "e": (x, y + half, x + t, y + height),
        "f": (x, y, x + t, y + half),
        "g": (x, y + half - t / 2, x + width, y + half + t / 2),
    }
    for segment in _SEGMENTS[digit]:
        x0, y0, x1, y1 = boxes[segment]
        draw.rectangle([_px(x0), _px(y0), _px(x1) - 1, _px(y1) - 1], fill=colour)


def _key(*parts: Any) -> str:
    return ":".join(str(p) for p in parts)


# ----------------------------------------------------------------------------------------------------------


class ClockDomain(ImageDomain):
    """An analogue clock at an exact hour: a short, wide hour hand in the accent colour pointing at the hour
    (about 6 px wide and 0.6 of the radius long at 64 px, so 3 px wide where the VLM sees it at 32 px), a long
    thin minute hand in ink pointing at 12, twelve thin tick marks. Labels: ``hour`` (1-12). Style: theme,
    hand colour (an accent), radius and position."""

    name = "clock"
    description = "an analogue clock face showing a whole hour"

    def sample(self, rng: random.Random) -> ImageItem:
        style = {
            "theme": rng.choice(sorted(THEMES)),
            "hands": rng.choice(sorted(ACCENTS)),
            "radius": rng.randint(22, 28),
            "centre": [rng.randint(-3, 3), rng.randint(-3, 3)],
        }
        hour = rng.randint(1, 12)
        return ImageItem(self.name, _key(hour, *style.values()), {"hour": hour}, style)

    def render(self, item: ImageItem) -> Image.Image:
        background, panel, ink = THEMES[item.style["theme"]]
        image, draw = _canvas(background)
        r = item.style["radius"]
        cx, cy = (IMAGE_SIZE / 2 + item.style["centre"][0], IMAGE_SIZE / 2 + item.style["centre"][1])
        draw.ellipse(
            [_px(cx - r), _px(cy - r), _px(cx + r), _px(cy + r)], fill=panel, outline=ink, width=_px(1.5)
        )
        for tick in range(12):
            angle = math.radians(tick * 30)
            outer, inner = r - 1.5, r - (4.5 if tick % 3 == 0 else 3)
            draw.line(
                [_px(cx + inner * math.sin(angle)), _px(cy - inner * math.cos(angle)),
                 _px(cx + outer * math.sin(angle)), _px(cy - outer * math.cos(angle))],
                fill=ink, width=_px(0.75),
            )  # fmt: skip
        hands = ACCENTS[item.style["hands"]]
        draw.line([_px(cx), _px(cy), _px(cx), _px(cy - 0.85 * r)], fill=ink, width=_px(1))
        angle = math.radians(item.labels["hour"] % 12 * 30)
        width = 6.0
        tip = (cx + 0.6 * r * math.sin(angle), cy - 0.6 * r * math.cos(angle))
        draw.line([_px(cx), _px(cy), _px(tip[0]), _px(tip[1])], fill=hands, width=_px(width))
        for x, y, half in ((tip[0], tip[1], width / 2), (cx, cy, width / 2 + 0.5)):  # round tip, hub
            draw.ellipse([_px(x - half), _px(y - half), _px(x + half), _px(y + half)], fill=hands)
        return _finish(image)


class CalendarDomain(ImageDomain):
    """A work-week calendar: a header bar, then a strip of five large day cells side by side, Monday to
    Friday left to right (``WEEKDAYS``), exactly one highlighted. Each cell is 11 px wide and 46 px tall at
    64 px (about 6 x 23 px where the VLM sees it at 32 px). Labels: ``day`` (the highlighted cell's position,
    1-5 from the left), ``weekday`` (its name, ``"Monday"``-``"Friday"``). Style: theme, header colour (an
    accent), highlight colour (red or blue), the strip's offset (a few pixels either way)."""

    name = "calendar"
    description = "a work-week calendar (Monday to Friday) with one highlighted day"

    def sample(self, rng: random.Random) -> ImageItem:
        style = {
            "theme": rng.choice(sorted(THEMES)),
            "header": rng.choice(sorted(ACCENTS)),
            "highlight": rng.choice(("red", "blue")),
            "offset": [rng.randint(-2, 2), rng.randint(-2, 2)],
        }
        day = rng.randint(1, len(WEEKDAYS))
        labels = {"day": day, "weekday": WEEKDAYS[day - 1]}
        return ImageItem(self.name, _key(day, *style.values()), labels, style)

    def render(self, item: ImageItem) -> Image.Image:
        background, panel, ink = THEMES[item.style["theme"]]
        image, draw = _canvas(background)
        _header(draw, ACCENTS[item.style["header"]], 10)
        dx, dy = item.style["offset"]
        left, top, pitch, width, height = 2.0 + dx, 14.0 + dy, 12.0, 11.0, 46.0
        for day in range(1, len(WEEKDAYS) + 1):
            x0 = left + (day - 1) * pitch
            box = [_px(x0), _px(top), _px(x0 + width) - 1, _px(top + height) - 1]
            fill = COLOURS[item.style["highlight"]] if day == item.labels["day"] else panel
            draw.rectangle(box, fill=fill, outline=ink, width=_px(0.5))
        return _finish(image)


class ShopDomain(ImageDomain):
    """A shop: a header bar and a 2 x 3 grid of tiles, numbered 1-6 left to right, top to bottom, each
    showing one item, a coloured shape; the six items are distinct (colour, shape) pairs, so a question
    naming one has one answer. Labels: ``tiles`` (``[[colour, shape], ...]`` in tile order), ``target`` (the
    tile a question asks for, 1-6). Style: theme, header colour."""

    name = "shop"
    description = "a shop screen: a grid of six numbered tiles, each a coloured shape"

    def sample(self, rng: random.Random) -> ImageItem:
        pairs = [[colour, shape] for colour in sorted(COLOURS) for shape in SHAPES]
        tiles = rng.sample(pairs, SHOP_ROWS * SHOP_COLUMNS)
        style = {"theme": rng.choice(sorted(THEMES)), "header": rng.choice(sorted(ACCENTS))}
        target = rng.randint(1, len(tiles))
        key = _key("|".join(f"{c} {s}" for c, s in tiles), target, *style.values())
        return ImageItem(self.name, key, {"tiles": tiles, "target": target}, style)

    def render(self, item: ImageItem) -> Image.Image:
        background, panel, ink = THEMES[item.style["theme"]]
        image, draw = _canvas(background)
        _header(draw, ACCENTS[item.style["header"]], 8)
        top, gap = 10.0, 2.0
        tile_w = (IMAGE_SIZE - gap * (SHOP_COLUMNS + 1)) / SHOP_COLUMNS
        tile_h = (IMAGE_SIZE - top - gap * SHOP_ROWS) / SHOP_ROWS
        for index, (colour, shape) in enumerate(item.labels["tiles"]):
            row, col = divmod(index, SHOP_COLUMNS)
            x0, y0 = gap + col * (tile_w + gap), top + row * (tile_h + gap)
            draw.rectangle([_px(x0), _px(y0), _px(x0 + tile_w) - 1, _px(y0 + tile_h) - 1], fill=panel)
            cx, cy, half = x0 + tile_w / 2, y0 + tile_h / 2, min(tile_w, tile_h) * 0.34
            box = [_px(cx - half), _px(cy - half), _px(cx + half), _px(cy + half)]
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse(box, fill=fill)
            elif shape == "square":
                draw.rectangle(box, fill=fill)
            else:
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
        return _finish(image)


class CounterDomain(ImageDomain):
    """A counter app: a panel showing one large seven-segment digit 0-9 (22 x 34 px at 64 px, nearly the
    panel's height), with "-" and "+" buttons below. Labels: ``number`` (0-9). Style: theme, digit colour
    (an accent), offset."""

    name = "counter"
    description = "a counter app showing one digit on a seven-segment display"

    def sample(self, rng: random.Random) -> ImageItem:
        style = {
            "theme": rng.choice(sorted(THEMES)),
            "ink": rng.choice(sorted(ACCENTS)),
            "offset": [rng.randint(-4, 4), rng.randint(-2, 2)],
        }
        number = rng.randint(0, 9)
        return ImageItem(self.name, _key(number, *style.values()), {"number": number}, style)

    def render(self, item: ImageItem) -> Image.Image:
        background, panel, ink = THEMES[item.style["theme"]]
        image, draw = _canvas(background)
        dx, dy = item.style["offset"]
        draw.rectangle([_px(12 + dx), _px(3 + dy), _px(52 + dx) - 1, _px(44 + dy) - 1], fill=panel)
        width, height = COUNTER_DIGIT
        colour = ACCENTS[item.style["ink"]]
        draw_digit(draw, item.labels["number"], 32 + dx - width / 2, 6.5 + dy, width, height, colour)
        for bx, sign in ((18, "-"), (46, "+")):  # the buttons: a bar, and a cross
            draw.ellipse([_px(bx + dx - 6), _px(48), _px(bx + dx + 6), _px(60)], fill=panel, outline=ink)
            draw.rectangle([_px(bx + dx - 3.5), _px(53.5), _px(bx + dx + 3.5), _px(54.5)], fill=ink)
            if sign == "+":
                draw.rectangle([_px(bx + dx - 0.5), _px(50.5), _px(bx + dx + 0.5), _px(57.5)], fill=ink)
        return _finish(image)


class MapDomain(ImageDomain):
    """A map: land, a lake or two, two roads, and a red pin in one of four quadrants (numbered 1 top left,
    2 top right, 3 bottom left, 4 bottom right); the pin's head is at least 6 px from the middle lines.
    Labels: ``quadrant`` (1-4), ``quadrant_name``. Style: the pin's position, lakes, roads."""

    name = "map"
    description = "a map with a red pin in one of its four quadrants"

    def sample(self, rng: random.Random) -> ImageItem:
        quadrant = rng.randint(1, 4)
        row, col = divmod(quadrant - 1, 2)
        pin = [col * 32 + rng.randint(6, 25), row * 32 + rng.randint(7, 23)]  # the pin head's centre
        style = {
            "pin": pin,
            "lakes": [[rng.randint(0, 56), rng.randint(0, 56), rng.randint(8, 18), rng.randint(6, 14)]
                      for _ in range(rng.randint(1, 2))],
            "roads": [rng.randint(4, 60) for _ in range(4)],
        }  # fmt: skip
        labels = {"quadrant": quadrant, "quadrant_name": QUADRANTS[quadrant]}
        return ImageItem(self.name, _key(quadrant, *style.values()), labels, style)

    def render(self, item: ImageItem) -> Image.Image:
        image, draw = _canvas((200, 225, 180))
        for x, y, w, h in item.style["lakes"]:
            draw.ellipse([_px(x), _px(y), _px(x + w), _px(y + h)], fill=(150, 195, 235))
        a, b, c, d = item.style["roads"]
        draw.line([_px(0), _px(a), _px(IMAGE_SIZE), _px(b)], fill=(250, 250, 250), width=_px(2))
        draw.line([_px(c), _px(0), _px(d), _px(IMAGE_SIZE)], fill=(250, 250, 250), width=_px(2))
        x, y = item.style["pin"]  # the head's centre; the point sits 8 px below it
        draw.polygon(
            [(_px(x), _px(y + 8)), (_px(x - 3), _px(y + 2)), (_px(x + 3), _px(y + 2))], fill=(200, 30, 30)
        )
        draw.ellipse([_px(x - 4), _px(y - 4), _px(x + 4), _px(y + 4)], fill=(200, 30, 30))
        draw.ellipse([_px(x - 1.5), _px(y - 1.5), _px(x + 1.5), _px(y + 1.5)], fill=(255, 255, 255))
        return _finish(image)
