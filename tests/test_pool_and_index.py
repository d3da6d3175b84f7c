"""Adapter pools (validation, filtering, paths), key indexes (exact vs FAISS), retrieval weights and OOD."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora_retriever.index import ExactIndex, FaissFlatIndex, FaissHNSWIndex, build_index
from lora_retriever.pool import AdapterPool, PoolValidationError, key_meta_path
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, adapter_weights

# Tolerances: cosine similarities of unit vectors (|s| <= 1) from numpy vs FAISS kernels: 1e-5 absolute is
# ~100 ulps; exact-index results vs the brute-force product use the same numpy matmul (1e-6).


def write_adapter_dir(path, base_model=None, weights="adapter_model.safetensors"):
    """A PEFT-format folder: ``adapter_config.json`` and a (tiny, valid) weights file named ``weights``."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        "base_model.model.q_proj.lora_A.weight": np.zeros((2, 4), np.float32),
        "base_model.model.q_proj.lora_B.weight": np.zeros((4, 2), np.float32),
    }
    if weights.endswith(".safetensors"):
        save_file(tensors, str(path / weights))
    elif weights:
        (path / weights).write_bytes(b"legacy torch pickle")  # only its presence is validated up front
    return path


def write_pool(root, entries, name="pool.json", dims=None, meta_model="test-embedder"):
    """Create adapter dirs + keys for ``entries`` (list of names or dicts) and a config; returns its path."""
    rng = np.random.default_rng(0)
    data = []
    for i, entry in enumerate(entries):
        entry = {"lora_name": entry} if isinstance(entry, str) else dict(entry)
        name_ = entry["lora_name"]
        write_adapter_dir(root / "adapters" / name_)
        key = root / "keys" / f"{name_}.npy"
        key.parent.mkdir(exist_ok=True)
        dim = dims[i] if dims else 8
        np.save(key, rng.normal(size=dim).astype(np.float32))
        key_meta_path(key).write_text(json.dumps({"model_id": meta_model, "dim": dim}))
        data.append({"lora_path": f"adapters/{name_}", "embedding_path": f"keys/{name_}.npy", **entry})
    path = root / name
    path.write_text(json.dumps(data))
    return path


def test_pool_resolves_relative_paths_and_keeps_unknown_fields(tmp_path):
    config = write_pool(tmp_path, [{"lora_name": "a", "lora_type": "app", "owner": "me"}, "b"])
    pool = AdapterPool.from_configs(config)
    assert pool.names == ["a", "b"]
    assert pool["a"].lora_path == (tmp_path / "adapters" / "a").resolve()
    assert pool["a"].extra == {"lora_type": "app", "owner": "me"}
    assert pool.keys().shape == (2, 8)
    np.testing.assert_allclose(np.linalg.norm(pool.keys(), axis=1), 1.0, rtol=1e-6)
    assert (pool.key_meta().model_id, pool.key_meta().dim) == ("test-embedder", 8)
    out = tmp_path / "copy" / "pool.json"
    pool.save(out)
    saved = json.loads(out.read_text())
    assert saved[0]["owner"] == "me" and saved[0]["lora_path"] == "../adapters/a"
    assert AdapterPool.from_configs(out).names == ["a", "b"]


def test_pool_reports_every_problem_at_once(tmp_path):
    config = write_pool(tmp_path, ["a", "b", "c", "d"], dims=[8, 8, 8, 4])
    data = json.loads(config.read_text())
    data.append(dict(data[0]))  # duplicate name
    data[1]["lora_path"] = "adapters/missing"
    data[2]["embedding_path"] = "keys/missing.npy"
    data.append({"description": "no name"})
    config.write_text(json.dumps(data))
    with pytest.raises(PoolValidationError) as err:
        AdapterPool.from_configs([config, tmp_path / "nope.json"])
    text = str(err.value)
    assert len(err.value.problems) == 6, text
    for needle in (
        "duplicate lora_name 'a'",
        "adapters/missing does not exist",
        "keys/missing.npy does not exist",
        "key dimensions differ",
        "missing field(s) ['lora_name', 'lora_path']",
        "nope.json does not exist",
    ):
        assert needle in text


def test_validate_names_every_broken_adapter_and_key(tmp_path):
    names = [
        "ok",
        "gone",
        "file",
        "no_config",
        "bad_config",
        "no_weights",
        "bad_key",
        "bad_meta",
        "wrong_dim",
    ]
    config = write_pool(tmp_path, names)
    adapters, keys = tmp_path / "adapters", tmp_path / "keys"
    for name in ("gone", "file"):
        for child in (adapters / name).iterdir():
            child.unlink()
        (adapters / name).rmdir()
    (adapters / "file").write_text("not a folder")
    (adapters / "no_config" / "adapter_config.json").unlink()
    (adapters / "bad_config" / "adapter_config.json").write_text("{'peft_type': LORA")
    (adapters / "no_weights" / "adapter_model.safetensors").unlink()
    (keys / "bad_key.npy").write_bytes(b"not numpy")
    key_meta_path(keys / "bad_meta.npy").write_text("{oops")
    key_meta_path(keys / "wrong_dim.npy").write_text(json.dumps({"model_id": "test-embedder", "dim": 16}))
    with pytest.raises(PoolValidationError) as err:
        AdapterPool.from_configs(config)
    problems = err.value.problems
    expected = {
        "gone": "adapters/gone does not exist",
        "file": "adapters/file is not a directory",
        "no_config": "adapters/no_config has no adapter_config.json",
        "bad_config": "adapter_config.json is not valid JSON",
        "no_weights": "has no weights file (adapter_model.safetensors or legacy adapter_model.bin)",
        "bad_key": "keys/bad_key.npy is not a readable .npy array",
        "bad_meta": "bad_meta.meta.json is unreadable",
        "wrong_dim": "holds a 8-d vector but",
    }
    assert len(problems) == len(expected), problems
    for name, needle in expected.items():
        assert any(p.startswith(f"'{name}'") and needle in p for p in problems), (name, problems)
    assert not any(p.startswith("'ok'") for p in problems)


def test_validate_accepts_a_legacy_bin_and_refuses_keys_of_two_embedders(tmp_path):
    config = write_pool(tmp_path, ["a", "b"])
    (tmp_path / "adapters" / "a" / "adapter_model.safetensors").unlink()
    write_adapter_dir(tmp_path / "adapters" / "a", weights="adapter_model.bin")
    assert AdapterPool.from_configs(config).names == ["a", "b"]
    key_meta_path(tmp_path / "keys" / "b.npy").write_text(
        json.dumps({"model_id": "other-embedder", "dim": 8})
    )
    with pytest.raises(PoolValidationError, match="model_id 'test-embedder' vs 'other-embedder'"):
        AdapterPool.from_configs(config)


def test_base_model_mismatch_warns_or_fails_when_strict(tmp_path, caplog):
    smollm2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config = write_pool(tmp_path, ["adapter_says", {"lora_name": "entry_says", "base_model": "org/Other-7B"}])
    write_adapter_dir(tmp_path / "adapters" / "adapter_says", base_model=smollm2)
    write_adapter_dir(tmp_path / "adapters" / "entry_says", base_model=smollm2)  # the entry's field wins
    pool = AdapterPool.from_configs(config)
    assert pool.validate() == []  # no model named: nothing to compare
    # Swift.from_pretrained's rule: our fp32 cache of SmolLM2 is the same model as the hub id
    with caplog.at_level("WARNING", logger="lora_retriever.pool"):
        warnings = pool.validate(base_model="/cache/models/SmolLM2-135M-Instruct-fp32")
    assert warnings == [
        f"'entry_says' ({config}): adapter was trained on 'org/Other-7B' but the model to load is "
        "'/cache/models/SmolLM2-135M-Instruct-fp32'; its outputs may be meaningless (load the model it was "
        "trained on, or leave it out of the pool)"
    ]
    assert warnings[0] in caplog.text
    assert [w.split()[0] for w in pool.validate(base_model="org/Other-7B")] == ["'adapter_says'"]
    with pytest.raises(PoolValidationError) as err:
        AdapterPool.from_configs(config, base_model="org/Other-7B", strict_base_model=True)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("'adapter_says'")
    assert f"trained on {smollm2!r}" in err.value.problems[0]


def test_pool_filter_by_field(tmp_path):
    app = write_pool(tmp_path, ["a", "b"], name="app.json")
    cat = write_pool(tmp_path, [{"lora_name": "shop", "lora_type": "category"}], name="cat.json")
    pool = AdapterPool.from_configs([app, cat], defaults=[{"lora_type": "app"}, {"lora_type": "category"}])
    assert pool.filter("lora_type", "app").names == ["a", "b"]
    assert pool.filter("lora_type", "category").names == ["shop"]
    assert pool.filter("lora_type", "all").names == ["a", "b", "shop"]
    with pytest.raises(ValueError, match="values in the pool"):
        pool.filter("lora_type", "domain")


def test_faiss_flat_equals_exact_and_hnsw_recall():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(2000, 32)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    queries = rng.normal(size=(50, 32)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    exact_s, exact_i = ExactIndex(keys).search(queries, 5)
    flat_s, flat_i = FaissFlatIndex(keys).search(queries, 5)
    np.testing.assert_array_equal(exact_i, flat_i)
    np.testing.assert_allclose(exact_s, flat_s, atol=1e-5)
    np.testing.assert_allclose(exact_s, np.sort(queries @ keys.T, axis=1)[:, ::-1][:, :5], atol=1e-6)
    _, hnsw_i = FaissHNSWIndex(keys, ef_search=128).search(queries, 3)
    recall = np.mean([len(set(h) & set(e)) / 3 for h, e in zip(hnsw_i, exact_i[:, :3])])
    assert recall >= 0.95
    small_s, small_i = ExactIndex(keys[:2]).search(queries[:1], 4)
    assert small_i[0].tolist()[2:] == [-1, -1]


def test_index_refuses_other_embedders():
    index = build_index(np.eye(4, dtype=np.float32), "exact", model_id="minilm")
    with pytest.raises(ValueError, match="4-d"):
        index.check_queries(np.ones((1, 3)), "minilm")
    with pytest.raises(ValueError, match="embedded with 'other'"):
        index.check_queries(np.ones((1, 4)), "other")
    with pytest.raises(ValueError, match="unknown index kind"):
        build_index(np.eye(4), "ivf")


@pytest.mark.parametrize("mode", ["uniform", "softmax", "similarity"])
def test_weights_sum_to_one(mode):
    sims = np.array([0.9, 0.5, -0.2])
    w = adapter_weights(sims, mode, temperature=0.1)
    assert w.sum() == pytest.approx(1.0) and (w >= 0).all()
    if mode == "uniform":
        np.testing.assert_allclose(w, 1 / 3)
    else:
        assert w[0] > w[1] >= w[2]
    if mode == "similarity":
        assert w[2] == 0.0


def test_retrieve_vectors_ood_excludes_and_ranks(tmp_path):
    config = write_pool(tmp_path, ["a", "b", "c", "d"])
    pool = AdapterPool.from_configs(config)
    retriever = LoraRetriever(LoraRetrieverConfig(top_k=2), pool=pool, embedder=object())
    keys = pool.keys()
    queries = keys[[0, 2]] + 0.01
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    iid = retriever.retrieve_vectors(queries, model_id="test-embedder")
    assert [r[0].name for r in iid] == ["a", "c"]
    assert all(abs(sum(x.weight for x in r) - 1) < 1e-9 and len(r) == 2 for r in iid)
    assert iid[0][0].similarity >= iid[0][1].similarity
    ood = retriever.retrieve_vectors(queries, exclude=["a", None], model_id="test-embedder")
    assert "a" not in [x.name for x in ood[0]] and len(ood[0]) == 2
    assert ood[1][0].name == "c"
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 queries"):
        retriever.retrieve_vectors(queries, exclude=["a"])
    with pytest.raises(ValueError, match="embedded with 'minilm'"):
        retriever.retrieve_vectors(queries, model_id="minilm")
    with pytest.raises(ValueError, match="top_k"):
        retriever.retrieve_vectors(queries, top_k=0)


def test_config_validation():
    with pytest.raises(ValueError, match="weight_mode"):
        LoraRetrieverConfig(weight_mode="max")
    with pytest.raises(ValueError, match="temperature"):
        LoraRetrieverConfig(temperature=0)
    with pytest.raises(ValueError, match="unknown LoraRetrieverConfig field"):
        LoraRetrieverConfig.from_dict({"topk": 3})
