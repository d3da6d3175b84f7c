"""make demo's cache: an adapter is reused only when trained with the same recipe and registered with a key."""

from __future__ import annotations

import json

from lora_retriever.demo import RECIPE_STAMP, TRAIN_ARGS, is_trained, recipe, train_command


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
    assert is_trained(tmp_path, "capital", 50)
    assert not is_trained(tmp_path, "capital", 60)  # another recipe
    assert not is_trained(tmp_path, "arithmetic", 50)  # never trained
    (tmp_path / "keys" / "capital.npy").unlink()
    assert not is_trained(tmp_path, "capital", 50)  # key missing


def test_train_command_carries_the_recipe(tmp_path):
    cmd = train_command("capital", tmp_path / "tasks", tmp_path / "pool", 50)
    for key, value in TRAIN_ARGS.items():
        assert cmd[cmd.index(f"--{key}") + 1] == str(value)
    assert cmd[cmd.index("--register_pool") + 1] == str(tmp_path / "pool" / "pool.json")
    assert cmd[cmd.index("--max_steps") + 1] == "50" and "--threads" in cmd
