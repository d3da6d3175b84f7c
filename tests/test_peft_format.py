"""swift.tuners.peft_format: the one reader/writer of PEFT adapters, against PEFT 0.21 as the reference."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from swift.tuners import AdapterLoadError, Swift
from swift.tuners.peft_format import (
    CONFIG_NAME,
    SAFETENSORS_NAME,
    LoraAdapterConfig,
    base_weight_matches,
    lora_scaling,
    read_adapter_dir,
    read_state_dict,
    write_adapter_dir,
)
from tests.factories import VOCAB, make_lora_dir

# Both sides of every logit comparison here run the same tiny model on the same batch shape, so fp32
# results agree to rounding noise (~1e-7 on logits of magnitude ~1); 1e-5 leaves room for kernel order only.
TOL = 1e-5


@pytest.fixture
def base(tiny_llama):
    return tiny_llama


@pytest.fixture
def adapter(base, tmp_path):
    """A PEFT-saved LoRA (r=4) on q_proj / v_proj."""
    return make_lora_dir(base, tmp_path / "qv", r=4, target_modules=["q_proj", "v_proj"])


@pytest.fixture
def lm_head_adapter(base, tmp_path):
    """Saved by PEFT itself with lm_head targeted: the file holds base_model.model.lm_head.base_layer.weight."""
    return make_lora_dir(base, tmp_path / "lm_head", r=4, target_modules=["q_proj", "lm_head"])


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def edit_weights(path, edit) -> None:
    weights = load_file(str(path / SAFETENSORS_NAME))
    edit(weights)
    save_file(weights, str(path / SAFETENSORS_NAME))


# ----------------------------------------------------------------------------------------------------------
# Scaling: one rule, checked against what PEFT computes
# ----------------------------------------------------------------------------------------------------------


def test_scaling_with_patterns_and_rslora_equals_peft(base, tmp_path):
    path = make_lora_dir(
        base,
        tmp_path / "patterns",
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "o_proj"],
        use_rslora=True,
        rank_pattern={"v_proj": 4},
        alpha_pattern={"layers.1.self_attn.q_proj": 2},
    )
    adapter = read_adapter_dir(path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path))
    modules = dict(peft_model.base_model.model.named_modules())
    assert len(adapter.pairs) == 6
    for module, pair in adapter.pairs.items():
        layer = modules[module]
        assert pair.r == layer.r["default"], module
        assert adapter.scaling(module) == pytest.approx(layer.scaling["default"], rel=1e-12), module
    assert adapter.pairs["model.layers.0.self_attn.v_proj"].r == 4
    assert adapter.scaling("model.layers.1.self_attn.q_proj") == pytest.approx(2 / 8**0.5)


def test_lora_scaling_rule():
    assert lora_scaling(16, 4, use_rslora=False) == 4.0
    assert lora_scaling(16, 4, use_rslora=True) == 8.0
    config = LoraAdapterConfig.from_dict({"peft_type": "LORA", "r": 8, "alpha_pattern": {"v_proj": 4}})
    assert config.lora_alpha == 8.0  # PEFT's default lora_alpha
    assert config.scaling("model.layers.0.self_attn.v_proj", 8) == 0.5
    assert config.scaling("model.layers.0.self_attn.k_proj", 8) == 1.0


def test_rank_that_contradicts_the_config_is_refused(adapter):
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "rank_pattern": {"v_proj": 2}}))
    with pytest.raises(AdapterLoadError, match=r"v_proj has rank 4 but adapter_config.json says r=2"):
        read_adapter_dir(adapter)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("r", "eight", r"cfg\.json: a field has the wrong type"),
        ("r", 0, r"cfg\.json: r must be a positive integer, got 0"),
        ("lora_alpha", float("inf"), r"cfg\.json: lora_alpha must be a finite number, got inf"),
        ("peft_type", "IA3", r"cfg\.json: peft_type is 'IA3'"),
    ],
)
def test_bad_config_values_are_named(field, value, message):
    with pytest.raises(AdapterLoadError, match=message):
        LoraAdapterConfig.from_dict({"peft_type": "LORA", field: value}, source="cfg.json")


# ----------------------------------------------------------------------------------------------------------
# Key dialects
# ----------------------------------------------------------------------------------------------------------


def test_adapter_name_segment_keys_read_like_peft_keys(base, adapter, tmp_path):
    """ms-swift / in-memory PEFT write lora_A.default.weight; it is the same adapter."""
    swift_dir = tmp_path / "ms_swift"
    swift_dir.mkdir()
    state = load_file(str(adapter / SAFETENSORS_NAME))
    save_file(
        {k.replace(".weight", ".default.weight"): v for k, v in state.items()},
        str(swift_dir / SAFETENSORS_NAME),
    )
    (swift_dir / CONFIG_NAME).write_text((adapter / CONFIG_NAME).read_text())
    plain, named = read_adapter_dir(adapter), read_adapter_dir(swift_dir)
    assert set(plain.pairs) == set(named.pairs)
    for module, pair in plain.pairs.items():
        assert torch.equal(pair.lora_A, named.pairs[module].lora_A)
        assert torch.equal(pair.lora_B, named.pairs[module].lora_B)
    ids = torch.randint(3, VOCAB, (2, 6))
    expected = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)), ids)
    got = logits(Swift.from_pretrained(copy.deepcopy(base), swift_dir), ids)
    assert (got - expected).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------
# Corrupt files and non-finite weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_names_the_file(base, adapter, damage):
    weights = adapter / SAFETENSORS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"this is not safetensors")
    for read in (read_adapter_dir, lambda p: Swift.from_pretrained(copy.deepcopy(base), p)):
        with pytest.raises(AdapterLoadError, match=rf"{weights}.* is corrupt"):
            read(adapter)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_bin_names_the_file(adapter, damage):
    weights = load_file(str(adapter / SAFETENSORS_NAME))
    (adapter / SAFETENSORS_NAME).unlink()
    path = adapter / "adapter_model.bin"
    torch.save(weights, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage, not a pickle")
    with pytest.raises(AdapterLoadError, match=rf"{path}.*corrupt"):
        read_adapter_dir(adapter)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_tensor_names_the_key_and_the_file(base, adapter, bad):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(weights):
        weights[key][3, 1] = bad

    edit_weights(adapter, poison)
    with pytest.raises(
        AdapterLoadError, match=rf"{adapter / SAFETENSORS_NAME}: tensor '{key}' holds 1 NaN/inf"
    ):
        Swift.from_pretrained(copy.deepcopy(base), adapter)


# ----------------------------------------------------------------------------------------------------------
# Base weights PEFT saves for lm_head / embed_tokens
# ----------------------------------------------------------------------------------------------------------


def test_peft_saves_lm_head_base_weight_and_the_reader_keeps_it_aside(base, lm_head_adapter):
    state = load_file(str(lm_head_adapter / SAFETENSORS_NAME))
    assert "base_model.model.lm_head.base_layer.weight" in state  # what PEFT 0.21 writes
    adapter = read_adapter_dir(lm_head_adapter)
    assert set(adapter.base_weights) == {"lm_head"}
    assert torch.equal(adapter.base_weights["lm_head"], base.lm_head.weight)
    assert "lm_head" in adapter.pairs


def test_lm_head_lora_loads_and_equals_peft(base, lm_head_adapter):
    ids = torch.randint(3, VOCAB, (3, 7))
    expected = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(lm_head_adapter)), ids)
    model = Swift.from_pretrained(copy.deepcopy(base), lm_head_adapter, adapter_name="x")
    assert "lm_head" in dict(model.lora_layers())
    assert (logits(model, ids) - expected).abs().max().item() <= TOL
    with torch.no_grad(), model.mixture(torch.ones(3, 1), ["x"]):
        one_hot = model(input_ids=ids).logits
    assert (one_hot - expected).abs().max().item() <= TOL
    assert (expected - logits(base, ids)).abs().max().item() > 1e-3  # the adapter does change the output


def test_lm_head_adapter_with_a_different_base_weight_is_refused(base, lm_head_adapter, tmp_path):
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / CONFIG_NAME).write_text((lm_head_adapter / CONFIG_NAME).read_text())
    state = load_file(str(lm_head_adapter / SAFETENSORS_NAME))
    state["base_model.model.lm_head.base_layer.weight"][5, 2] += 1e-3
    save_file(state, str(tampered / SAFETENSORS_NAME))
    model = Swift.from_pretrained(copy.deepcopy(base), lm_head_adapter, adapter_name="good")
    with pytest.raises(AdapterLoadError, match=r"carries a different base weight for lm_head.*resized"):
        Swift.from_pretrained(model, tampered, adapter_name="bad")
    assert model.adapter_names == ["good"]


def test_resized_vocabulary_is_refused(base, lm_head_adapter, tmp_path):
    resized = copy.deepcopy(base)
    resized.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(AdapterLoadError, match="lm_head|shape mismatch"):
        Swift.from_pretrained(resized, lm_head_adapter)


def test_embedding_lora_is_still_refused_with_its_reason(base, tmp_path):
    path = make_lora_dir(base, tmp_path / "emb", r=4, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterLoadError, match=r"embed_tokens\.lora_embedding_A.*embedding LoRA"):
        Swift.from_pretrained(copy.deepcopy(base), path)


def test_base_weight_comparison_across_dtypes():
    weight = torch.randn(8, 4)
    assert base_weight_matches(weight, weight.clone())
    assert base_weight_matches(weight, weight.to(torch.bfloat16))  # one bf16 rounding of the same weight
    assert not base_weight_matches(weight, (weight * 1.01).to(torch.bfloat16))
    assert not base_weight_matches(weight, torch.randn(8, 5))
    nudged = weight.clone()
    nudged[0, 0] = torch.nextafter(nudged[0, 0], torch.tensor(float("inf")))
    assert not base_weight_matches(weight, nudged)  # same dtype: bit-exact


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def test_written_adapter_reloads_bit_exact_and_loads_in_peft(base, adapter, tmp_path):
    original = read_adapter_dir(adapter)
    out = write_adapter_dir(
        tmp_path / "new" / "copy", original.state, original.config, extra_files={"x.txt": "x"}
    )
    again = read_adapter_dir(out)
    assert again.state.keys() == original.state.keys()
    assert all(torch.equal(again.state[k], v) for k, v in original.state.items())
    assert json.loads((out / CONFIG_NAME).read_text()) == json.loads((adapter / CONFIG_NAME).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_NAME, SAFETENSORS_NAME, "x.txt"])
    assert [p.name for p in out.parent.iterdir()] == ["copy"]  # no temporary left behind
    ids = torch.randint(3, VOCAB, (2, 5))
    peft_a = logits(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)), ids)
    assert torch.equal(logits(PeftModel.from_pretrained(copy.deepcopy(base), str(out)), ids), peft_a)


def test_writer_replaces_its_files_and_keeps_others(adapter, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "README.md").write_text("mine")
    (out / SAFETENSORS_NAME).write_bytes(b"old")
    state = read_adapter_dir(adapter).state
    write_adapter_dir(out, state)
    assert (out / "README.md").read_text() == "mine"
    assert read_state_dict(out).keys() == state.keys()
    assert not (out / CONFIG_NAME).exists()


def test_failed_write_leaves_nothing(adapter, tmp_path):
    def fail(_file):
        raise RuntimeError("disk full")

    state = read_adapter_dir(adapter).state
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(RuntimeError, match="disk full"):
        write_adapter_dir(root / "out", state, extra_files={"meta.json": fail})
    assert list(root.iterdir()) == []
    existing = root / "existing"
    existing.mkdir()
    (existing / SAFETENSORS_NAME).write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        write_adapter_dir(existing, state, {"peft_type": "LORA"}, extra_files={"meta.json": fail})
    assert [p.name for p in existing.iterdir()] == [SAFETENSORS_NAME]  # no temporaries, no new config
    assert (existing / SAFETENSORS_NAME).read_bytes() == b"old"  # all written first, then all renamed
    (root / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        write_adapter_dir(root / "file", state)
