"""LoraRetriever: input-aware retrieval and composition of LoRA adapters."""
