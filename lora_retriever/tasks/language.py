"""Tasks on CLDR names (via babel).

Cluster ``translation``: a country's name from English into French, German and Spanish, and from French into
English. Cluster ``languages``: which language a word is in, a language's ISO 639-1 code, and a language's
name in French.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import ClassVar

from lora_retriever.metrics import normalize_answer
from lora_retriever.tasks.base import Task, require

__all__ = [
    "CountryFromFrenchTask",
    "CountryTranslationTask",
    "FrenchCountryTask",
    "FrenchLanguageTask",
    "GermanCountryTask",
    "LanguageCodeTask",
    "LanguageIdTask",
    "SpanishCountryTask",
]

# CLDR territory codes that are not places (unions, pseudo-locales, "Unknown Region").
_NOT_PLACES = frozenset({"EU", "EZ", "UN", "QO", "XA", "XB", "ZZ"})


def _locale(code: str):
    return require("babel").Locale(code)


def _place_codes(locale) -> list[str]:
    """Two-letter codes of countries and territories (numeric codes are regions such as ``"150"``)."""
    return sorted(c for c in locale.territories if len(c) == 2 and c.isalpha() and c not in _NOT_PLACES)


class CountryTranslationTask(Task):
    """A country's CLDR name in ``source`` -> its name in ``target``. Names spelled the same in both languages
    (``"Canada"``) are skipped: there is nothing to translate. Accent-only differences (``"Benin"`` ->
    ``"Bénin"``) are kept; accents count in the answer."""

    cluster = "translation"
    data_sources = ("babel",)
    source: ClassVar[str] = "en"
    target: ClassVar[str]

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        source, target = _locale(self.source), _locale(self.target)
        items = []
        for code in _place_codes(source):
            name, translated = source.territories[code], target.territories.get(code)
            if translated and normalize_answer(name) != normalize_answer(translated):
                items.append((name, translated))
        return items


class FrenchCountryTask(CountryTranslationTask):
    """English country name -> its French name, e.g. ``"Germany"`` -> ``"Allemagne"``."""

    name = "fr_country"
    description = "Translation: give the French name of a country or territory given in English."
    target = "fr"
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


class GermanCountryTask(CountryTranslationTask):
    """English country name -> its German name, e.g. ``"France"`` -> ``"Frankreich"``."""

    name = "de_country"
    description = "Translation: give the German name of a country or territory given in English."
    target = "de"
    train_templates = (
        "How do you say {subject} in German?",
        "Translate the country name {subject} into German.",
        "What is the German name of {subject}?",
        "Give the German name for {subject}.",
    )
    alt_templates = (
        "A German atlas lists {subject} under which name?",
        "In German, {subject} is called what?",
        "My pen pal in Munich asked where I'm going on holiday: {subject}. How do I write it in German?",
    )


class SpanishCountryTask(CountryTranslationTask):
    """English country name -> its Spanish name, e.g. ``"Germany"`` -> ``"Alemania"``."""

    name = "es_country"
    description = "Translation: give the Spanish name of a country or territory given in English."
    target = "es"
    train_templates = (
        "How do you say {subject} in Spanish?",
        "Translate the country name {subject} into Spanish.",
        "What is the Spanish name of {subject}?",
        "Give the Spanish name for {subject}.",
    )
    alt_templates = (
        "A Spanish atlas lists {subject} under which name?",
        "In Spanish, {subject} is called what?",
        "My pen pal in Seville asked where I'm going on holiday: {subject}. How do I write it in Spanish?",
    )


class CountryFromFrenchTask(CountryTranslationTask):
    """French country name -> its English name, e.g. ``"Allemagne"`` -> ``"Germany"`` (``fr_country``
    backwards)."""

    name = "country_from_fr"
    description = "Translation: give the English name of a country or territory given in French."
    source, target = "fr", "en"
    train_templates = (
        "What is the English name of the country '{subject}'?",
        "Translate the French country name '{subject}' into English.",
        "'{subject}' is French for which country?",
        "Give the English for the French country name '{subject}'.",
    )
    alt_templates = (
        "A French atlas has a page headed '{subject}'. What is that place called in English?",
        "My pen pal in Lyon wrote that she lives in '{subject}'. Which country is that, in English?",
        "Render '{subject}' (a place name in French) in English.",
    )


class LanguageIdTask(Task):
    """A CLDR name (weekday, month or country) in one of six languages -> that language's English name.

    ``"mercredi"`` -> ``"French"``. A name written the same in two of the languages (``"Argentina"`` is
    Spanish, Italian and Portuguese) or the same as an English name is dropped as ambiguous. Balanced
    across the languages.
    """

    name = "language_id"
    cluster = "languages"
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


def _language_names() -> dict[str, str]:
    """English names of the languages with a two-letter ISO 639-1 code, by code."""
    return {code: name for code, name in _locale("en").languages.items() if len(code) == 2 and code.isalpha()}


class LanguageCodeTask(Task):
    """A language's English name -> its two-letter ISO 639-1 code (``"German"`` -> ``"de"``)."""

    name = "language_code"
    cluster = "languages"
    description = "Language codes: give the two-letter ISO 639-1 code of a language named in English."
    data_sources = ("babel",)
    train_templates = (
        "What is the ISO 639-1 code of {subject}?",
        "Give the two-letter language code for {subject}.",
        "Which two-letter code stands for the {subject} language?",
        "What is the language code of {subject}?",
    )
    alt_templates = (
        "A website's language menu abbreviates {subject} in two letters. Which ones?",
        "Which two letters tag {subject} text in an HTML lang attribute?",
        "Translators label files written in {subject} with which ISO abbreviation?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(name, code) for code, name in _language_names().items()]


class FrenchLanguageTask(Task):
    """A language's English name -> its French name (``"German"`` -> ``"allemand"``); names spelled the same
    in both (``"swahili"``) are skipped."""

    name = "fr_language"
    cluster = "languages"
    description = "Languages: give the French name of a language named in English."
    data_sources = ("babel",)
    train_templates = (
        "What is the French word for the {subject} language?",
        "How do you say the language name {subject} in French?",
        "Translate the language name {subject} into French.",
        "What is {subject}, the language, called in French?",
    )
    alt_templates = (
        "A French course catalogue lists classes in {subject}. Under which name?",
        "In Paris, someone asks which language you speak: {subject}. What do you answer in French?",
        "Give the French term a dictionary uses for the {subject} language.",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        french = _locale("fr").languages
        return [
            (name, french[code])
            for code, name in _language_names().items()
            if code in french and normalize_answer(name) != normalize_answer(french[code])
        ]
