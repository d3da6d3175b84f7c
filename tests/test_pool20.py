"""The full-pool build (``python -m lora_retriever.pool20``): validated settings, the demo's training machinery
on every task asked for, resumable, timed with the CPU named; and the demo keeps its seven tasks."""

from __future__ import annotations

import json

import pytest

from lora_retriever.demo import RECIPE_STAMP, build_tasks, recipe
from lora_retriever.pool import AdapterPool
from lora_retriever.pool20 import PoolBuildConfig, build_pool, eval_command, main
from lora_retriever.tasks import DEMO_TASK_NAMES, TASK_NAMES
from swift.utils.machine import cpu_info
from tests.tiny_vlms import save_tiny_llama


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be a positive integer, got 0; pass --steps N"),
        ({"workers": True}, "workers must be a positive integer, got True"),
        ({"tasks": ["capital", "nope"]}, r"tasks \['nope'\] are not text tasks; pick from: arithmetic"),
        ({"tasks": []}, r"tasks \[\] are not text tasks"),
        ({"tasks": ["capital", "capital"]}, "tasks lists capital more than once"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoolBuildConfig(**kwargs)


def test_default_config_is_the_whole_suite():
    assert PoolBuildConfig().tasks == list(TASK_NAMES) and len(TASK_NAMES) >= 20


def test_build_tasks_defaults_to_the_demo_seven_and_rebuilds_for_other_tasks(tmp_path):
    tasks_dir = build_tasks(tmp_path, 3, 0)
    manifest = json.loads((tasks_dir / "manifest.json").read_text())
    assert list(manifest["tasks"]) == list(DEMO_TASK_NAMES)
    build_tasks(tmp_path, 3, 0, ["capital", "capital_country"])  # another task list: not the cached suite
    manifest = json.loads((tasks_dir / "manifest.json").read_text())
    assert list(manifest["tasks"]) == ["capital", "capital_country"]
    build_tasks(tmp_path, 4, 0, ["capital", "capital_country"])  # another n_test: rebuilt too
    assert len((tasks_dir / "capital" / "test.jsonl").read_text().splitlines()) == 4


def test_build_trains_registers_and_resumes(tmp_path, capsys):
    """Two tasks of one cluster, one step each, on a tiny Llama: the CLI trains and registers both and names
    the CPU; a second build reuses both; a new recipe retrains them."""
    llama = save_tiny_llama(tmp_path / "llama")
    work_dir = tmp_path / "pool20"
    argv = ["--work_dir", str(work_dir), "--tasks", "capital", "capital_country", "--steps", "1"]
    argv += [
        "--workers",
        "1",
        "--n_test",
        "3",
        "--model_type",
        "llama",
        "--model_path",
        str(llama),
        "--quiet",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(2 adapters: 2 trained now, 0 reused)" in out
    assert cpu_info()["model"] in out  # the run time comes with the CPU it was measured on
    assert "--test_data " + str(work_dir / "tasks" / "test_mixed.jsonl") in out

    pool_config = work_dir / "pool" / "pool.json"
    pool = AdapterPool.from_configs(pool_config)
    assert sorted(pool.names) == ["capital", "capital_country"]
    for name in pool.names:
        stamp = json.loads((work_dir / "pool" / name / RECIPE_STAMP).read_text())
        assert stamp == recipe(1, "llama", str(llama))

    config = PoolBuildConfig(
        work_dir=str(work_dir),
        tasks=["capital", "capital_country"],
        steps=1,
        workers=1,
        n_test=3,
        model_type="llama",
        model_path=str(llama),
        progress=False,
    )
    again = build_pool(config)
    assert again["trained"] == [] and again["reused"] == ["capital", "capital_country"]
    assert again["seconds"] >= 0 and again["cpu"]
    assert eval_command(again).startswith(f"python -m lora_retriever.eval --pool {pool_config} ")

    config.steps = 2  # another recipe: nothing is reused
    assert build_pool(config)["trained"] == ["capital", "capital_country"]


def test_bad_work_dir_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--work_dir", str(blocker), "--tasks", "capital", "--quiet"]) == 2
    assert "work_dir" in capsys.readouterr().err
