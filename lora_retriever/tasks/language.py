"""Tasks on CLDR names (via babel): English -> French country names, and language identification."""

from __future__ import annotations

import random
from collections import defaultdict

from lora_retriever.metrics import normalize_answer
from lora_retriever.tasks.base import Task, require

__all__ = ["FrenchCountryTask", "LanguageIdTask"]

# CLDR territory codes that are not places (unions, pseudo-locales, "Unknown Region").
_NOT_PLACES = frozenset({"EU", "EZ", "UN", "QO", "XA", "XB", "ZZ"})


def _locale(code: str):
    return require("babel").Locale(code)


def _place_codes(locale) -> list[str]:
    """Two-letter codes of countries and territories (numeric codes are regions such as ``"150"``)."""
    return sorted(c for c in locale.territories if len(c) == 2 and c.isalpha() and c not in _NOT_PLACES)


class FrenchCountryTask(Task):
    """English country name -> its French name, e.g. ``"Germany"`` -> ``"Allemagne"``.

    Names spelled the same in both languages (``"Canada"``) are skipped: there is nothing to translate.
    Accent-only differences (``"Benin"`` -> ``"Bénin"``) are kept; accents count in the answer.
    """

    name = "fr_country"
    description = "Translation: give the French name of a country or territory given in English."
    data_sources = ("babel",)
    train_templates = (
        "How do you say {subject} in French?",
        "Translate the country name {subject} into French.",
        "What is the French name of {subject}?",
        "Give the French name for {subject}.",
    )
    alt_templates = (
        "A French atlas lists {subject} under which name?",
        "In French, {subject} is called what?",
        "My pen pal in Lyon asked where I'm going on holiday: {subject}. How do I write it in French?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        en, fr = _locale("en"), _locale("fr")
        items = []
        for code in _place_codes(en):
            english, french = en.territories[code], fr.territories.get(code)
            if french and normalize_answer(english) != normalize_answer(french):
                items.append((english, french))
        return items


class LanguageIdTask(Task):
    """A CLDR name (weekday, month or country) in one of six languages -> that language's English name.

    ``"mercredi"`` -> ``"French"``. A name written the same in two of the languages (``"Argentina"`` is
    Spanish, Italian and Portuguese) or the same as an English name is dropped as ambiguous. Balanced
    across the languages.
    """

    name = "language_id"
    description = "Language identification: say which language (French, German, Spanish, ...) a word is in."
    data_sources = ("babel",)
    balance_answers = True
    languages = ("fr", "de", "es", "it", "nl", "pt")
    max_subject_words = 3
    train_templates = (
        "Which language is '{subject}' in?",
        "What language does '{subject}' come from?",
        "Identify the language of '{subject}'.",
        "In which language is '{subject}' written?",
    )
    alt_templates = (
        "A sign in a train station reads '{subject}'. What language is it in?",
        "Name the language of this text: {subject}",
        "I heard a tourist say '{subject}'. Which language were they speaking?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        en = _locale("en")
        english_names = {normalize_answer(n) for n in self._names(en)}
        languages_of: dict[str, set[str]] = defaultdict(set)
        spelling: dict[str, str] = {}
        for code in self.languages:
            for word in self._names(_locale(code)):
                key = normalize_answer(word)
                languages_of[key].add(code)
                spelling.setdefault(key, word)
        return [
            (spelling[key], en.languages[next(iter(codes))])
            for key, codes in sorted(languages_of.items())
            if len(codes) == 1 and key not in english_names and len(key.split()) <= self.max_subject_words
        ]

    @staticmethod
    def _names(locale) -> list[str]:
        months = list(locale.months["format"]["wide"].values())
        days = list(locale.days["format"]["wide"].values())
        return (
            months + days + [locale.territories[c] for c in _place_codes(locale) if c in locale.territories]
        )
