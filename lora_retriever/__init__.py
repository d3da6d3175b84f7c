"""LoraRetriever: input-aware retrieval and composition of LoRA adapters.

    from lora_retriever import LoraRetriever, LoraRetrieverConfig, MixtureComposer, FusionComposer, AdapterPool
"""

from lora_retriever.composition import FusionComposer, MixtureComposer
from lora_retriever.pool import AdapterPool
from lora_retriever.retriever import LoraRetriever, LoraRetrieverConfig, RetrievedAdapter

__all__ = [
    "AdapterPool",
    "FusionComposer",
    "LoraRetriever",
    "LoraRetrieverConfig",
    "MixtureComposer",
    "RetrievedAdapter",
]
