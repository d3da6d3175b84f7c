"""Swift.from_pretrained: strict validation of PEFT-format adapter directories."""

from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from swift.tuners import AdapterLoadError, Swift, SwiftModel
from tests.factories import VOCAB, make_lora_dir, tiny_causal_lm
from tests.tolerances import SAME_SHAPES_ATOL


@pytest.fixture(scope="module")
def base():
    return tiny_causal_lm("llama")


@pytest.fixture
def adapter(base, tmp_path):
    return make_lora_dir(base, tmp_path / "good", r=4, target_modules=["q_proj", "v_proj"])


def rewrite_weights(path, edit) -> None:
    weights = load_file(str(path / "adapter_model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "adapter_model.safetensors"))


def rewrite_config(path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def load(base, path, name="x"):
    return Swift.from_pretrained(copy.deepcopy(base), path, adapter_name=name)


def test_loads_and_matches_peft(base, adapter):
    model = load(base, adapter)
    assert isinstance(model, SwiftModel) and model.adapter_names == ["x"]
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        expected = PeftModel.from_pretrained(copy.deepcopy(base), str(adapter))(input_ids=ids).logits
        assert (
            model(input_ids=ids).logits - expected
        ).abs().max() <= SAME_SHAPES_ATOL  # same batch, tiny model
    assert len(list(model.lora_layers())) == 4  # q_proj and v_proj in 2 layers


def test_missing_path(base, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(base, tmp_path / "nope")


def test_path_is_a_file(base, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        load(base, tmp_path / "f")


def test_no_adapter_config(base, adapter):
    (adapter / "adapter_config.json").unlink()
    with pytest.raises(AdapterLoadError, match="adapter_config.json"):
        load(base, adapter)


def test_not_lora(base, adapter):
    rewrite_config(adapter, peft_type="IA3")
    with pytest.raises(AdapterLoadError, match="peft_type is 'IA3'"):
        load(base, adapter)


def test_dora_refused(base, adapter):
    rewrite_config(adapter, use_dora=True)
    with pytest.raises(AdapterLoadError, match="DoRA"):
        load(base, adapter)


def test_no_weights_file(base, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights file"):
        load(base, adapter)


def test_key_maps_to_no_module(base, adapter):
    def add_stray(w):
        w["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 64)
        w["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.zeros(64, 4)

    rewrite_weights(adapter, add_stray)
    with pytest.raises(AdapterLoadError, match=r"model\.layers\.7\.self_attn\.q_proj.*maps to no module"):
        load(base, adapter)


def test_shape_mismatch(base, adapter):
    def widen(w):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        w[key] = torch.zeros(4, 65)

    rewrite_weights(adapter, widen)
    with pytest.raises(AdapterLoadError, match="shape mismatch at model.layers.0.self_attn.q_proj"):
        load(base, adapter)


def test_missing_half_names_the_key(base, adapter):
    rewrite_weights(
        adapter, lambda w: w.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    )
    with pytest.raises(
        AdapterLoadError, match=r"missing key base_model\.model\.model\.layers\.1\.self_attn\.v_proj\.lora_B"
    ):
        load(base, adapter)


def test_targeted_module_without_weights_is_an_error(base, adapter):
    def drop(w):
        for ab in "AB":
            w.pop(f"base_model.model.model.layers.1.self_attn.q_proj.lora_{ab}.weight")

    rewrite_weights(adapter, drop)
    with pytest.raises(AdapterLoadError, match=r"missing key .*layers\.1\.self_attn\.q_proj.*silently"):
        load(base, adapter)


def test_unexpected_key(base, adapter):
    rewrite_weights(adapter, lambda w: w.update({"base_model.model.lm_head.weight": torch.zeros(VOCAB, 64)}))
    with pytest.raises(AdapterLoadError, match="unexpected key 'base_model.model.lm_head.weight'"):
        load(base, adapter)


def test_rank_disagrees_with_config(base, adapter):
    rewrite_config(adapter, r=8)
    with pytest.raises(AdapterLoadError, match="rank 4 but adapter_config.json says r=8"):
        load(base, adapter)


def test_duplicate_name_and_failed_load_changes_nothing(base, adapter, tmp_path):
    model = load(base, adapter, name="a")
    with pytest.raises(ValueError, match="already loaded"):
        Swift.from_pretrained(model, adapter, adapter_name="a")
    broken = make_lora_dir(base, tmp_path / "broken", r=4, target_modules=["k_proj"])
    rewrite_weights(broken, lambda w: w.pop("base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"))
    with pytest.raises(AdapterLoadError):
        Swift.from_pretrained(model, broken, adapter_name="b")
    assert model.adapter_names == ["a"]
    assert all(not name.endswith("k_proj") for name, _ in model.lora_layers())


def test_bin_weights_load_with_weights_only(base, adapter):
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_model.safetensors").unlink()
    torch.save(weights, adapter / "adapter_model.bin")
    model = load(base, adapter)
    layer = dict(model.lora_layers())["model.layers.0.self_attn.q_proj"]
    expected = weights["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    assert torch.equal(layer.lora_weights("x")[0], expected)


class _Exploit:
    def __reduce__(self):
        return (exec, ("raise SystemExit('code ran during load')",))


def test_bin_with_code_is_refused(base, adapter):
    (adapter / "adapter_model.safetensors").unlink()
    with open(adapter / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Exploit()}, f)
    with pytest.raises(AdapterLoadError, match=r"adapter_model\.bin holds objects other than tensors") as err:
        load(base, adapter)
    assert isinstance(err.value.__cause__, pickle.UnpicklingError)  # torch.load(weights_only=True) refused it


def test_base_model_mismatch_warns(base, adapter, caplog):
    rewrite_config(adapter, base_model_name_or_path="someone/OtherModel-7B")
    base_named = copy.deepcopy(base)
    base_named.config.name_or_path = "/models/TinyLlama"
    with caplog.at_level(logging.WARNING, logger="swift"):
        Swift.from_pretrained(base_named, adapter, adapter_name="x")
    assert any("OtherModel-7B" in r.getMessage() for r in caplog.records)


def test_peft_model_refused(base, adapter):
    with pytest.raises(ValueError, match="already a PEFT model"):
        Swift.from_pretrained(PeftModel.from_pretrained(copy.deepcopy(base), str(adapter)), adapter)


def test_same_model_under_our_cache_name_does_not_warn(base, adapter, caplog):
    rewrite_config(adapter, base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    base_named = copy.deepcopy(base)
    base_named.config.name_or_path = "/cache/models/SmolLM2-135M-Instruct-fp32"
    with caplog.at_level(logging.WARNING, logger="swift"):
        Swift.from_pretrained(base_named, adapter, adapter_name="x")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
