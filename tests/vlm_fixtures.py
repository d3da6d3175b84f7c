"""Session fixtures for the swift.llm tests (``pytest_plugins = ["tests.vlm_fixtures"]``) and an independent
reference for a weighted mixture of LoRA adapters.

The reference never touches ``swift.tuners``: it reads the PEFT files itself and merges
``W + sum_j w_j * s_j * B_j @ A_j`` into a copy of the base model's linear layers.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from tests.tiny_vlms import TinyModelDirs


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> TinyModelDirs:
    """Tiny model directories by swift.llm model type, built on first use."""
    return TinyModelDirs(tmp_path_factory.mktemp("tiny_models"))


#: A tiny ``VlmRecipe`` (1-layer, 32-wide vision tower on 16x16 images, a handful of steps) around the real
#: SmolLM2: the whole build path in seconds.
TINY_VLM_RECIPE = dict(
    image_size=16,
    patch_size=4,  # (16/4)^2 = 16 image tokens
    vision_hidden_size=32,
    vision_layers=1,
    vision_heads=2,
    vision_intermediate_size=64,
    train_examples=14,  # two per image domain
    heldout_examples=7,
    pretrain_steps=3,
    pretrain_batch_size=4,
    steps=2,
    batch_size=2,
)


@pytest.fixture(scope="session")
def tiny_llava_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """``(folder, seconds)`` of the tiny recipe's build, in a session cache root of its own."""
    from lora_retriever.vlm import VlmRecipe, build_vlm

    root = tmp_path_factory.mktemp("vlm_cache")
    start = time.perf_counter()
    folder = build_vlm(VlmRecipe(**TINY_VLM_RECIPE), cache_root=root, progress=False)
    return folder, time.perf_counter() - start


@pytest.fixture(scope="session")
def merged_reference():
    """``merge_adapters`` (as a fixture, so test modules needn't import this plugin module)."""
    return merge_adapters


def merge_adapters(base: nn.Module, adapter_dirs: Sequence[Path], weights: Sequence[float]) -> nn.Module:
    """A copy of ``base`` with every targeted linear weight replaced by ``W + sum_j w_j s_j B_j A_j``.

    Args:
        base: the plain transformers model (no LoRA layers).
        adapter_dirs: PEFT LoRA directories (plain LoRA: ``s = lora_alpha / r``, no rsLoRA / patterns).
        weights: one routing weight per directory.
    """
    model = copy.deepcopy(base).eval()
    with torch.no_grad():
        for adapter_dir, weight in zip(adapter_dirs, weights, strict=True):
            if weight == 0:
                continue
            config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
            if config.get("use_rslora") or config.get("rank_pattern") or config.get("alpha_pattern"):
                raise ValueError(f"{adapter_dir}: the reference only handles plain LoRA scaling alpha / r.")
            scaling = config["lora_alpha"] / config["r"]
            state = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
            for key, lora_A in state.items():
                if ".lora_A." not in key:
                    continue
                lora_B = state[key.replace(".lora_A.", ".lora_B.")]
                module_name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
                linear = model.get_submodule(module_name)
                linear.weight += (
                    weight * scaling * (lora_B.double() @ lora_A.double()).to(linear.weight.dtype)
                )
    return model
