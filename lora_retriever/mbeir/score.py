"""UniIR's scores for ranked candidate lists.

* **Recall@k** (M-BEIR's, UniIR §5.1): the share of queries with at least one positive among their top ``k``
  candidates.
* **Modality violation@k**: the share of the top-``k`` results (over all queries of a task) whose modality is
  not the task's candidate modality — what a universal retriever does wrong in a global pool that mixes
  modalities (UniIR §5.3: e.g. a text-to-image query that returns captions).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["modality_violation", "recall_at_k"]


def _check(ranked: Sequence[Sequence[str]], k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if not ranked:
        raise ValueError("no ranked lists to score; give one list per query")


def recall_at_k(ranked: Sequence[Sequence[str]], positives: Sequence[Sequence[str]], k: int) -> float:
    """The share of queries with a positive in their top ``k``.

    Args:
        ranked: per query, candidate ids best first.
        positives: per query, its positive ids.
        k: the cut-off.

    Raises:
        ValueError: ``k < 1``, no queries, or lists of different lengths.
    """
    _check(ranked, k)
    if len(ranked) != len(positives):
        raise ValueError(
            f"{len(ranked)} ranked lists but {len(positives)} positive lists; give one per query"
        )
    hits = sum(bool(set(r[:k]) & set(p)) for r, p in zip(ranked, positives))
    return hits / len(ranked)


def modality_violation(
    ranked: Sequence[Sequence[str]], modality_of: Mapping[str, str], expected: str, k: int
) -> float:
    """The share of the top-``k`` results whose modality is not ``expected``.

    Args:
        ranked: per query, candidate ids best first (a list shorter than ``k`` contributes what it has).
        modality_of: candidate id -> its modality.
        expected: the task's candidate modality.
        k: the cut-off.

    Raises:
        ValueError: ``k < 1``, no queries, no results at all, or an id without a modality.
    """
    _check(ranked, k)
    results = [did for r in ranked for did in r[:k]]
    if not results:
        raise ValueError("the ranked lists are all empty; nothing to score")
    unknown = sorted({did for did in results if did not in modality_of})
    if unknown:
        raise ValueError(f"candidate ids {unknown[:5]} have no modality; pass the pool they come from")
    return sum(modality_of[did] != expected for did in results) / len(results)
