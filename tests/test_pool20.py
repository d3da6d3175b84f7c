"""The full-pool build (``python -m lora_retriever.pool20``): validated settings, the demo's training machinery
on every task asked for, resumable, timed with the CPU named; and the demo keeps its seven tasks."""

from __future__ import annotations

import json
import re

import pytest

from lora_retriever.demo import RECIPE_STAMP, build_tasks, recipe
from lora_retriever.pool import AdapterPool
from lora_retriever.pool20 import (
    PoolBuildConfig,
    build_pool,
    cluster_table,
    eval_command,
    main,
    retrieval_by_cluster,
)
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
    """Two related tasks and one other, one step each, on a tiny Llama: the CLI trains and registers them and
    names the CPU; a second build reuses them; a new recipe retrains them. Retrieval is reported by cluster."""
    llama = save_tiny_llama(tmp_path / "llama")
    work_dir = tmp_path / "pool20"
    tasks = ["capital", "capital_country", "arithmetic"]
    argv = ["--work_dir", str(work_dir), "--tasks", *tasks, "--steps", "1"]
    argv += ["--workers", "1", "--n_test", "3", "--model_type", "llama", "--model_path", str(llama)]
    argv += ["--report_retrieval", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "(3 adapters: 3 trained now, 0 reused)" in out
    assert cpu_info()["model"] in out  # the run time comes with the CPU it was measured on
    assert "--test_data " + str(work_dir / "tasks" / "test_mixed.jsonl") in out
    assert "retrieval by cluster, test_alt queries" in out
    assert re.search(r"^geography +6 ", out, re.MULTILINE) and re.search(r"^all +9 ", out, re.MULTILINE)

    pool_config = work_dir / "pool" / "pool.json"
    pool = AdapterPool.from_configs(pool_config)
    assert sorted(pool.names) == sorted(tasks)
    for name in pool.names:
        stamp = json.loads((work_dir / "pool" / name / RECIPE_STAMP).read_text())
        assert stamp == recipe(1, "llama", str(llama))

    config = PoolBuildConfig(
        work_dir=str(work_dir),
        tasks=tasks,
        steps=1,
        workers=1,
        n_test=3,
        model_type="llama",
        model_path=str(llama),
        report_retrieval=True,
        progress=False,
    )
    again = build_pool(config)
    assert again["trained"] == [] and again["reused"] == tasks
    assert again["seconds"] >= 0 and again["cpu"]
    assert eval_command(again).startswith(f"python -m lora_retriever.eval --pool {pool_config} ")

    # --report_retrieval (3 test queries per task). Arithmetic queries find their own adapter first; of their
    # top 3 (the whole pool) one is from their cluster; out of domain none is. A geography query's OOD top 2
    # are its sibling and the arithmetic adapter: half from its cluster. A top-1 miss can only be a sibling.
    assert again["retrieval"] == json.loads((work_dir / "retrieval.json").read_text())
    report = again["retrieval"]["test"]
    assert report == retrieval_by_cluster(pool_config, work_dir / "tasks" / "test_mixed.jsonl")
    by_cluster = report["by_cluster"]
    assert by_cluster["all"]["n"] == 9 and by_cluster["geography"]["n"] == 6
    assert by_cluster["arithmetic"] == {
        "n": 3,
        "top1": 1.0,
        "top1_cluster": 1.0,
        "topk": 1.0,
        "topk_cluster": round(1 / 3, 4),
        "ood_topk_cluster": 0.0,
    }
    assert (
        by_cluster["geography"]["top1_cluster"] == 1.0 and by_cluster["geography"]["ood_topk_cluster"] == 0.5
    )
    misses = round(6 * (1 - by_cluster["geography"]["top1"]))
    assert sum(c["n"] for c in report["top1_confusions"]) == misses
    assert all(
        {c["task"], c["retrieved"]} == {"capital", "capital_country"} for c in report["top1_confusions"]
    )
    assert again["retrieval"]["test_alt"]["by_cluster"]["all"]["n"] == 9

    config.steps = 2  # another recipe: nothing is reused
    assert build_pool(config)["trained"] == tasks


def test_bad_work_dir_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["--work_dir", str(blocker), "--tasks", "capital", "--quiet"]) == 2
    assert "work_dir" in capsys.readouterr().err


def test_cluster_table_averages_the_tasks_of_each_cluster():
    result = {
        "scores": {
            "selection/iid": {"per_task": {"arithmetic": 0.5, "capital": 1.0, "capital_country": 0.0}},
            "mixture/ood": {"per_task": {"arithmetic": 0.25, "capital": 0.5, "capital_country": 0.25}},
        }
    }
    table = cluster_table(result).splitlines()
    assert table[0] == "| cluster | selection/iid | mixture/ood |"
    assert table[2:] == ["| arithmetic | 0.50 | 0.25 |", "| geography | 0.50 | 0.38 |"]
