"""Embedding models for retrieval: one ``Embedder`` interface over sentence-transformers, jina-v4, CLIP and
the image-only ``vision-tower`` backend (a VLM's vision tower, for score-level image retrieval).

Light to import: the backends (and torch, transformers, sentence-transformers) load only when
``get_embedder`` builds one.

Example::

    from lora_retriever.embedders import get_embedder

    embedder = get_embedder("sentence-transformers")  # packaged all-MiniLM-L6-v2, 384-d
    q = embedder.encode_queries(["What is the capital of France?"])  # [1, 384], unit norm
"""

from lora_retriever.embedders.base import (
    DEFAULT_INSTRUCTION,
    Embedder,
    UnsupportedInputError,
    l2_normalize,
    retrieval_text,
)
from lora_retriever.embedders.config import (
    EmbedderConfig,
    ImageRetrievalConfig,
    validate_adapter_path,
    validate_fusion_weights,
    validate_vision_dir,
)
from lora_retriever.embedders.factory import get_embedder, resolve_backend
from lora_retriever.embedders.meta import EmbeddingMeta, check_compatible

__all__ = [
    "DEFAULT_INSTRUCTION",
    "Embedder",
    "EmbedderConfig",
    "EmbeddingMeta",
    "ImageRetrievalConfig",
    "UnsupportedInputError",
    "check_compatible",
    "get_embedder",
    "l2_normalize",
    "resolve_backend",
    "retrieval_text",
    "validate_adapter_path",
    "validate_fusion_weights",
    "validate_vision_dir",
]
