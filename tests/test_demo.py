"""make demo: adapters are reused only when trained with the same recipe and registered with a key; training
goes through the library (no repository script), in worker processes, with every step shown on one bar."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_retriever.demo import (
    RECIPE_STAMP,
    TRAIN_ARGS,
    build_tasks,
    is_trained,
    log_path,
    recipe,
    train_all,
    train_config,
)
from lora_retriever.training import TrainConfig
from tests.tiny_vlms import save_tiny_llama


def make_trained(pool_dir, task, steps):
    out = pool_dir / task
    out.mkdir(parents=True)
    (out / "adapter_model.safetensors").write_bytes(b"x")
    (out / RECIPE_STAMP).write_text(json.dumps(recipe(steps)))
    (pool_dir / "keys").mkdir(exist_ok=True)
    (pool_dir / "keys" / f"{task}.npy").write_bytes(b"x")
    (pool_dir / "pool.json").write_text(
        json.dumps([{"lora_name": task, "embedding_path": f"keys/{task}.npy"}])
    )


def test_is_trained_requires_same_recipe_adapter_and_key(tmp_path):
    make_trained(tmp_path, "capital", 50)
    assert is_trained(tmp_path, "capital", recipe(50))
    assert not is_trained(tmp_path, "capital", recipe(60))  # another recipe
    assert not is_trained(tmp_path, "capital", recipe(50, "llama", "/models/x"))  # another base model
    assert not is_trained(tmp_path, "arithmetic", recipe(50))  # never trained
    (tmp_path / "keys" / "capital.npy").unlink()
    assert not is_trained(tmp_path, "capital", recipe(50))  # key missing


def test_train_config_carries_the_recipe(tmp_path):
    config = train_config("capital", tmp_path / "tasks", tmp_path / "pool", 50)
    assert isinstance(config, TrainConfig)  # a library call, not a command line of a repository script
    for key, value in TRAIN_ARGS.items():
        expected = [value] if key == "target_modules" else value
        assert getattr(config, key) == expected, key
    assert config.register_pool == str(tmp_path / "pool" / "pool.json") and config.max_steps == 50
    assert config.dataset_path == str(tmp_path / "tasks" / "capital" / "train.jsonl")
    assert config.output_dir == str(tmp_path / "pool" / "capital") and config.save_steps == 0


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return save_tiny_llama(root / "llama"), build_tasks(root, 4, 0)


@pytest.mark.parametrize("workers", [1, 2])
def test_training_shows_every_step_and_registers_each_adapter(tiny_setup, tmp_path, capsys, workers):
    """workers=2 runs each training in its own process (spawned: only package code runs there) and relays its
    steps; workers=1 trains here. Either way the bar moves at every step, not once per adapter."""
    llama, tasks_dir = tiny_setup
    pool_dir = tmp_path / "pool"
    steps = 3
    configs = [
        train_config(task, tasks_dir, pool_dir, steps, model_type="llama", model_path=str(llama))
        for task in ("arithmetic", "capital")
    ]
    finished = []
    train_all(configs, workers, on_trained=lambda c: finished.append(c.adapter_name))

    assert sorted(finished) == ["arithmetic", "capital"]
    entries = {e["lora_name"]: e for e in json.loads((pool_dir / "pool.json").read_text())}
    assert sorted(entries) == ["arithmetic", "capital"]
    for name in entries:
        assert (pool_dir / name / "adapter_model.safetensors").is_file()
        assert (pool_dir / entries[name]["embedding_path"]).is_file()
        assert json.loads((pool_dir / name / "metrics.json").read_text())["steps"] == steps
    drawn = {int(n) for n in re.findall(r"training adapters:.*?(\d+)/6 \[", capsys.readouterr().err)}
    assert drawn == set(range(7)), drawn  # 0, then a frame at each of the 2 x 3 steps
    if workers == 2:  # each child's console output went to its own log, not over the bar
        assert all("training adapter" in log_path(c).read_text() for c in configs)


def test_a_failed_training_process_names_its_log(tiny_setup, tmp_path):
    llama, tasks_dir = tiny_setup
    good = train_config("capital", tasks_dir, tmp_path / "pool", 2, model_type="llama", model_path=str(llama))
    bad = train_config(
        "arithmetic", tasks_dir, tmp_path / "pool", 2, model_type="llama", model_path=str(llama)
    )
    bad.dataset_path = str(tmp_path / "missing.jsonl")
    finished = []
    with pytest.raises(ChildProcessError, match=r"arithmetic \(exit 1, log: .*arithmetic\.train\.log\)"):
        train_all([bad, good], 2, on_trained=lambda c: finished.append(c.adapter_name), progress=False)
    assert finished == ["capital"]  # the other training finished and was kept
    assert "missing.jsonl" in Path(log_path(bad)).read_text()
