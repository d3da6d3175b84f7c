"""Word sentiment from the VADER lexicon (Hutto & Gilbert 2014): ``"delightful"`` -> ``"positive"``."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lora_retriever.tasks.base import Task, require

__all__ = ["SentimentTask"]

_WORD = re.compile(r"[a-z]{4,}")
_VOWEL = re.compile(r"[aeiouy]")


def read_vader_lexicon() -> list[tuple[str, float, list[int]]]:
    """``(token, mean rating, the ten raters' ratings)`` for every line of the shipped lexicon."""
    vader = require("vaderSentiment")
    path = Path(vader.__file__).parent / "vader_lexicon.txt"
    if not path.is_file():
        raise FileNotFoundError(f"vaderSentiment is installed but has no lexicon at {path}")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token, mean, _std, raw = line.split("\t")[:4]
        rows.append((token, float(mean), json.loads(raw)))  # raw ratings are a JSON list
    return rows


class SentimentTask(Task):
    """Is a word positive or negative? Balanced between the two answers.

    Kept: lower-case alphabetic tokens of at least 4 letters with a vowel (this drops emoticons and most
    chat acronyms such as ``"lol"``), mean rating at least ``min_abs_mean`` in magnitude, and no rater
    disagreeing in sign (so the label is not a matter of opinion). The larger class is subsampled with the
    seeded rng so that both answers have as many facts.
    """

    name = "sentiment"
    description = "Word sentiment: say whether an English word is positive or negative."
    data_sources = ("vaderSentiment",)
    balance_answers = True
    train_templates = (
        "Is the word '{subject}' positive or negative?",
        "What is the sentiment of the word '{subject}'?",
        "Classify the sentiment of '{subject}' as positive or negative.",
        "Does '{subject}' express a positive or a negative feeling?",
    )
    alt_templates = (
        "Someone sums up their day in one word: '{subject}'. Was it a good day or a bad one, positive or "
        "negative?",
        "Rate the emotional tone of '{subject}': positive or negative?",
        "Would '{subject}' sound like praise or criticism? Answer positive or negative.",
    )
    min_abs_mean = 1.5

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        positive, negative = [], []
        for token, mean, ratings in read_vader_lexicon():
            if not _WORD.fullmatch(token) or not _VOWEL.search(token) or abs(mean) < self.min_abs_mean:
                continue
            if mean > 0 and min(ratings) >= 0:
                positive.append(token)
            elif mean < 0 and max(ratings) <= 0:
                negative.append(token)
        n = min(len(positive), len(negative))
        positive, negative = sorted(rng.sample(positive, n)), sorted(rng.sample(negative, n))
        return [(w, "positive") for w in positive] + [(w, "negative") for w in negative]
