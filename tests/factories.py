"""Builders for tests: tiny random-weight models from configs and PEFT-format adapters on them."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

VOCAB = 128


def tiny_causal_lm(kind: str = "llama", seed: int = 0) -> nn.Module:
    """A 2-layer, hidden-64 Llama or Qwen2 causal LM with random weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}")
    return model.eval()


def make_lora_dir(
    base: nn.Module,
    path: str | Path,
    *,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | str = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    seed: int = 0,
    std: float = 0.05,
    **config_kwargs,
) -> Path:
    """Save a PEFT LoRA adapter with random (non-zero) A and B for ``base`` to ``path``."""
    torch.manual_seed(seed)
    target = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target, use_rslora=use_rslora, **config_kwargs
    )
    peft_model = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(path))
    return Path(path)
