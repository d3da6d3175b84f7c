"""Which adapters each input composes: the one selection rule of the CLI pipeline and the paper protocol.

LoraRetriever (Zhao et al. 2024, Sec. 4) compares, on one mixed-task test set, methods that differ only in
*which* adapters each sample composes (and then in *how*: mixture or fusion):

========== ================================================================================================
``base``          no adapter (the base model)
``oracle``        the sample's own adapter, weight 1 ("perfect selection")
``selection``     the top-1 retrieved adapter, weight 1
``mixture``       the top-k retrieved adapters, weights from the retriever's weight mode (uniform 1/k default)
``fusion``        the same top-k as ``mixture`` (merged into one adapter by the fusion composer)
``uniform_all``   every adapter of the pool with weight 1/N (AdapterSoup-style)
========== ================================================================================================

Out-of-domain (``ood=True``) removes each sample's own adapter from what it may compose.
``select_adapters`` turns already-embedded queries into per-sample ``RetrievedAdapter`` lists;
``routing_from_selections`` turns those straight into the sparse ``LoraRouting`` the mixture layers run on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import (
    DEFAULT_TEXT_WEIGHT,
    LoraRetriever,
    QueryVectors,
    RetrievedAdapter,
    pool_similarities,
)
from swift.tuners import LoraRouting
from swift.utils import get_logger

logger = get_logger(__name__)

__all__ = [
    "SELECTION_METHODS",
    "routing_from_selections",
    "select_adapters",
    "own_adapters",
    "task_adapter",
]

# method -> what it selects: none / own / the top 1 / the top k / all
SELECTION_METHODS: dict[str, str] = {
    "base": "none",
    "oracle": "own",
    "selection": "top1",
    "mixture": "topk",
    "fusion": "topk",
    "uniform_all": "all",
}

Selection = Sequence[RetrievedAdapter]


def task_adapter(pool: AdapterPool, task: str | None) -> str | None:
    """The pool adapter trained for ``task``: the entry named so, or whose ``task`` field equals it."""
    if not task:
        return None
    if task in pool:
        return task
    for entry in pool:
        if entry.get("task") == task:
            return entry.lora_name
    return None


def own_adapters(pool: AdapterPool, task: str | None, category: str | None = None) -> list[str]:
    """Every pool adapter trained on ``task``'s data, most specific first: its task (app-level) adapter, then
    the category-level adapter of ``category`` (an entry with ``lora_type`` "category" whose ``category``
    field or name equals it). The oracle composes the first; out-of-domain runs exclude them all."""
    names = [name] if (name := task_adapter(pool, task)) else []
    if category:
        for entry in pool:
            is_category = entry.get("lora_type") == "category"
            if (
                is_category
                and category in (entry.get("category"), entry.lora_name)
                and entry.lora_name not in names
            ):
                names.append(entry.lora_name)
    return names


def select_adapters(
    method: str,
    pool: AdapterPool,
    *,
    tasks: Sequence[str | None],
    categories: Sequence[str | None] | None = None,
    retriever: LoraRetriever | None = None,
    vectors: QueryVectors | np.ndarray | None = None,
    ood: bool = False,
    top_k: int = 3,
    weight_mode: str | None = None,
    temperature: float | None = None,
) -> list[list[RetrievedAdapter]]:
    """Per sample, the adapters ``method`` composes, best first, weights summing to 1 (empty: base model).

    Args:
        method: one of ``SELECTION_METHODS``.
        pool: the adapters to choose from (its order breaks ties).
        tasks: per sample, its task (``None`` if unknown): finds its own adapter for ``oracle`` and ``ood``.
        categories: per sample, its task's category (``own_adapters``: a category-level adapter is its own
            too, so ``ood`` excludes it as well; with a category pool it is the oracle's adapter).
        retriever: searches the pool's keys (needed by ``selection``/``mixture``/``fusion``).
        vectors: the embedded queries from ``retriever.embed_queries`` (or ``[n, dim]`` normalised text
            vectors), needed by the retrieval methods; when given to ``oracle``/``uniform_all`` their (fused)
            similarities are reported.
        ood: exclude each sample's own adapter (the paper's out-of-domain protocol).
        top_k: adapters per sample for ``mixture``/``fusion``.
        weight_mode / temperature: override the retriever's weighting for ``mixture``/``fusion``
            (``selection`` is always weight 1, ``uniform_all`` always 1/N).

    Raises:
        ValueError: unknown method, a retrieval method without ``retriever``/``vectors``, ``vectors``/
            ``tasks`` of a different length, or ``oracle`` with ``ood``.
    """
    kind = SELECTION_METHODS.get(method)
    if kind is None:
        raise ValueError(f"unknown selection method {method!r}; choose one of {list(SELECTION_METHODS)}")
    n = len(tasks)
    if vectors is not None and len(vectors) != n:
        raise ValueError(f"{len(vectors)} query vectors for {n} samples; give one per sample")
    if categories is not None and len(categories) != n:
        raise ValueError(f"{len(categories)} categories for {n} samples; give one per sample (or None)")
    if kind == "none":
        return [[] for _ in range(n)]
    if kind == "own" and ood:
        raise ValueError(
            "method 'oracle' with ood=True would exclude the only adapter it composes; out-of-domain runs are "
            "meaningful for the retrieval methods and uniform_all (drop --ood, or pick another method)."
        )
    own = [own_adapters(pool, task, categories[i] if categories else None) for i, task in enumerate(tasks)]
    sims = None
    if vectors is not None and kind in ("own", "all"):
        weight = retriever.text_weight if retriever is not None else DEFAULT_TEXT_WEIGHT
        sims = pool_similarities(pool, vectors, weight)  # [n, N], pool order
    if kind == "own":
        return _own(pool, own, tasks, sims)
    if kind == "all":
        return _all(pool, own if ood else [[] for _ in range(n)], sims)
    if retriever is None or vectors is None:
        raise ValueError(f"method {method!r} retrieves adapters: pass retriever=... and vectors=...")
    if kind == "top1":
        k, weight_mode = 1, "uniform"
    else:
        k = top_k
        available = len(pool) - (max((len(o) for o in own), default=0) if ood else 0)
        if k > available:
            logger.warning(
                "top_k=%d but only %d adapter(s) can be retrieved%s; each sample gets them all",
                k,
                available,
                " (own adapters excluded)" if ood else "",
            )
    return retriever.retrieve_vectors(
        vectors,
        k,
        exclude=own if ood else None,
        weight_mode=weight_mode,
        temperature=temperature,
        model_id=retriever.index.identity.model_id,
    )


def _own(
    pool: AdapterPool, own: list[list[str]], tasks: Sequence[str | None], sims: np.ndarray | None
) -> list[list[RetrievedAdapter]]:
    names = pool.names
    out = []
    missing = sorted({str(t) for t, mine in zip(tasks, own) if not mine})
    if missing:
        logger.warning("no adapter in the pool for task(s) %s: oracle runs the base model for them", missing)
    for i, mine in enumerate(own):
        if not mine:
            out.append([])
            continue
        name = mine[0]  # the most specific of the sample's own adapters
        similarity = float(sims[i, names.index(name)]) if sims is not None else float("nan")
        out.append([RetrievedAdapter(name, 1.0, similarity)])
    return out


def _all(pool: AdapterPool, banned: list[list[str]], sims: np.ndarray | None) -> list[list[RetrievedAdapter]]:
    names = pool.names
    out = []
    for i, ban in enumerate(banned):
        allowed = [j for j, name in enumerate(names) if name not in ban]
        out.append(
            [
                RetrievedAdapter(
                    names[j], 1.0 / len(allowed), float(sims[i, j]) if sims is not None else float("nan")
                )
                for j in allowed
            ]
        )
    return out


def routing_from_selections(selections: Sequence[Selection], order: Sequence[str]) -> LoraRouting:
    """The sparse ``LoraRouting`` of per-sample selections: ``[batch, k]`` indices and weights.

    Columns are the adapters used anywhere in ``selections``, in ``order`` (the pool order), so the same
    selections always give the same routing; a sample with no selection gets only empty slots (the base
    model). An adapter selected twice for one sample keeps two slots (their weights add up).

    Raises:
        ValueError: a selected adapter is not in ``order`` (names it).
    """
    position = {name: i for i, name in enumerate(order)}
    unknown = sorted({a.name for sel in selections for a in sel if a.name not in position})
    if unknown:
        raise ValueError(f"selected adapters {unknown} are not in the pool; pool: {list(order)}")
    used = sorted({a.name for sel in selections for a in sel}, key=position.__getitem__)
    column = {name: j for j, name in enumerate(used)}
    k = max((len(sel) for sel in selections), default=0)
    indices = torch.full((len(selections), max(k, 1)), -1, dtype=torch.long)
    weights = torch.zeros((len(selections), max(k, 1)), dtype=torch.float32)
    for i, sel in enumerate(selections):
        for slot, adapter in enumerate(sel):
            indices[i, slot] = column[adapter.name]
            weights[i, slot] = adapter.weight
    return LoraRouting.from_sparse(indices, weights, used)
