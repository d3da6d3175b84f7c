"""The real SmolLM2-135M-Instruct: packaged GGUF -> cached fp32 HF dir, and the mixture on real weights."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from peft import PeftModel

from swift.llm import get_model_tokenizer
from swift.llm.model import smollm2_hf_dir
from swift.tuners import Swift, lora_mixture_context
from tests.factories import make_lora_dir
from tests.tolerances import assert_close


@pytest.fixture(scope="module")
def smollm2():
    return get_model_tokenizer("smollm2-135m-instruct")


def test_default_model_is_cached_and_reloads_fast(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"  # what its adapters record
    assert (smollm2_hf_dir() / "model.safetensors").is_file()
    start = time.perf_counter()
    again, _ = get_model_tokenizer()
    assert time.perf_counter() - start < 15  # cached: no GGUF conversion
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_real_model_mixture_equals_peft_cat(smollm2, tmp_path):
    model, tokenizer = smollm2
    dirs = {
        "qv": make_lora_dir(
            model, tmp_path / "qv", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], seed=1, std=0.02
        ),
        "mlp": make_lora_dir(
            model,
            tmp_path / "mlp",
            r=4,
            lora_alpha=8,
            target_modules=["up_proj", "down_proj"],
            seed=2,
            std=0.02,
        ),
    }
    pool = None
    for name, path in dirs.items():
        pool = Swift.from_pretrained(pool or copy.deepcopy(model), path, adapter_name=name)
    prompts = ["Translate to French: Germany", "What is 12 + 35?"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    weights = torch.tensor([[0.7, 0.3], [0.0, 1.0]])
    with torch.no_grad(), lora_mixture_context(weights, list(dirs)):
        mixed = pool(**batch).logits
    reference = PeftModel.from_pretrained(copy.deepcopy(model), str(dirs["qv"]), adapter_name="qv")
    reference.load_adapter(str(dirs["mlp"]), adapter_name="mlp")
    for i, prompt in enumerate(prompts):
        used = [(n, w) for n, w in zip(dirs, weights[i].tolist()) if w]
        reference.add_weighted_adapter(
            [n for n, _ in used], [w for _, w in used], f"m{i}", combination_type="cat"
        )
        reference.set_adapter(f"m{i}")
        alone = tokenizer(prompt, return_tensors="pt")
        n = alone.input_ids.shape[1]
        with torch.no_grad():
            expected = reference(**alone).logits
            base_logits = model(**alone).logits
        got = mixed[i, batch.attention_mask[i].bool()][-n:]
        # A row of a padded batch of 2 vs the prompt alone: different GEMM shapes, 30 layers, logits ~20, so the
        # bound scales with the logits' magnitude (tests/tolerances.py; 1.5e-4 seen on an Intel Xeon).
        bound = assert_close(got, expected[0], same_shapes=False, what=f"prompt {i}")
        assert (expected[0] - base_logits[0]).abs().max().item() > 100 * bound  # the adapters matter
