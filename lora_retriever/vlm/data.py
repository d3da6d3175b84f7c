"""The build's examples: ``(image, question, answer)`` triples of every image domain, with each one's domain.

They come from ``lora_retriever.tasks.multimodal.caption_examples``: ``"train"`` draws only images of the
suite's train partition, ``"heldout"`` only images that no task split uses, so the held-out accuracy is
honest. The triples are requested domain by domain, so each one's domain is known (for per-domain accuracy),
in the shares the recipe's ``domain_weights`` ask for, and interleaved, so any prefix of the list keeps those
shares.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["CaptionData", "caption_data"]


@dataclass(frozen=True)
class CaptionData:
    """Triples and the image domain of each (``len(domains) == len(examples)``)."""

    examples: list[tuple[Any, str, str]]
    domains: list[str]


def caption_data(split: str, n: int, seed: int, weights: Mapping[str, float] | None = None) -> CaptionData:
    """``n`` triples of ``split`` (``"train"`` or ``"heldout"``) over the suite's image domains.

    Args:
        split: ``"train"`` or ``"heldout"``.
        n: number of triples.
        seed: the draw's seed.
        weights: ``{domain: weight}``; a domain's share of ``n`` is proportional to its weight (default 1).
            The triples are interleaved so that every prefix keeps these shares.

    Raises:
        ValueError: an unknown split, a negative ``n`` (from ``caption_examples``), or a weight for a domain
            the suite doesn't have.
    """
    from lora_retriever.tasks.multimodal import DOMAIN_NAMES, caption_examples

    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(DOMAIN_NAMES))
    if unknown:
        raise ValueError(
            f"domain_weights names unknown domain(s) {unknown}; the domains are {list(DOMAIN_NAMES)}."
        )
    shares = {name: weights.get(name, 1.0) for name in DOMAIN_NAMES}
    counts = _apportion(n, shares)
    per_domain = {name: caption_examples(split, counts[name], seed, domains=[name]) for name in DOMAIN_NAMES}
    # Item k of a domain with c items sits at (k + 0.5) / c of the list: every prefix keeps the shares.
    order = sorted(
        ((index + 0.5) / len(items), rank, name, index)
        for rank, (name, items) in enumerate(per_domain.items())
        for index in range(len(items))
    )
    return CaptionData(
        [per_domain[name][index] for _, _, name, index in order], [name for _, _, name, _ in order]
    )


def _apportion(n: int, shares: Mapping[str, float]) -> dict[str, int]:
    """``n`` split in proportion to ``shares`` (largest remainders; the counts add up to ``n``)."""
    total = sum(shares.values())
    exact = {name: n * share / total for name, share in shares.items()}
    counts = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(shares, key=lambda name: (counts[name] - exact[name], list(shares).index(name)))
    for name in by_remainder[: n - sum(counts.values())]:
        counts[name] += 1
    return counts
