"""Builders for the service tests and benchmark: random LoRA adapters written straight to PEFT format, and a
small pool of them with retrieval keys (registered through the library's own registry path)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from swift.tuners.peft_format import CONFIG_NAME, SAFETENSORS_NAME, peft_lora_key

#: Key samples of the test pool: three "tasks" a query can be retrieved for.
TASK_SAMPLES: dict[str, list[str]] = {
    "capitals": [
        "What is the capital of France?",
        "What is the capital of Japan?",
        "Name the capital city of Brazil.",
        "Which city is the capital of Kenya?",
    ],
    "arithmetic": ["What is 12 + 7?", "Compute 45 + 38.", "Add 9 and 16.", "What is 71 + 22?"],
    "sentiment": [
        "Is the word 'wonderful' positive or negative?",
        "Rate the sentiment of the word 'terrible'.",
        "Is 'gloomy' a positive or a negative word?",
        "What is the sentiment of 'delightful'?",
    ],
}


def linear_names(model: nn.Module, suffixes: Sequence[str], layers: Sequence[int] | None = None) -> list[str]:
    """Names of the linear modules (``nn.Linear``, or a ``LoraLinear`` wrapping one) ending in one of
    ``suffixes`` (optionally only in ``layers``)."""
    from swift.tuners import LoraLinear

    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear | LoraLinear) or name.rsplit(".", 1)[-1] not in suffixes:
            continue
        if layers is not None and not any(f".layers.{i}." in name for i in layers):
            continue
        names.append(name)
    return names


def write_random_adapter(
    model: nn.Module,
    path: Path,
    modules: Sequence[str],
    *,
    r: int = 4,
    alpha: float = 8.0,
    seed: int = 0,
    std: float = 0.05,
) -> Path:
    """A PEFT-format LoRA directory with random A and B on ``modules`` (full module names) of ``model``."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name in modules:
        linear = model.get_submodule(name)
        state[peft_lora_key(name, "A")] = torch.randn(r, linear.in_features, generator=gen) * std
        state[peft_lora_key(name, "B")] = torch.randn(linear.out_features, r, generator=gen) * std
    base = getattr(getattr(model, "config", None), "name_or_path", None)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(modules),
        "base_model_name_or_path": base,
    }
    # Plain writes (no fsync): tests and benchmarks write hundreds of these.
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / SAFETENSORS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(adapter_config))
    return path


def build_pool(
    model: nn.Module,
    root: Path,
    embedder: Any,
    samples: Mapping[str, Sequence[str]] = TASK_SAMPLES,
    *,
    modules: Sequence[str] | None = None,
    std: float = 0.05,
) -> Path:
    """Write one random adapter per task under ``root`` and register it with its key in ``root/pool.json``."""
    from lora_retriever.training.registry import register_trained_adapter

    modules = list(modules or linear_names(model, ("q_proj", "v_proj")))
    config = root / "pool.json"
    for i, (name, texts) in enumerate(samples.items()):
        adapter = write_random_adapter(model, root / name, modules, seed=i + 1, std=std)
        samples_path = root / f"{name}.jsonl"
        samples_path.write_text(
            "".join(json.dumps({"id": f"{name}-{j}", "query": t}) + "\n" for j, t in enumerate(texts))
        )
        register_trained_adapter(
            config,
            lora_name=name,
            lora_path=adapter,
            samples=[(f"{name}-{j}", t) for j, t in enumerate(texts)],
            samples_path=samples_path,
            embedder=embedder,
            fields={"description": f"{name} (random test adapter)"},
        )
    return config
