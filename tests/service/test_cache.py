"""``AdapterCache``: 1,000 tiny adapters on disk, a budget of 50 resident; LRU eviction, pins, prefetch, byte
budget, and answers unchanged by eviction and reload (against each adapter loaded alone)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from lora_retriever.service.cache import AdapterBudgetError, AdapterCache
from swift.tuners import Swift, SwiftModel, lora_mixture_context
from tests.factories import tiny_causal_lm
from tests.service.factories import write_random_adapter

N_ADAPTERS = 1000
BUDGET = 50
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


@pytest.fixture(scope="module")
def disk_pool(tmp_path_factory):
    """``(base model, {name: dir})``: 1,000 rank-2 adapters of a tiny Llama, written in a few seconds."""
    base = tiny_causal_lm()
    root = tmp_path_factory.mktemp("many_adapters")
    dirs = {
        f"a{j:04d}": write_random_adapter(base, root / f"a{j:04d}", MODULES, r=2, seed=j, std=0.3)
        for j in range(N_ADAPTERS)
    }
    return base, dirs


def make_cache(disk_pool, **budget):
    base, dirs = disk_pool
    model = SwiftModel(copy.deepcopy(base))
    budget = {"max_resident": BUDGET, "max_bytes": 2**30, **budget}
    return AdapterCache(model, dirs.__getitem__, **budget)


IDS = torch.tensor([[5, 9, 17, 33, 64, 3]])


def logits_with(model, name: str) -> torch.Tensor:
    with torch.no_grad(), lora_mixture_context(torch.ones(1, 1), [name]):
        return model(input_ids=IDS).logits


def test_thousand_adapters_budget_fifty_answers_unchanged(disk_pool):
    base, dirs = disk_pool
    cache = make_cache(disk_pool)
    rng = random.Random(0)
    names = sorted(dirs)
    popularity = [1.0 / (j + 1) for j in range(len(names))]  # Zipf: a hot head, a long tail
    checked = {}
    for step in range(300):
        batch = list(dict.fromkeys(rng.choices(names, popularity, k=4)))
        cache.acquire(batch)
        try:
            assert set(batch) <= set(cache.resident)
            assert len(cache.resident) <= BUDGET and sorted(cache.model.adapter_names) == sorted(
                cache.resident
            )
            if step % 15 == 0:
                checked[batch[0]] = logits_with(cache.model, batch[0])
        finally:
            cache.release(batch)
    stats = cache.stats()
    assert stats["evictions"] > 0 and stats["resident"] == BUDGET
    assert 0.3 < stats["hit_rate"] < 1.0 and stats["load_ms_p50"] is not None
    for name, got in checked.items():  # each answer equals that adapter loaded alone into a fresh model
        alone = Swift.from_pretrained(copy.deepcopy(base), dirs[name], adapter_name=name)
        torch.testing.assert_close(got, logits_with(alone, name), rtol=1e-5, atol=1e-5)


def test_lru_order_pins_and_in_use_adapters_stay(disk_pool):
    cache = make_cache(disk_pool, max_resident=3)
    cache.pin("a0000")
    for name in ("a0001", "a0002"):
        cache.acquire([name])
        cache.release([name])
    cache.acquire(["a0001"])  # a0001 is now the most recent and in use
    cache.acquire(["a0003"])  # evicts the least recent unpinned, unused adapter: a0002
    assert cache.resident == ["a0000", "a0001", "a0003"]
    with pytest.raises(AdapterBudgetError, match="none can be evicted"):
        cache.acquire(["a0004"])  # a0000 pinned, a0001 and a0003 in use
    assert cache.resident == ["a0000", "a0001", "a0003"] and "a0004" not in cache.model.adapter_names
    cache.release(["a0001", "a0003"])
    cache.acquire(["a0004"])
    assert "a0000" in cache.resident and cache.pinned == {"a0000"}


def test_byte_budget_evicts_by_size(disk_pool):
    one = make_cache(disk_pool)
    one.acquire(["a0000"])
    size = one.resident_bytes
    cache = make_cache(disk_pool, max_bytes=int(size * 3.5))
    for j in range(10):
        cache.acquire([f"a{j:04d}"])
        cache.release([f"a{j:04d}"])
        assert cache.resident_bytes <= size * 3.5
    assert len(cache.resident) == 3 and cache.stats()["evictions"] == 7


def test_prefetched_reload_equals_first_load(disk_pool):
    cache = make_cache(disk_pool, max_resident=1)
    cache.acquire(["a0007"])
    first = logits_with(cache.model, "a0007")
    cache.release(["a0007"])
    cache.acquire(["a0008"])  # evicts a0007
    cache.release(["a0008"])
    assert not cache.is_resident("a0007")
    cache.prefetch(["a0007"])  # read off the request path
    staged = cache._staged["a0007"]
    staged.result(timeout=30)
    cache.acquire(["a0007"])  # installs the staged weights
    assert "a0007" not in cache._staged
    torch.testing.assert_close(logits_with(cache.model, "a0007"), first, rtol=0, atol=0)


def test_server_splits_a_batch_that_overflows_the_cache(http, engine):
    """Three concurrent requests on three adapters with room for two: the third waits for the next batch and
    every answer equals the same request alone."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(model):
        body = {"model": model, "messages": [{"role": "user", "content": "Name a city."}], "max_tokens": 5}
        response = http.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    names = ["capitals", "arithmetic", "sentiment"]
    alone = [ask(n)["choices"][0]["message"]["content"] for n in names]
    saved = engine.cache.max_resident
    with engine.model_lock:
        engine.cache.resize(max_resident=2)
    try:
        assert len(engine.cache.resident) == 2
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(ask, names))
        assert len(engine.cache.resident) <= 2
    finally:
        with engine.model_lock:
            engine.cache.resize(max_resident=saved)
    assert [r["choices"][0]["message"]["content"] for r in together] == alone
    assert max(r["lora_retriever"]["batch_size"] for r in together) <= 2


def test_in_use_counts_balance_across_overlapping_batches(disk_pool):
    """Two requests of one batch share an adapter: after both release it, it can be evicted again."""
    cache = make_cache(disk_pool, max_resident=2)
    cache.acquire(["a0001", "a0002"])
    cache.acquire(["a0001"])
    cache.release(["a0001", "a0002"])
    cache.release(["a0001"])
    cache.acquire(["a0003", "a0004"])  # both earlier ones are free to go
    assert sorted(cache.resident) == ["a0003", "a0004"]


def test_model_never_holds_more_than_the_budget_even_while_loading(disk_pool):
    """The count budget is made room for before a load: at the moment each adapter's files are located (just
    before they are read into the model) the model holds at most ``budget - 1`` adapters."""
    base, dirs = disk_pool
    model = SwiftModel(copy.deepcopy(base))
    held_at_load = []

    def locate(name):
        held_at_load.append(len(model.adapter_names))
        return dirs[name]

    cache = AdapterCache(model, locate, max_resident=4, max_bytes=2**30)
    for j in range(12):
        cache.acquire([f"a{j:04d}", f"a{j + 1:04d}"])
        cache.release([f"a{j:04d}", f"a{j + 1:04d}"])
    assert len(held_at_load) == 13 and max(held_at_load) == 3
    assert len(model.adapter_names) == 4 and cache.stats()["evictions"] == 9
