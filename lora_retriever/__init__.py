"""LoraRetriever: input-aware retrieval and composition of LoRA adapters.

    from lora_retriever import LoraRetriever, LoraRetrieverConfig, MixtureComposer, FusionComposer, AdapterPool

Names are imported on first use, so ``import lora_retriever.embedders`` (or ``--help``) stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterPool": "lora_retriever.pool",
    "FusionComposer": "lora_retriever.composition",
    "LoraRetriever": "lora_retriever.retriever",
    "LoraRetrieverConfig": "lora_retriever.retriever",
    "MixtureComposer": "lora_retriever.composition",
    "RetrievedAdapter": "lora_retriever.retriever",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_retriever' has no attribute {name!r}")
