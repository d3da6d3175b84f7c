"""config/pool.json, the example pool the README's snippets use, stays in step with what `make demo` builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_retriever.pool import AdapterPool
from lora_retriever.pool_config import default_key_path
from lora_retriever.tasks import DEMO_TASK_NAMES, get_task

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config" / "pool.json"
DEMO_POOL = REPO / "data" / "demo" / "pool" / "pool.json"  # where `make demo` registers its adapters


def test_example_pool_points_at_the_demo_pool_with_relative_paths():
    entries = json.loads(EXAMPLE.read_text())
    assert [e["lora_name"] for e in entries] == list(DEMO_TASK_NAMES)
    for entry in entries:
        name = entry["lora_name"]
        for field in ("lora_path", "embedding_path", "samples_path"):
            assert not Path(entry[field]).is_absolute(), (name, field)
        folder = EXAMPLE.parent
        assert (folder / entry["lora_path"]).resolve() == DEMO_POOL.parent / name
        assert (folder / entry["embedding_path"]).resolve() == default_key_path(DEMO_POOL, name)
        assert (
            folder / entry["samples_path"]
        ).resolve() == REPO / "data" / "demo" / "tasks" / name / "train.jsonl"
        assert entry["description"] == get_task(name).description
        assert entry["task"] == name


@pytest.mark.skipif(not DEMO_POOL.is_file(), reason="the demo pool is built by `make demo`")
def test_example_pool_loads_after_the_demo():
    pool = AdapterPool.from_configs(EXAMPLE)
    demo = AdapterPool.from_configs(DEMO_POOL)
    assert sorted(pool.names) == sorted(demo.names)  # the demo registers adapters as their trainings finish
    for name in pool.names:
        assert pool[name].lora_path == demo[name].lora_path
        assert (pool.keys()[pool.names.index(name)] == demo.keys()[demo.names.index(name)]).all()
