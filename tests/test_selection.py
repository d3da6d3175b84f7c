"""lora_retriever.selection: the one selection rule, checked against a brute-force reading of the paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, RetrievedAdapter
from lora_retriever.selection import (
    SELECTION_METHODS,
    own_adapters,
    routing_from_selections,
    select_adapters,
    task_adapter,
)
from tests.test_pool_and_index import write_pool

NAMES = ["capital", "continent", "currency", "sum", "sentiment"]


@pytest.fixture
def setup(tmp_path):
    """A 5-adapter pool (random 8-d keys), 6 queries near known keys, their tasks (one unknown)."""
    pool = AdapterPool.from_configs(write_pool(tmp_path, [{"lora_name": n, "task": n} for n in NAMES]))
    keys = pool.keys()
    rng = np.random.default_rng(1)
    own = [0, 1, 2, 3, 4, 0]
    vectors = keys[own] + 0.3 * rng.normal(size=(len(own), keys.shape[1])).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    tasks = [NAMES[i] for i in own[:-1]] + ["unknown-task"]
    retriever = LoraRetriever(LoraRetrieverConfig(index="exact"), pool=pool, embedder=object())
    return pool, retriever, vectors, tasks


def brute_force(sims: np.ndarray, k: int, banned: str | None) -> list[str]:
    order = sorted(range(len(NAMES)), key=lambda j: (-sims[j], j))
    return [NAMES[j] for j in order if NAMES[j] != banned][:k]


@pytest.mark.parametrize("ood", [False, True])
@pytest.mark.parametrize("method", list(SELECTION_METHODS))
def test_every_method_against_brute_force(setup, method, ood):
    pool, retriever, vectors, tasks = setup
    sims = vectors @ pool.keys().T
    if method == "oracle" and ood:
        with pytest.raises(ValueError, match="would exclude the only adapter"):
            select_adapters(method, pool, tasks=tasks, ood=True)
        return
    got = select_adapters(method, pool, tasks=tasks, retriever=retriever, vectors=vectors, ood=ood, top_k=3)
    assert len(got) == len(tasks)
    for i, (task, sel) in enumerate(zip(tasks, got)):
        own = task if task in NAMES else None
        banned = own if ood else None
        names = [a.name for a in sel]
        if method == "base":
            assert sel == []
        elif method == "oracle":  # the own adapter with weight 1 (base when the task has none)
            assert names == ([own] if own else [])
        elif method == "selection":
            assert names == brute_force(sims[i], 1, banned)
        elif method in ("mixture", "fusion"):
            assert names == brute_force(sims[i], 3, banned)
        else:  # uniform_all
            assert names == [n for n in NAMES if n != banned]
        if sel:
            assert math.isclose(sum(a.weight for a in sel), 1.0, abs_tol=1e-9)
            assert all(math.isclose(a.weight, 1 / len(sel)) for a in sel)  # uniform weighting everywhere
            assert all(
                math.isclose(a.similarity, float(sims[i, NAMES.index(a.name)]), abs_tol=1e-5) for a in sel
            )
        if ood and own:
            assert own not in names


def test_softmax_weights_and_errors(setup):
    pool, retriever, vectors, tasks = setup
    soft = select_adapters(
        "mixture", pool, tasks=tasks, retriever=retriever, vectors=vectors, top_k=2, weight_mode="softmax"
    )
    for sel in soft:
        e = np.exp([a.similarity for a in sel])
        assert [a.weight for a in sel] == pytest.approx(list(e / e.sum()))
    with pytest.raises(ValueError, match="unknown selection method 'soup'"):
        select_adapters("soup", pool, tasks=tasks)
    with pytest.raises(ValueError, match="pass retriever=... and vectors=..."):
        select_adapters("mixture", pool, tasks=tasks)
    with pytest.raises(ValueError, match="5 query vectors for 6 samples"):
        select_adapters("mixture", pool, tasks=tasks, retriever=retriever, vectors=vectors[:5])
    assert task_adapter(pool, "sum") == "sum" and task_adapter(pool, None) is None


def test_top_k_above_the_pool_warns(setup, caplog):
    pool, retriever, vectors, tasks = setup
    got = select_adapters("mixture", pool, tasks=tasks, retriever=retriever, vectors=vectors, top_k=9)
    assert all(len(sel) == len(NAMES) for sel in got)
    assert "top_k=9 but only 5 adapter(s) can be retrieved" in caplog.text


def test_routing_from_selections_is_sparse_and_equals_the_dense_matrix():
    selections = [
        [RetrievedAdapter("c", 0.5, 0.9), RetrievedAdapter("a", 0.5, 0.8)],
        [],
        [RetrievedAdapter("b", 1.0, 0.7)],
    ]
    routing = routing_from_selections(selections, ["a", "b", "c", "d"])
    assert routing.adapter_names == ("a", "b", "c")  # the used adapters, in pool order
    assert routing.indices.tolist() == [[2, 0], [-1, -1], [1, -1]]
    expected = torch.tensor([[0.5, 0.0, 0.5], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert torch.equal(routing.to_dense(), expected)
    assert torch.equal(routing.rows(1, 3).to_dense(), expected[1:3])
    empty = routing_from_selections([[], []], ["a"])
    assert empty.used_names() == [] and empty.batch_size == 2
    with pytest.raises(ValueError, match=r"selected adapters \['zz'\] are not in the pool"):
        routing_from_selections([[RetrievedAdapter("zz", 1.0, 0.0)]], ["a"])


def test_category_adapters_are_own_too(tmp_path):
    """With app and category adapters in one pool, OOD excludes both of a sample's own adapters; the oracle
    takes the most specific one (the category adapter when the pool has only categories)."""
    entries = [
        {"lora_name": "digit_value", "task": "digit_value", "category": "reading", "lora_type": "app"},
        {"lora_name": "counter_value", "task": "counter_value", "category": "reading", "lora_type": "app"},
        {"lora_name": "shop_tap", "task": "shop_tap", "category": "actions", "lora_type": "app"},
        {"lora_name": "reading", "category": "reading", "lora_type": "category"},
        {"lora_name": "actions", "category": "actions", "lora_type": "category"},
    ]
    pool = AdapterPool.from_configs(write_pool(tmp_path, entries))
    assert own_adapters(pool, "digit_value", "reading") == ["digit_value", "reading"]
    assert own_adapters(pool.filter("lora_type", "category"), "digit_value", "reading") == ["reading"]
    retriever = LoraRetriever(LoraRetrieverConfig(index="exact"), pool=pool, embedder=object())
    keys = pool.keys()
    vectors = keys[[0, 3]]  # exactly digit_value's key, exactly the reading key
    tasks, categories = ["digit_value", "counter_value"], ["reading", "reading"]
    for method in ("mixture", "uniform_all"):
        got = select_adapters(
            method, pool, tasks=tasks, categories=categories, retriever=retriever, vectors=vectors,
            ood=True, top_k=5,
        )  # fmt: skip
        for sel, own in zip(got, (["digit_value", "reading"], ["counter_value", "reading"])):
            assert not set(own) & {a.name for a in sel}, (method, sel)
            assert len(sel) == 3
    oracle = select_adapters(
        "oracle", pool.filter("lora_type", "category"), tasks=tasks, categories=categories
    )
    assert [[a.name for a in sel] for sel in oracle] == [["reading"], ["reading"]]
    with pytest.raises(ValueError, match="1 categories for 2 samples"):
        select_adapters("base", pool, tasks=tasks, categories=["reading"])
