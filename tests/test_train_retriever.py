"""Retriever fine-tuning (``python -m lora_retriever.train_retriever``): a seeded seen/unseen task split,
InfoNCE against a hand-written reference, a PEFT adapter loaded back through the embedders' own path, keys
rebuilt with it (their metadata names it), and before/after numbers that an independent recomputation gives."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from lora_retriever.demo import build_tasks
from lora_retriever.embed_pool import embed_pool
from lora_retriever.embedders import EmbedderConfig, get_embedder
from lora_retriever.pool import AdapterPool
from lora_retriever.train_retriever import ADAPTER_DIR, RetrieverTrainConfig, info_nce, main, split_tasks
from tests.factories import make_lora_dir, tiny_causal_lm

TASKS = ["arithmetic", "difference", "capital", "capital_country", "sentiment"]


def test_split_is_seeded_disjoint_and_sized():
    names = [f"t{i}" for i in range(20)]
    seen, unseen = split_tasks(names, 0.4, seed=0)
    assert len(seen) == 8 and len(unseen) == 12 and sorted(seen + unseen) == sorted(names)
    assert split_tasks(names, 0.4, seed=0) == (seen, unseen)
    assert split_tasks(list(reversed(names)), 0.4, seed=0)[0] == list(reversed(seen))  # order-independent
    assert split_tasks(names, 0.4, seed=1)[0] != seen
    assert len(split_tasks(["a", "b"], 0.99, 0)[1]) == 1  # never every task seen
    with pytest.raises(ValueError, match="at least 2 tasks"):
        split_tasks(["a"], 0.4, 0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seen_fraction": 1.0}, r"seen_fraction must be in \(0, 1\), got 1.0"),
        ({"batch_size": 1}, "batch_size must be >= 2"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"learning_rate": float("nan")}, "learning_rate must be a positive number"),
        ({"target_modules": []}, "target_modules is empty"),
    ],
)
def test_config_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetrieverTrainConfig(**kwargs)


def test_info_nce_matches_a_hand_computation():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(4, 6), dim=-1)
    tasks = ["a", "b", "a", "c"]
    same = torch.tensor([[x == y for y in tasks] for x in tasks])
    got = info_nce(q, p, same, scale=10.0).item()

    def direction(a, b):
        total = 0.0
        for i in range(4):
            logits = [10.0 * float(a[i] @ b[j]) for j in range(4) if j == i or tasks[j] != tasks[i]]
            positive = 10.0 * float(a[i] @ b[i])
            total += -(positive - math.log(sum(math.exp(x) for x in logits)))
        return total / 4

    assert got == pytest.approx((direction(q, p) + direction(p, q)) / 2, rel=1e-5)


@pytest.fixture(scope="module")
def tiny_pool(tmp_path_factory):
    """Five text tasks (two related pairs), tiny random adapters, keys from the packaged MiniLM."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("retriever_pool")
    tasks_dir = build_tasks(root, 4, 0, TASKS)
    base = tiny_causal_lm("llama")
    entries = []
    for i, task in enumerate(TASKS):
        make_lora_dir(base, root / "pool" / task, r=2, seed=i)
        entries.append(
            {
                "lora_name": task,
                "lora_path": task,
                "task": task,
                "samples_path": f"../tasks/{task}/train.jsonl",
            }
        )
    config = root / "pool" / "pool.json"
    config.write_text(json.dumps(entries))
    embed_pool(config, get_embedder(EmbedderConfig()), num_samples=8, progress=False)
    return root, tasks_dir, config


def _top1(pool: AdapterPool, embedder, samples, tasks):
    keys = pool.keys()
    rows = [s for s in samples if s.task in tasks]
    sims = embedder.encode_queries([s.query for s in rows]) @ keys.T
    return float(np.mean([pool.names[int(np.argmax(row))] == s.task for row, s in zip(sims, rows)]))


def test_train_saves_a_loadable_adapter_rebuilds_keys_and_reports_before_after(tiny_pool, tmp_path, capsys):
    from lora_retriever.data import read_samples

    root, tasks_dir, config = tiny_pool
    out = tmp_path / "retriever"
    argv = ["--pool", str(config), "--test_data", str(tasks_dir / "test_mixed.jsonl")]
    argv += ["--test_alt", str(tasks_dir / "test_mixed_alt.jsonl"), "--output_dir", str(out)]
    argv += ["--steps", "4", "--batch_size", "4", "--num_samples", "8", "--quiet"]
    assert main(argv) == 0
    assert "| unseen | test |" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert (report["seen"], report["unseen"]) == split_tasks(TASKS, 0.4, 0)
    assert report["training"]["pairs"] > 0 and math.isfinite(report["training"]["loss_last10"])

    # the adapter loads through the embedders' own path and changes the vectors
    tuned = get_embedder(EmbedderConfig(adapter_path=str(out / ADAPTER_DIR)))
    base = get_embedder(EmbedderConfig())
    texts = ["What is the sum of 3 and 4?"]
    assert np.abs(tuned.encode_queries(texts) - base.encode_queries(texts)).max() > 1e-4

    # the rebuilt pool: same adapters, new keys made by (and labelled with) the tuned embedder
    rebuilt = AdapterPool.from_configs(report["rebuilt_pool"])
    original = AdapterPool.from_configs(config)
    assert rebuilt.names == original.names
    assert [e.lora_path for e in rebuilt] == [e.lora_path for e in original]
    assert rebuilt.key_meta().adapter == tuned.meta().adapter
    assert rebuilt.key_meta().adapter.startswith(f"{ADAPTER_DIR}@") and original.key_meta().adapter is None
    assert np.abs(rebuilt.keys() - original.keys()).max() > 1e-4

    # before/after numbers = an independent recomputation (cosine to the keys, argmax)
    test = read_samples(tasks_dir / "test_mixed.jsonl")
    for when, pool, embedder in (("before", original, base), ("after", rebuilt, tuned)):
        got = report["retrieval"][when]["test"]
        assert got["unseen"]["top1"] == pytest.approx(_top1(pool, embedder, test, report["unseen"]))
        assert got["seen"]["top1"] == pytest.approx(_top1(pool, embedder, test, report["seen"]))
        assert got["unseen"]["n"] == 4 * len(report["unseen"])

    # an earlier run is never replaced silently
    with pytest.raises(FileExistsError, match="holds an earlier run .*--overwrite"):
        from lora_retriever.train_retriever import train_retriever

        train_retriever(
            RetrieverTrainConfig(
                pool=str(config),
                test_data=str(tasks_dir / "test_mixed.jsonl"),
                test_alt=None,
                output_dir=str(out),
                steps=1,
                batch_size=2,
            )
        )

    # keys built with one embedder, queried with another: an error before any model loads
    from lora_retriever.cli.eval import main as eval_main

    eval_argv = ["--pool", str(config), "--test_data", str(tasks_dir / "test_mixed.jsonl"), "--test_alt", ""]
    eval_argv += ["--embedder_adapter_path", str(out / ADAPTER_DIR), "--output_dir", str(tmp_path / "eval")]
    assert eval_main([*eval_argv, "--model_type", "llama", "--model_path", str(root / "missing")]) == 2
    assert "embedder adapter None vs" in capsys.readouterr().err
