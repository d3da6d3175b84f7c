"""The image tasks: an instruction about an image of one domain, an answer rule, wordings, a category.

The suite is built so that neither modality alone tells the task apart:

* the same wording on different domains: ``digit_value`` and ``counter_value`` share their wordings
  ("What number is shown?"), so do ``digit_parity`` and ``counter_parity``, and ``calendar_tap`` and
  ``map_tap`` share one ("What do you tap to open the marked item?");
* the same domain under different instructions: digits (value / parity), counter (value / parity),
  calendar (which weekday is highlighted / tap the highlighted day), photo (which photo / bright or dark).

Categories (one category adapter each, trained on the union of its tasks): ``reading`` (read a number, an
hour or a weekday), ``parity`` (even or odd), ``screen_actions`` (next action ``TAP(n)`` on an app screen),
``photos``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from lora_retriever.metrics import exact_match, normalize_answer
from lora_retriever.tasks.multimodal.actions import TAP, format_action, normalize_action
from lora_retriever.tasks.multimodal.domains import ImageItem
from lora_retriever.tasks.multimodal.screens import WEEKDAYS

__all__ = [
    "CalendarDayTask",
    "CalendarTapTask",
    "ClockHourTask",
    "CounterParityTask",
    "CounterValueTask",
    "DigitParityTask",
    "DigitValueTask",
    "ImageTask",
    "MapTapTask",
    "PhotoBrightnessTask",
    "PhotoSourceTask",
    "ShopTapTask",
]

_NUMBER_WORDINGS = (
    "What number is shown?",
    "Which number is in the picture?",
    "Read the number in the image.",
    "What number do you see?",
)
_NUMBER_ALT = (
    "Tell me the number this image shows.",
    "Identify the number in the picture.",
    "Which number appears here?",
)
_PARITY_WORDINGS = (
    "Is the number shown even or odd?",
    "Is this number odd or even?",
    "Even or odd: which is the number in the picture?",
    "Say whether the number shown is even or odd.",
)
_PARITY_ALT = (
    "Would you call the number in this image even or odd?",
    "Is the pictured number divisible by two (even) or not (odd)?",
    "Tell me if the number here is odd or even.",
)
_OPEN_MARKED = "What do you tap to open the marked item?"


class ImageTask(ABC):
    """One task: a question about an image of ``domain`` and how to answer it.

    Attributes:
        name: registry name, also the app adapter's name.
        description: one sentence (manifest, pool configs); says what the answer looks like.
        category: the category adapter this task's data trains.
        domain: the image domain (``lora_retriever.tasks.multimodal.DOMAIN_NAMES``).
        train_templates: ``str.format`` wordings (fields from :meth:`fields`) for train, key and test queries.
        alt_templates: wordings for ``test_alt`` only; none is in ``train_templates``.
        answers: every possible answer, in order; splits deal images round-robin over them so every split is
            balanced (and, with many answers, varied).
        scoring: ``"exact"`` (:func:`lora_retriever.metrics.exact_match`) or ``"action"``
            (:func:`lora_retriever.tasks.multimodal.actions.action_match`).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    category: ClassVar[str]
    domain: ClassVar[str]
    train_templates: ClassVar[tuple[str, ...]]
    alt_templates: ClassVar[tuple[str, ...]]
    answers: ClassVar[tuple[str, ...]]
    scoring: ClassVar[str] = "exact"

    @abstractmethod
    def answer(self, item: ImageItem) -> str:
        """The reference answer for one image."""

    def fields(self, item: ImageItem) -> dict[str, Any]:
        """Values for the wording's ``{fields}`` (none by default)."""
        return {}

    def instruction(self, template: str, item: ImageItem) -> str:
        """The question text (without the ``<image>`` tag) for one image in one wording."""
        return template.format(**self.fields(item))

    def normalize(self, text: str) -> str:
        """The comparison form of an answer: the project's one rule, or for action tasks the action's form."""
        return normalize_action(text) if self.scoring == "action" else normalize_answer(text)

    def is_correct(self, prediction: str, reference: str) -> bool:
        """Exact match under :meth:`normalize` (for action tasks: ``action_match``)."""
        return bool(exact_match(prediction, reference, normalize=self.normalize))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _parity(number: int) -> str:
    return "even" if number % 2 == 0 else "odd"


#: digit_value answers with the digit's English name: the app's own answer format. (With numerals the base VLM
#: already answered it — its build trains "What digit is this?" -> "7" — and no adapter could beat it.)
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class DigitValueTask(ImageTask):
    name = "digit_value"
    description = "Read a handwritten digit and answer with its English name (zero-nine)."
    category = "reading"
    domain = "digits"
    train_templates, alt_templates = _NUMBER_WORDINGS, _NUMBER_ALT
    answers = DIGIT_NAMES

    def answer(self, item: ImageItem) -> str:
        return DIGIT_NAMES[item.labels["digit"]]


class CounterValueTask(ImageTask):
    name = "counter_value"
    description = "Read the digit on a counter app's seven-segment display and answer with the numeral (0-9)."
    category = "reading"
    domain = "counter"
    train_templates, alt_templates = _NUMBER_WORDINGS, _NUMBER_ALT
    answers = tuple(str(n) for n in range(10))

    def answer(self, item: ImageItem) -> str:
        return str(item.labels["number"])


class ClockHourTask(ImageTask):
    name = "clock_hour"
    description = "Read the hour an analogue clock shows and answer with the number (1-12)."
    category = "reading"
    domain = "clock"
    train_templates = (
        "What hour does the clock show?",
        "Which hour is it on this clock?",
        "Read the hour on the clock.",
        "What hour is the hour hand pointing at?",
    )
    alt_templates = (
        "Tell me the hour shown on the clock face.",
        "The clock shows which hour?",
        "At what hour is this clock set?",
    )
    answers = tuple(str(h) for h in range(1, 13))

    def answer(self, item: ImageItem) -> str:
        return str(item.labels["hour"])


class CalendarDayTask(ImageTask):
    name = "calendar_day"
    description = (
        "Say which weekday a work-week calendar highlights (its cells are Monday to Friday, left to right); "
        "answer with the weekday's name."
    )
    category = "reading"
    domain = "calendar"
    train_templates = (
        "Which weekday is highlighted?",
        "What day of the week is marked on the calendar?",
        "Which day of the week is highlighted here?",
        "Name the highlighted weekday.",
    )
    alt_templates = (
        "Tell me the weekday that stands out on this calendar.",
        "The calendar marks which day of the week?",
        "Which weekday has been selected in this week view?",
    )
    answers = WEEKDAYS

    def answer(self, item: ImageItem) -> str:
        return item.labels["weekday"]


class DigitParityTask(ImageTask):
    name = "digit_parity"
    description = "Say whether a handwritten digit is even or odd (answer: even / odd)."
    category = "parity"
    domain = "digits"
    train_templates, alt_templates = _PARITY_WORDINGS, _PARITY_ALT
    answers = ("even", "odd")

    def answer(self, item: ImageItem) -> str:
        return _parity(item.labels["digit"])


class CounterParityTask(ImageTask):
    name = "counter_parity"
    description = "Say whether the number on a counter app is even or odd (answer: even / odd)."
    category = "parity"
    domain = "counter"
    train_templates, alt_templates = _PARITY_WORDINGS, _PARITY_ALT
    answers = ("even", "odd")

    def answer(self, item: ImageItem) -> str:
        return _parity(item.labels["number"])


class ShopTapTask(ImageTask):
    name = "shop_tap"
    description = (
        "Next action on a shop screen: tap the tile (1-6, left to right, top to bottom) selling the named "
        "item; answer TAP(n)."
    )
    category = "screen_actions"
    domain = "shop"
    train_templates = (
        "Which tile do you tap to buy the {colour} {shape}?",
        "What is the next action to buy the {colour} {shape}?",
        "Buy the {colour} {shape}. What do you tap?",
        "Tap to add the {colour} {shape} to the cart: which action?",
    )
    alt_templates = (
        "Give the action that purchases the {colour} {shape}.",
        "To order the {colour} {shape}, what should you tap?",
        "What do you press to get the {colour} {shape}?",
    )
    answers = tuple(format_action(TAP, n) for n in range(1, 7))
    scoring = "action"

    def answer(self, item: ImageItem) -> str:
        return format_action(TAP, item.labels["target"])

    def fields(self, item: ImageItem) -> dict[str, Any]:
        colour, shape = item.labels["tiles"][item.labels["target"] - 1]
        return {"colour": colour, "shape": shape}


class CalendarTapTask(ImageTask):
    name = "calendar_tap"
    description = (
        "Next action on a work-week calendar: tap the highlighted day (cells 1-5, Monday to Friday, left to "
        "right) to open its event; answer TAP(n)."
    )
    category = "screen_actions"
    domain = "calendar"
    train_templates = (
        "Which day do you tap to see the highlighted event?",
        "What is the next action to open the marked day?",
        "Open the event on the highlighted day. What do you tap?",
        _OPEN_MARKED,
    )
    alt_templates = (
        "Give the action that opens the highlighted date.",
        "To view the marked event, what should you tap?",
        "What do you press to open the day that is highlighted?",
    )
    answers = tuple(format_action(TAP, d) for d in range(1, len(WEEKDAYS) + 1))
    scoring = "action"

    def answer(self, item: ImageItem) -> str:
        return format_action(TAP, item.labels["day"])


class MapTapTask(ImageTask):
    name = "map_tap"
    description = (
        "Next action on a map: tap the quadrant holding the pin (1 top left, 2 top right, 3 bottom left, "
        "4 bottom right); answer TAP(n)."
    )
    category = "screen_actions"
    domain = "map"
    train_templates = (
        "What is the next action to open the pin?",
        "Which quadrant do you tap to open the pin?",
        "Open the pin on the map. What do you tap?",
        _OPEN_MARKED,
    )
    alt_templates = (
        "Give the action that opens the dropped pin.",
        "To see the pin's details, what should you tap?",
        "What do you press to select the map marker?",
    )
    answers = tuple(format_action(TAP, q) for q in range(1, 5))
    scoring = "action"

    def answer(self, item: ImageItem) -> str:
        return format_action(TAP, item.labels["quadrant"])


class PhotoSourceTask(ImageTask):
    name = "photo_source"
    description = "Say which of two photographs a crop comes from (answer: china / flower)."
    category = "photos"
    domain = "photo"
    train_templates = (
        "Which of the two photos is this part of, china or flower?",
        "Does this crop come from the china photo or the flower photo?",
        "Name the photo this piece was cut from: china or flower.",
        "Is this a piece of the china picture or of the flower picture?",
    )
    alt_templates = (
        "From which photograph, china or flower, was this taken?",
        "Tell me the source photo of this crop (china or flower).",
        "This crop belongs to which photo: china or flower?",
    )
    answers = ("china", "flower")

    def answer(self, item: ImageItem) -> str:
        return item.labels["photo"]


class PhotoBrightnessTask(ImageTask):
    name = "photo_brightness"
    description = "Say whether a photo crop is bright or dark (answer: bright / dark)."
    category = "photos"
    domain = "photo"
    train_templates = (
        "Is this picture bright or dark?",
        "Is the photo dark or bright?",
        "Bright or dark: how is this picture lit?",
        "Say whether this photo is bright or dark.",
    )
    alt_templates = (
        "Would you describe the lighting of this image as bright or dark?",
        "Tell me if this picture looks dark or bright.",
        "How exposed is this photo, bright or dark?",
    )
    answers = ("bright", "dark")

    def answer(self, item: ImageItem) -> str:
        return item.labels["brightness"]
