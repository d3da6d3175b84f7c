"""Sentiment tasks on the VADER lexicon (Hutto & Gilbert 2014), the ``sentiment`` cluster.

A word's sentiment (``"delightful"`` -> ``"positive"``), the sentiment of a sentence built around such a
word, and which of two words is the positive one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from lora_retriever.tasks.base import Task, require

__all__ = ["PositiveWordTask", "SentenceSentimentTask", "SentimentTask", "polar_words"]

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
    cluster = "sentiment"
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
        positive, negative = polar_words(rng, self.min_abs_mean)
        return [(w, "positive") for w in positive] + [(w, "negative") for w in negative]


def polar_words(rng: random.Random, min_abs_mean: float) -> tuple[list[str], list[str]]:
    """Equally many clearly positive and clearly negative lexicon words (see :class:`SentimentTask`), each
    list sorted; the larger class is subsampled with ``rng``."""
    positive, negative = [], []
    for token, mean, ratings in read_vader_lexicon():
        if not _WORD.fullmatch(token) or not _VOWEL.search(token) or abs(mean) < min_abs_mean:
            continue
        if mean > 0 and min(ratings) >= 0:
            positive.append(token)
        elif mean < 0 and max(ratings) <= 0:
            negative.append(token)
    n = min(len(positive), len(negative))
    return sorted(rng.sample(positive, n)), sorted(rng.sample(negative, n))


class SentenceSentimentTask(Task):
    """Is a short sentence positive or negative? Each sentence reports a one-word verdict (a word of
    :class:`SentimentTask`'s kind) in one of a few frames drawn with the seeded rng, so its sentiment is the
    word's. Each word is used once; balanced between the two answers."""

    name = "sentence_sentiment"
    cluster = "sentiment"
    description = "Sentence sentiment: say whether a short English sentence is positive or negative."
    data_sources = ("vaderSentiment",)
    balance_answers = True
    min_abs_mean = SentimentTask.min_abs_mean
    frames = (
        "Asked about the trip, she answered with one word: '{word}'.",
        "The one-word review of the restaurant read '{word}'.",
        "His text after the match just said '{word}'.",
        "The customer's feedback form said only '{word}'.",
        "Summing up the new album in a word, the critic chose '{word}'.",
        "All my neighbour said about the concert was '{word}'.",
    )
    train_templates = (
        "Is this sentence positive or negative? {subject}",
        "What is the sentiment of the following sentence? {subject}",
        "Classify the sentiment of this sentence as positive or negative: {subject}",
        "Sentence: {subject} Sentiment (positive or negative):",
    )
    alt_templates = (
        "Read this and tell me whether the speaker was pleased or not (positive or negative): {subject}",
        "Here is a line from a chat log: {subject} Is its tone positive or negative?",
        "Judge the mood of the following report, positive or negative. {subject}",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        positive, negative = polar_words(rng, self.min_abs_mean)
        return [
            (rng.choice(self.frames).format(word=word), answer)
            for words, answer in ((positive, "positive"), (negative, "negative"))
            for word in words
        ]


class PositiveWordTask(Task):
    """Of two words, one clearly positive and one clearly negative, which is the positive one? Each word is
    used in one pair; the pairs and the order within each pair are drawn with the seeded rng. Subjects read
    ``"<a> or <b>"``; the answer is the positive word itself."""

    name = "positive_word"
    cluster = "sentiment"
    description = "Word sentiment: of two English words, pick the positive one."
    data_sources = ("vaderSentiment",)
    min_abs_mean = SentimentTask.min_abs_mean
    max_answer_words = 1
    train_templates = (
        "Which of these two words is positive: '{a}' or '{b}'?",
        "Pick the positive word: '{a}' or '{b}'.",
        "Of '{a}' and '{b}', which word has a positive meaning?",
        "Which word is positive, '{a}' or '{b}'?",
    )
    alt_templates = (
        "I want to compliment a friend. Should I use '{a}' or '{b}'?",
        "One of '{a}' and '{b}' sounds like praise. Which one?",
        "Choose the word with the happier meaning: '{a}' or '{b}'.",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        positive, negative = polar_words(rng, self.min_abs_mean)
        rng.shuffle(positive)
        rng.shuffle(negative)
        items = []
        for good, bad in zip(positive, negative):
            a, b = (good, bad) if rng.random() < 0.5 else (bad, good)
            items.append((f"{a} or {b}", good))
        return items

    def render(self, template: str, subject: str) -> str:
        a, b = self._words(subject)
        return template.format(a=a, b=b, subject=subject)

    def _words(self, subject: str) -> tuple[str, str]:
        words = subject.split(" or ")
        if len(words) != 2:
            raise ValueError(f"positive_word subject must look like '<word> or <word>', got {subject!r}")
        return words[0], words[1]
