"""Train LoRA / QLoRA adapters for the pool: ``train(TrainConfig(...))`` (``train.py`` is its CLI).

* ``config``: ``TrainConfig``, the validated settings of one run;
* ``data``: strict JSON / JSONL record parsing, the eval split, template encoding, the padding collator;
* ``model``: the base model (fp32, NF4 or int8 via bitsandbytes) and its PEFT LoRA wrapper;
* ``trainer``: the training loop, eval loss / perplexity, metrics;
* ``checkpoint``: exact save / resume;
* ``registry``: atomic, locked pool-config updates and retrieval keys (usable without training).

Names are imported on first use, so ``train.py --help`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DatasetError": "lora_retriever.training.data",
    "TrainConfig": "lora_retriever.training.config",
    "TrainRecord": "lora_retriever.training.data",
    "read_training_records": "lora_retriever.training.data",
    "register_adapter": "lora_retriever.training.registry",
    "register_trained_adapter": "lora_retriever.training.registry",
    "train": "lora_retriever.training.trainer",
    "write_adapter_key": "lora_retriever.training.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_retriever.training' has no attribute {name!r}")
