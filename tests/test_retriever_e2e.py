"""The main path end to end: keys from samples (real MiniLM) -> retrieval -> mixture / fusion -> generate -> score."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
from peft import PeftModel

from lora_retriever import AdapterPool, FusionComposer, LoraRetriever, LoraRetrieverConfig, MixtureComposer
from lora_retriever.embed_pool import embed_pool
from lora_retriever.embedders import EmbedderConfig, get_embedder
from lora_retriever.pool import key_meta_path
from lora_retriever.retriever import RetrievedAdapter
from swift.llm import get_model_tokenizer, get_template
from swift.tuners import lora_mixture_context
from tests.factories import make_lora_dir
from tests.tiny_vlms import save_tiny_llama
from tests.tolerances import SAME_SHAPES_ATOL

TASKS = {
    "capitals": (
        [f"What is the capital of {c}?" for c in ("France", "Japan", "Peru", "Kenya", "Chile", "Spain")],
        ["Which city is the capital of Italy?", "Name the capital city of Egypt."],
    ),
    "arithmetic": (
        [f"What is {a} + {b}?" for a, b in ((12, 35), (40, 2), (7, 19), (55, 31), (3, 8), (60, 27))],
        ["Add 14 and 23.", "Compute the sum of 45 and 16."],
    ),
    "translation": (
        [
            f"Translate the country name {c} into French."
            for c in ("Germany", "Spain", "Brazil", "China", "Norway", "Greece")
        ],
        ["How do you say Sweden in French?", "Give the French name of the country Mexico."],
    ),
    "sentiment": (
        [
            f"Is the word '{w}' positive or negative?"
            for w in ("happy", "awful", "lovely", "terrible", "great", "sad")
        ],
        [
            "Tell me whether 'wonderful' has a positive or negative sentiment.",
            "What is the sentiment of the word 'horrible'?",
        ],
    ),
}


@pytest.fixture(scope="module")
def minilm():
    return get_embedder(EmbedderConfig())


@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm):
    """A tiny Llama dir, four task adapters with samples, a pool config with MiniLM keys, and a test set."""
    root = tmp_path_factory.mktemp("e2e")
    model_dir = save_tiny_llama(root / "model")
    model, _ = get_model_tokenizer("llama", model_dir)
    entries, test = [], []
    for i, (task, (train, queries)) in enumerate(TASKS.items()):
        make_lora_dir(
            model,
            root / "adapters" / task,
            r=4 + 4 * (i % 2),
            lora_alpha=16,
            target_modules=["q_proj", "v_proj", "down_proj"],
            seed=10 + i,
            std=0.2,
        )
        samples = root / "samples" / f"{task}.jsonl"
        samples.parent.mkdir(exist_ok=True)
        samples.write_text("".join(json.dumps({"input": q, "output": "x"}) + "\n" for q in train))
        entries.append(
            {
                "lora_name": task,
                "lora_path": f"adapters/{task}",
                "samples_path": f"samples/{task}.jsonl",
                "description": task,
                "lora_type": "app" if i % 2 else "category",
            }
        )
        test += [
            {"id": f"{task}-{j}", "query": q, "response": "x", "task": task} for j, q in enumerate(queries)
        ]
    config = root / "pool.json"
    config.write_text(json.dumps(entries))
    embed_pool(config, minilm, num_samples=5, progress=False)
    test_path = root / "test.jsonl"
    test_path.write_text("".join(json.dumps(t) + "\n" for t in test))
    return {"root": root, "model_dir": model_dir, "config": config, "test": test_path, "queries": test}


def test_embed_pool_writes_keys_meta_and_config(setup):
    config = json.loads(setup["config"].read_text())
    assert [e["embedding_path"] for e in config] == [f"keys/{t}.npy" for t in TASKS]
    assert config[0]["lora_type"] == "category"  # unknown fields kept through the rewrite
    key_path = setup["root"] / "keys" / "capitals.npy"
    key = np.load(key_path)
    assert key.shape == (384,) and abs(np.linalg.norm(key) - 1) < 1e-5
    meta = json.loads(key_meta_path(key_path).read_text())
    assert meta["model_id"] == "all-MiniLM-L6-v2" and meta["dim"] == 384 and meta["num_samples"] == 5
    assert len(set(meta["sample_ids"])) == 5 and meta["instruction"] and meta["date"]


def test_minilm_retrieves_the_right_adapter_for_reworded_queries(setup, minilm):
    retriever = LoraRetriever(
        LoraRetrieverConfig(pool_configs=[str(setup["config"])], top_k=2), embedder=minilm
    )
    queries = setup["queries"]
    results = retriever.retrieve([q["query"] for q in queries])
    assert [r[0].name for r in results] == [q["task"] for q in queries]
    assert all(abs(sum(a.weight for a in r) - 1) < 1e-9 for r in results)
    ood = retriever.retrieve([q["query"] for q in queries], exclude=[q["task"] for q in queries])
    assert all(q["task"] not in [a.name for a in r] for q, r in zip(queries, ood))
    table = retriever.show_similarities([queries[0]["query"]])
    assert "capitals" in table.splitlines()[1]
    app_only = LoraRetriever(
        LoraRetrieverConfig(pool_configs=[str(setup["config"])], lora_type="app"), embedder=minilm
    )
    assert app_only.pool.names == ["arithmetic", "sentiment"]


def test_query_embedder_must_match_the_keys(setup):
    other = get_embedder(EmbedderConfig(query_instruction="query: "))
    retriever = LoraRetriever(LoraRetrieverConfig(pool_configs=[str(setup["config"])]), embedder=other)
    with pytest.raises(ValueError, match="instruction"):
        retriever.retrieve(["What is the capital of Peru?"])


@pytest.fixture(scope="module")
def lm(setup):
    model, tokenizer = get_model_tokenizer("llama", setup["model_dir"])
    return model, get_template("llama", tokenizer)


def test_cat_fusion_generates_exactly_like_mixture(setup, lm):
    model, template = lm
    pool = AdapterPool.from_configs(setup["config"])
    queries = [q["query"] for q in setup["queries"][:4]]
    selections = [
        [RetrievedAdapter("capitals", 0.5, 0.9), RetrievedAdapter("arithmetic", 0.5, 0.8)],
        [RetrievedAdapter("translation", 1.0, 0.9)],
        [RetrievedAdapter("capitals", 0.5, 0.9), RetrievedAdapter("arithmetic", 0.5, 0.8)],
        [
            RetrievedAdapter("sentiment", 0.2, 0.9),
            RetrievedAdapter("capitals", 0.3, 0.5),
            RetrievedAdapter("translation", 0.5, 0.4),
        ],
    ]
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=6, do_sample=False)
    mixture = MixtureComposer(
        copy.deepcopy(model), template, pool, batch_size=4, generation_config=gen, progress=False
    )
    fusion = FusionComposer(
        copy.deepcopy(model),
        template,
        pool,
        method="cat",
        batch_size=4,
        cache_size=2,
        generation_config=gen,
        progress=False,
    )
    mixed = mixture.generate(queries, selections)
    fused = fusion.generate(queries, selections)
    assert mixed == fused
    # three distinct selections stay loaded for the call, then the cache is trimmed to cache_size=2
    assert len(fusion._fused) == 2
    assert set(fusion.model.adapter_names) == {
        name for name, _ in fusion._fused.values()
    }  # evicted = unloaded
    base = MixtureComposer(
        copy.deepcopy(model), template, pool, batch_size=4, generation_config=gen, progress=False
    ).generate(queries, [[] for _ in queries])
    assert base != mixed

    # Logit-level: the saved cat adapter, in plain PEFT, equals the mixture of its sources for that sample.
    out = fusion.save(selections[3], setup["root"] / "fused_cat")
    ids = template.encode_batch([queries[3]])["input_ids"]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(out)).eval()
    with (
        torch.no_grad(),
        lora_mixture_context(torch.tensor([[0.2, 0.3, 0.5]]), ["sentiment", "capitals", "translation"]),
    ):
        mixture_logits = mixture.model(input_ids=ids).logits
    with torch.no_grad():
        assert (peft_model(input_ids=ids).logits - mixture_logits).abs().max() <= SAME_SHAPES_ATOL  # same ids


def test_composers_share_one_model_explicitly(setup, lm):
    """A composer wraps a plain model once and never swaps it; sharing means passing composer.model."""
    from swift.tuners import SwiftModel

    model, template = lm
    pool = AdapterPool.from_configs(setup["config"])
    plain = copy.deepcopy(model)
    first = MixtureComposer(plain, template, pool, progress=False)
    assert isinstance(first.model, SwiftModel) and first.model.base_model is plain
    wrapper = first.model
    first.generate(["Capital of France?"], [[RetrievedAdapter("capitals", 1.0, 0.9)]])
    assert first.model is wrapper and first.model.adapter_names == ["capitals"]
    with pytest.raises(ValueError, match="pass that SwiftModel"):
        FusionComposer(plain, template, pool, method="cat")  # the plain model is already inside `first`
    second = FusionComposer(first.model, template, pool, method="cat", progress=False)
    assert second.model is wrapper
    second.generate(["Capital of Peru?"], [[RetrievedAdapter("capitals", 1.0, 0.9)]])
    assert "capitals" in wrapper.adapter_names and first.model is wrapper  # loaded once, shared


def test_svd_fusion_composer_reports_truncation(setup, lm):
    model, template = lm
    pool = AdapterPool.from_configs(setup["config"])
    sel = [RetrievedAdapter("capitals", 0.5, 0.9), RetrievedAdapter("arithmetic", 0.5, 0.8)]
    exact = FusionComposer(copy.deepcopy(model), template, pool, method="svd").fused_adapter(sel)
    cut = FusionComposer(
        copy.deepcopy(model), template, pool, method="svd", fusion_options={"svd_rank": 2}
    ).fused_adapter(sel)
    assert max(exact.truncation_error.values()) < 1e-6
    assert min(cut.truncation_error.values()) > 0


@pytest.mark.parametrize("method", ["mixture", "fusion", "selection", "base", "oracle"])
def test_cli_end_to_end_every_merge_method(setup, method, tmp_path):
    import infer_lora_retriever

    out = tmp_path / method
    argv = [
        "--test_data",
        str(setup["test"]),
        "--model_type",
        "llama",
        "--model_path",
        str(setup["model_dir"]),
        "--pool",
        str(setup["config"]),
        "--merge_method",
        method,
        "--top_k",
        "2",
        "--max_new_tokens",
        "3",
        "--batch_size",
        "3",
        "--output_dir",
        str(out),
        "--quiet",
    ]
    assert infer_lora_retriever.main(argv) == 0
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(records) == len(setup["queries"]) and all(r["error"] is None for r in records)
    assert set(metrics["tasks"]) == set(TASKS) and metrics["overall"]["n"] == len(records)
    expected_k = {"mixture": 2, "fusion": 2, "selection": 1, "base": 0, "oracle": 1}[method]
    assert all(len(r["selected"]) == expected_k for r in records)
    if method in ("mixture", "fusion", "selection"):
        assert metrics["overall"]["retrieval_top1"] == 1.0
    if method == "oracle":
        assert all(r["selected"][0]["name"] == r["task"] for r in records)


def test_cli_ood_and_images_for_a_text_model(setup, tmp_path, capsys):
    """OOD excludes each sample's own adapter; a sample with an image for a text-only model is refused before
    the model loads (naming the sample and the fix), and nothing is written."""
    from PIL import Image

    import infer_lora_retriever
    from lora_retriever.pipeline import score

    common = [
        "--model_type",
        "llama",
        "--model_path",
        str(setup["model_dir"]),
        "--pool",
        str(setup["config"]),
    ]
    common += ["--top_k", "2", "--max_new_tokens", "2", "--quiet"]
    out = tmp_path / "ood"
    assert (
        infer_lora_retriever.main(
            ["--test_data", str(setup["test"]), "--ood", "--output_dir", str(out), *common]
        )
        == 0
    )
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == len(setup["queries"]) and all(r["error"] is None for r in records)
    assert all(r["task"] not in [a["name"] for a in r["selected"]] for r in records)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "retrieval_top1" not in metrics["overall"]  # meaningless when the own adapter is excluded

    Image.new("RGB", (8, 8), "red").save(tmp_path / "peru.png")
    bad = {"id": "bad", "query": "<image> Capital of Peru?", "images": ["peru.png"], "task": "capitals"}
    data = tmp_path / "test.jsonl"
    data.write_text(setup["test"].read_text() + json.dumps(bad) + "\n")
    refused = tmp_path / "refused"
    assert infer_lora_retriever.main(["--test_data", str(data), "--output_dir", str(refused), *common]) == 2
    err = capsys.readouterr().err
    assert "['bad']" in err and "has no vision tower" in err and "--model_type" in err
    assert not (refused / "predictions.jsonl").exists()

    # A sample that failed at generation time is kept and counted wrong (failed), never skipped.
    failed = {**records[0], "prediction": "", "error": "RuntimeError: boom"}
    metrics = score([failed, *records[1:]], None, retrieved=False, top_k=2)
    assert metrics["overall"]["failed"] == 1 and metrics["overall"]["n"] == len(records)


def test_cli_bad_inputs(setup, tmp_path, capsys):
    """User mistakes: one `error:` line and exit code 2; --debug raises the exception itself."""
    import infer_lora_retriever

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "ok"}\n{"query": \n')
    img = tmp_path / "img.jsonl"
    img.write_text(json.dumps({"query": "<image> what?", "images": ["missing.png"]}) + "\n")
    cases = [
        (
            ["--test_data", str(bad), "--pool", str(setup["config"])],
            ValueError,
            r"bad\.jsonl:2: malformed JSON",
        ),
        (["--test_data", str(setup["test"])], ValueError, "needs an adapter pool"),
        (["--test_data", str(img), "--merge_method", "base"], FileNotFoundError, "missing.png"),
    ]
    for argv, error, message in cases:
        assert infer_lora_retriever.main([*argv, "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and re.search(message, err) and "Traceback" not in err
        with pytest.raises(error, match=message):
            infer_lora_retriever.main([*argv, "--output_dir", str(tmp_path / "out"), "--debug"])


def test_paper_protocol_on_one_pool_and_on_app_category_pools(setup, minilm, tmp_path):
    """lora-retriever-eval: every method, IID and OOD, scored by the one rule; with app + category configs
    the pools app, category and all; OOD never composes a sample's own (task or category) adapter."""
    from lora_retriever.cli.eval import main as eval_main

    common = ["--model_type", "llama", "--model_path", str(setup["model_dir"]), "--test_alt", ""]
    common += ["--max_new_tokens", "2", "--batch_size", "4", "--top_k", "2", "--quiet"]
    out = tmp_path / "one"
    argv = ["--pool", str(setup["config"]), "--test_data", str(setup["test"]), "--output_dir", str(out)]
    assert eval_main([*argv, *common]) == 0
    result = json.loads((out / "results.json").read_text())
    expected = {"base/iid", "oracle/iid"} | {
        f"{m}/{s}"
        for m in ("selection", "mixture", "fusion_linear", "fusion_cat", "uniform_all")
        for s in ("iid", "ood")
    }
    assert set(result["scores"]) == expected
    assert result["retrieval"]["test"] == {"top1": 1.0, "top3": 1.0}
    assert (out / "table.md").is_file() and (out / "results.png").stat().st_size > 0
    for label, score in result["scores"].items():
        assert 0.0 <= score["average"] <= 1.0 and score["failed"] == 0, label
        if label.endswith("/ood"):
            assert all(ex["task"] not in ex["selected"] for ex in score["examples"]), label

    # App adapters (one per task) and category adapters (one per pair of tasks) in two configs.
    root = setup["root"]
    category_of = {"capitals": "facts", "translation": "facts", "arithmetic": "skills", "sentiment": "skills"}
    app = [
        {"lora_name": t, "lora_path": f"adapters/{t}", "samples_path": f"samples/{t}.jsonl", "task": t,
         "category": category_of[t]}
        for t in TASKS
    ]  # fmt: skip
    cats = [
        {"lora_name": "facts", "lora_path": "adapters/capitals", "samples_path": "samples/capitals.jsonl",
         "category": "facts"},
        {"lora_name": "skills", "lora_path": "adapters/arithmetic", "samples_path": "samples/arithmetic.jsonl",
         "category": "skills"},
    ]  # fmt: skip
    app_config, cat_config = root / "app.json", root / "cat.json"
    app_config.write_text(json.dumps(app))
    cat_config.write_text(json.dumps(cats))
    for config in (app_config, cat_config):
        embed_pool(config, minilm, num_samples=5, progress=False)
    test = tmp_path / "test_cat.jsonl"
    test.write_text(
        "".join(json.dumps({**q, "category": category_of[q["task"]]}) + "\n" for q in setup["queries"])
    )
    out = tmp_path / "kinds"
    argv = ["--app_config", str(app_config), "--category_config", str(cat_config), "--test_data", str(test)]
    argv += ["--output_dir", str(out), "--methods", "oracle", "mixture", "uniform_all"]
    assert eval_main([*argv, *common]) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["retrieval"]) == {"app:test", "category:test", "all:test"}
    assert {label.split(":")[0] for label in result["scores"]} == {"app", "category", "all"}
    summary = (out / "table.md").read_text().split("\n\n")[0].splitlines()  # methods x (pool, setting)
    assert summary[0].startswith("| method | app IID | app OOD | category IID")
    oracle_row = next(line for line in summary if line.startswith("| oracle |"))
    app_oracle = result["scores"]["app:oracle/iid"]["average"]
    assert oracle_row.split("|")[2].strip() == f"{app_oracle:.3f}" and oracle_row.split("|")[3].strip() == "–"
    oracle = result["scores"]["category:oracle/iid"]["examples"]
    assert all(ex["selected"] == [category_of[ex["task"]]] for ex in oracle)  # the category pool's own
    for label in ("all:mixture/ood", "all:uniform_all/ood"):
        for ex in result["scores"][label]["examples"]:
            assert not {ex["task"], category_of[ex["task"]]} & set(ex["selected"]), (label, ex)
