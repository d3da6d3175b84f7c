"""The image domains by name: ``DOMAIN_NAMES`` and ``get_domain(name)``."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from lora_retriever.tasks.multimodal.domains import DigitsDomain, ImageDomain, PhotoDomain
from lora_retriever.tasks.multimodal.screens import (
    CalendarDomain,
    ClockDomain,
    CounterDomain,
    MapDomain,
    ShopDomain,
)

__all__ = ["DOMAINS", "DOMAIN_NAMES", "get_domain"]

DOMAINS: Mapping[str, type[ImageDomain]] = MappingProxyType(
    {
        cls.name: cls
        for cls in (
            DigitsDomain,
            PhotoDomain,
            ClockDomain,
            CalendarDomain,
            ShopDomain,
            CounterDomain,
            MapDomain,
        )
    }
)
DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS)


def get_domain(domain: str | ImageDomain) -> ImageDomain:
    """The domain called ``domain`` (an :class:`ImageDomain` is returned as it is).

    Raises:
        ValueError: no domain of that name (the message lists the known ones).
    """
    if isinstance(domain, ImageDomain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown image domain {domain!r}; known domains: {', '.join(DOMAIN_NAMES)}")
    return DOMAINS[domain]()
