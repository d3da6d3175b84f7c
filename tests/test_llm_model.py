"""swift.llm.get_model_tokenizer on tiny saved models: explicit types, "auto", and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from swift.llm import get_model_tokenizer
from tests.tiny_vlms import VOCAB

pytest_plugins = ["tests.vlm_fixtures"]

# model_type -> (model class, processor class or None for a plain tokenizer)
EXPECTED = {
    "llama": ("LlamaForCausalLM", None),
    "qwen2": ("Qwen2ForCausalLM", None),
    "qwen2-vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
    "llava": ("LlavaForConditionalGeneration", "LlavaProcessor"),
}


@pytest.mark.parametrize("how", ["explicit", "auto"])
@pytest.mark.parametrize("model_type", list(EXPECTED))
def test_loads_tiny_dir(tiny_dirs, model_type, how):
    model_cls, processor_cls = EXPECTED[model_type]
    path = tiny_dirs[model_type]
    model, processor = get_model_tokenizer(model_type if how == "explicit" else "auto", path)
    assert type(model).__name__ == model_cls
    assert model.model_type == model_type  # read by get_template / inference
    assert not model.training
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # Every saved tensor comes back bit-exact (the file may use older key names, so match by value).
    state = model.state_dict()
    saved = load_file(str(path / "model.safetensors"))
    assert len(saved) >= 20
    for key, tensor in saved.items():
        assert any(v.shape == tensor.shape and torch.equal(v, tensor) for v in state.values()), key
    if processor_cls is None:
        tokenizer = processor
        assert not hasattr(processor, "image_processor")
    else:
        assert type(processor).__name__ == processor_cls
        tokenizer = processor.tokenizer
        assert tokenizer("what is paris")["input_ids"] == [VOCAB["what"], VOCAB["is"], VOCAB["paris"]]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    assert tokenizer.decode(tokenizer("what is paris")["input_ids"]) == "what is paris"


@pytest.mark.parametrize(
    ("model_type", "dir_type", "found"),
    [("llava", "qwen2-vl", "qwen2_vl"), ("qwen2-vl", "llama", "llama"), ("llama", "internvl", "internvl")],
)
def test_wrong_type_for_dir_raises(tiny_dirs, model_type, dir_type, found):
    with pytest.raises(ValueError, match=rf"holds a '{found}' model but model_type '{model_type}'"):
        get_model_tokenizer(model_type, tiny_dirs[dir_type])


def test_missing_dir_and_config_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_model_tokenizer("llama", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        get_model_tokenizer("auto", tmp_path)


def test_unknown_type_and_missing_path_raise(tiny_dirs):
    with pytest.raises(ValueError, match="unknown model_type 'gpt5'"):
        get_model_tokenizer("gpt5", tiny_dirs["llama"])
    with pytest.raises(ValueError, match="needs model_path"):
        get_model_tokenizer("qwen2-vl")


@pytest.fixture
def internvl2_dir(tmp_path):
    """An original-InternVL2-style directory; importing its modelling code would create ``ran_remote_code``."""
    marker = tmp_path / "ran_remote_code"
    config = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "auto_map": {
            "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
            "AutoModel": "modeling_internvl_chat.InternVLChatModel",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (tmp_path / "configuration_internvl_chat.py").write_text(payload)
    (tmp_path / "modeling_internvl_chat.py").write_text(payload)
    return tmp_path, marker


@pytest.mark.parametrize("model_type", ["internvl2", "auto"])
def test_remote_code_checkpoint_needs_trust_remote_code(internvl2_dir, model_type):
    path, marker = internvl2_dir
    with pytest.raises(PermissionError, match="trust_remote_code=True"):
        get_model_tokenizer(model_type, path)
    assert not marker.exists()


def test_remote_code_dir_refused_as_native_internvl(internvl2_dir):
    path, marker = internvl2_dir
    with pytest.raises(ValueError, match="'internvl_chat' model but model_type 'internvl'"):
        get_model_tokenizer("internvl", path)
    assert not marker.exists()
